"""What every ``filterx`` command shares: logging set-up, the summary it prints, the options
file it saves (:mod:`filterx.cli.configs`), and the shared options (their types:
:mod:`filterx.cli.params`).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import click

from filterx.cli.configs import load_config, save_config
from filterx.cli.params import ConfigOption, RegistryChoice


def setup(quiet: bool, verbose: bool) -> None:
    from filterx.core import progress

    progress.QUIET = quiet
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("PIL", "matplotlib", "faiss", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---------------------------------------------------------------- summaries


def plain_json(obj):
    """``obj`` as strict JSON values: NaN and infinities become null (scripts' parsers reject
    them), numpy scalars and arrays Python numbers and lists, paths and other objects strings."""
    if isinstance(obj, dict):
        return {str(k): plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_json(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if callable(getattr(obj, "tolist", None)):  # numpy scalars and arrays
        return plain_json(obj.tolist())
    return str(obj)


def emit(summary, as_json: bool, config: Path | None = None) -> None:
    """Print a command's summary: its one-paragraph line, or JSON for scripts (with the path of
    the saved options under "config")."""
    if as_json:
        from dataclasses import asdict

        data = summary.to_dict() if hasattr(summary, "to_dict") else asdict(summary)
        if config is not None:
            data["config"] = str(config)
        click.echo(json.dumps(plain_json(data), sort_keys=True, allow_nan=False))
    elif config is None:
        click.echo(summary.line())
    else:
        text, note = summary.line(), f"; options saved to {config}"
        if "\n\n" in text:  # a table, then the paragraph (demo)
            click.echo(text + note)
        else:  # the paragraph, then details to check (score's class matches)
            first, sep, rest = text.partition("\n")
            click.echo(first + note + sep + rest)


def finish(summary, as_json: bool, config: Path | None) -> None:
    """Save the options this run used to ``config`` (a path from the rule in the module doc),
    then print the summary."""
    if config is not None:
        save_config(click.get_current_context(), config)
    emit(summary, as_json, config)


def finish_rank0(summary, as_json: bool, config: Path) -> None:
    """Under torchrun only rank 0 saves and prints."""
    from filterx.core.runtime import dist_info

    if dist_info().is_main:
        finish(summary, as_json, config)


# ---------------------------------------------------------------- shared options


def common(fn):
    """-q/-v/--json/--config on every command."""
    fn = click.option("--config", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False,
                      callback=load_config, metavar="FILE",
                      help="YAML of option values, e.g. one a run saved (the command line wins).")(fn)
    fn = click.option("--json", "as_json", is_flag=True,
                      help="Print the summary as one JSON object on stdout (logs go to stderr).")(fn)
    fn = click.option("-v", "--verbose", is_flag=True, help="Log debug messages too.")(fn)
    fn = click.option("-q", "--quiet", is_flag=True, help="No progress bars or info logs; the summary is printed.")(fn)
    return fn


DEVICE_HELP = "Where to compute; auto: CUDA when a GPU is visible, else CPU."
BACKEND_HELP = "JPEG decoder: DALI, torchvision.io, or PIL (DCT-scaled); auto: DALI if installed."


def runtime_options(fn=None, *, batch_size: int = 128, config=None):
    """--device/--backend/--batch-size/--workers, shared by the commands that decode images; with
    ``config`` (a function returning a config dataclass) their defaults are that config's."""
    if fn is None:
        return lambda f: runtime_options(f, batch_size=batch_size, config=config)

    def opt(*decls, default, **kwargs):
        if config is None:
            return click.option(*decls, default=default, show_default=True, **kwargs)
        return click.option(*decls, cls=ConfigOption, config=config, **kwargs)

    fn = opt("--workers", default=2, type=click.IntRange(0), help="Decode worker processes/threads.")(fn)
    fn = opt("--batch-size", default=batch_size, type=click.IntRange(1), help="Images per batch.")(fn)
    fn = opt("--backend", default="auto", type=RegistryChoice("backend", backend_names), help=BACKEND_HELP)(fn)
    fn = opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), help=DEVICE_HELP)(fn)
    return fn


def runner_options(fn=None, *, actors: bool = True):
    """--runner/--address (and --actors), for the commands that map shards over workers."""
    if fn is None:
        return lambda f: runner_options(f, actors=actors)
    fn = click.option("--address", metavar="ADDR",
                      help="--runner ray: the cluster to join: auto (the one `ray start` made on this node) or "
                           "HOST:PORT; default: $RAY_ADDRESS, else a cluster started on this node, else a new one "
                           "here.")(fn)
    if actors:
        fn = click.option("--actors", default=0, show_default=True, type=click.IntRange(0),
                          help="--runner ray: embedding actors; 0: one per GPU of the cluster (without GPUs: "
                               "its CPUs / max(1, --workers)).")(fn)
    fn = click.option("--runner", type=RegistryChoice("runner", runner_names), default=None,
                      help="What maps the shards over workers: this machine, torchrun's ranks, or a Ray "
                           "cluster (README: Several machines). Default: local; torchrun under torchrun. "
                           "Not saved with the options: the outputs are the same under every runner.")(fn)
    return fn


def runner_names() -> list[str]:
    from filterx.runners import list_runners

    return list_runners()


def check_runner(runner, address, actors: int = 0) -> None:
    """Ray's options only with --runner ray: a usage error, before any work."""
    if runner != "ray":
        if address is not None:
            raise click.UsageError(f"--address {address} names a Ray cluster; add --runner ray")
        if actors:
            raise click.UsageError("--actors counts Ray actors; add --runner ray")


def backend_names() -> list[str]:
    from filterx.decode.backends import list_backends

    return list_backends()


def format_names() -> list[str]:
    from filterx.io.manifest import list_formats

    return list_formats()


def scorer_names():
    from filterx.scorers import list_scorers

    return list_scorers()


def encoder_arch_names():
    from filterx.models.encoder import ARCHS

    return list(ARCHS)


def model_names():
    from filterx.models.archs import list_models

    return list_models()
