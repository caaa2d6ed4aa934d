"""The ``filterx`` command line: one click group, each command a thin layer over a library call.

User errors (bad paths, bad values, unknown methods, a locked output) exit with status 2 and
one line on stderr naming the bad value and what would be valid; no traceback.

Every command prints a one-paragraph summary on stdout (``--json``: the same as one JSON
object; progress bars and logs go to stderr), and every command that writes saves the option
values it ran with, as YAML that ``--config`` reads back, next to its outputs (where:
``filterx.cli.configs``). The group is :mod:`filterx.cli.group`; the commands are in
:mod:`filterx.cli.pipeline` (shard .. select), :mod:`filterx.cli.training` (pretrain,
finetune) and :mod:`filterx.cli.looking` (report, info, demo), in the pipeline's order.
"""

# Importing them registers their commands on the group, in this order (the pipeline's).
from filterx.cli import pipeline  # noqa: F401
from filterx.cli import training  # noqa: F401
from filterx.cli import looking  # noqa: F401  # isort: skip
from filterx.cli.group import USER_ERRORS, error_line, main

__all__ = ["USER_ERRORS", "error_line", "main"]
