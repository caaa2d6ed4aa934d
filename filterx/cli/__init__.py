"""Layer 10, the top: the ``filterx`` click group. Commands parse options, call one library
function and print a summary (:mod:`filterx.cli.commands`; shared option helpers in
:mod:`filterx.cli.common`)."""

from filterx.cli.commands import main

__all__ = ["main"]
