"""Layer 10, the top: the ``filterx`` click group. Commands parse options, call one library
function and print a summary (:mod:`filterx.cli.commands`; shared options in :mod:`filterx.cli.common`, their types in
:mod:`filterx.cli.params`, options files in :mod:`filterx.cli.configs`)."""

from filterx.cli.commands import main

__all__ = ["main"]
