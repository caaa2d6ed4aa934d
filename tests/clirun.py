"""The command line in-process, for tests: exit code, stdout and stderr of one invocation."""

from click.testing import CliRunner

from filterx.cli.commands import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def one_line(err: str) -> str:
    """The single line of a user error (asserting there is one)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("filterx"), err
    return lines[0]
