"""The ``filterx`` click group and how it turns errors into one line (the commands register on it
from :mod:`filterx.cli.pipeline`, :mod:`filterx.cli.training` and :mod:`filterx.cli.looking`).

User errors (bad paths, bad values, unknown methods, a locked output) exit with status 2 and
one line on stderr naming the bad value and what would be valid; no traceback.

Every command prints a one-paragraph summary on stdout (``--json``: the same as one JSON
object; progress bars and logs go to stderr), and every command that writes saves the option
values it ran with, as YAML that ``--config`` reads back, next to its outputs (where:
``filterx.cli.configs``).
"""

from __future__ import annotations

import errno
import os
import sys

import click


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


class FilterxGroup(click.Group):
    def main(self, args=None, prog_name=None, **kwargs):
        """Usage errors (bad option values, missing paths) as one line, exit status 2."""
        kwargs.pop("standalone_mode", None)
        try:
            rv = super().main(args, prog_name or "filterx", standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # `filterx` alone: the help, not an error line
            click.echo(exc.format_message(), err=True)
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            cmd = f" {exc.ctx.info_name}" if exc.ctx is not None and exc.ctx.parent is not None else ""
            click.echo(f"filterx{cmd}: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("filterx: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def list_commands(self, ctx):
        """In the order they are defined, the order of the pipeline (not alphabetical)."""
        return list(self.commands)

    def invoke(self, ctx):
        from filterx.io.atomic import LockedError

        try:
            return super().invoke(ctx)
        except (*USER_ERRORS, LockedError, OSError) as exc:
            cmd = f" {ctx.invoked_subcommand}" if ctx.invoked_subcommand else ""
            click.echo(f"filterx{cmd}: error: {error_line(exc)}", err=True)
            ctx.exit(2)


# What to do about an OS error, by errno; outputs are written atomically, so a re-run after
# the fix keeps every finished part.
_OS_ADVICE = {
    errno.ENOSPC: "free some space (or write elsewhere) and re-run: finished work is kept",
    errno.EDQUOT: "free some space (or write elsewhere) and re-run: finished work is kept",
    errno.EROFS: "the file system is read-only; write the output elsewhere",
    errno.EACCES: "no permission; write the output elsewhere or fix its permissions",
    errno.EPERM: "no permission; write the output elsewhere or fix its permissions",
    errno.EEXIST: "remove it or name another output",
    errno.EISDIR: "it is a directory; name a file",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.ENOENT: "check the path",
}


def error_line(exc: BaseException) -> str:
    """One line for a user-facing error: its message, or for an OS error what failed where."""
    if isinstance(exc, OSError) and exc.strerror:
        if exc.errno is not None and exc.strerror != os.strerror(exc.errno):
            return exc.strerror  # raised by filterx in its own words, which say what to do
        where = f": {exc.filename}" if exc.filename else ""
        advice = _OS_ADVICE.get(exc.errno)
        return f"{exc.strerror}{where}" + (f" ({advice})" if advice else "")
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@click.group(cls=FilterxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="filterx")
def main():
    """filterx: pick the part of a large image pool that serves a small target dataset.

    Each command is one stage; `filterx COMMAND --help` explains it, with an example. Every
    command takes -q/--quiet, -v/--verbose, --json (its summary as JSON on stdout) and
    --config FILE (option values in YAML; the command line wins), and saves the options it
    ran with next to its outputs, in a file that --config reads back.

    \b
    Typical run:
      filterx shard ~/data/imagenet/train ws/source
      filterx shard ~/data/office31/webcam ws/target
      filterx train-encoder ws/target ws/encoder.pt --resolution 112
      filterx score --method clustering --source ws/source \\
          --target ws/target --encoder ws/encoder.pt
      filterx select --source ws/source --method clustering \\
          --fraction 0.06 -o subset.jsonl
    """
