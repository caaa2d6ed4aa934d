"""What every ``filterx`` command shares: logging set-up, the summary it prints, the options
file it reads (``--config``) and the one it saves next to its outputs, and the shared options.

Where a run's options are saved (``save_config``):

- a command that writes a directory (shard OUT, pretrain/finetune OUT, report -o, demo --out,
  select --format wds): ``<dir>/filterx-<command>.yaml`` (``inside``);
- a command that writes into a dataset dir (embed, score): ``<dataset>/configs/<command>-<name>.yaml``
  (``in_dataset``; name: the encoder tag for embed, the score name for score);
- a command that writes one file (train-encoder OUT, select -o FILE): ``<file>.filterx.yaml``
  (``beside``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, Sequence

import click

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


# ---------------------------------------------------------------- config files


def _load_config(ctx: click.Context, param, value):
    """--config FILE.yaml: option values for this command (keys as on the command line, with or
    without the leading dashes); options given on the command line win."""
    if value is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(Path(value).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read {value}: {exc}", ctx=ctx, param=param) from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value} must hold a mapping of option: value", ctx=ctx, param=param)
    # keys as spelled on the command line: long option names, or argument names
    spelling = {}
    for p in ctx.command.params:
        if p.name == "config":
            continue
        opts = [o for o in p.opts if o.startswith("--")] or ([p.name] if isinstance(p, click.Argument) else p.opts)
        for o in opts:
            spelling[o.lstrip("-").replace("_", "-").lower()] = p.name
    defaults = {}
    for key, v in data.items():
        name = spelling.get(str(key).lstrip("-").replace("_", "-").lower())
        if name is None:
            raise click.BadParameter(f"{value}: {key!r} is not an option of this command; valid: "
                                     f"{', '.join(sorted(spelling))}", ctx=ctx, param=param)
        defaults[name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


# Not part of what a run computes: left out of saved configs.
# How a run was run, not what it computed (outputs are the same under every runner): a saved
# file repeats the run anywhere, without joining the cluster it ran on.
_NOT_SAVED = ("quiet", "verbose", "as_json", "runner", "address", "actors")
# Options holding a class spec, where "@path" names a file.
_CLASS_SPECS = ("classes", "relevant_classes")
# pretrain / finetune options left unset take their value from PretrainConfig / FinetuneConfig;
# shown in --help and written into saved configs (tests check that they agree).
TRAINING_DEFAULTS = {
    # lr None: the arch's (filterx.train.pretrain.default_lr: 0.1 per 256 for ResNets, 0.01 alexnet_lrn)
    "pretrain": {"epochs": 90, "batch_size": 64, "lr": None, "weight_decay": 1e-4, "schedule": "step",
                 "lr_step_epochs": 30, "val_fraction": 0.0},
    "finetune": {"epochs": 20, "batch_size": 32, "lr": 0.001, "weight_decay": 5e-4, "schedule": "inv",
                 "lr_step_epochs": 10, "test_fraction": 0.2, "val_fraction": 0.1, "pseudo_threshold": 0.95},
}


def _config_key(param: click.Parameter) -> str:
    """How a config file names ``param``: its long option name without dashes, or the argument's name."""
    longs = [o[2:] for o in param.opts if o.startswith("--")]
    return longs[0] if longs and isinstance(param, click.Option) else param.name.replace("_", "-")


def _portable(name: str, value):
    """``value`` as it must be saved to mean the same from any directory: absolute paths
    (also a class spec's ``@file``), lists for tuples."""
    if isinstance(value, Path):
        return os.path.abspath(os.path.expanduser(value))
    if isinstance(value, (tuple, list)):
        return [_portable(name, v) for v in value]
    if name in _CLASS_SPECS and isinstance(value, str) and value.startswith("@"):
        from filterx.io.classes import PRESETS

        ref = value[1:].strip()
        if ref not in PRESETS and Path(ref).expanduser().is_file():
            return "@" + os.path.abspath(os.path.expanduser(ref))
    return value


def resolved_options(ctx: click.Context) -> dict:
    """Every option and argument of the running command (defaults included, after --config and
    the command line are merged), keyed as a config file spells them; -q/-v/--json left out."""
    fallback = TRAINING_DEFAULTS.get(ctx.command.name, {})
    values = {}
    for p in ctx.command.params:
        if not p.expose_value or p.name in _NOT_SAVED:
            continue
        value = ctx.params.get(p.name)
        values[_config_key(p)] = _portable(p.name, fallback.get(p.name) if value is None else value)
    return values


def command_line(ctx: click.Context, values: dict) -> str:
    """The shortest command line that gives ``values`` (options at their default left out)."""
    words = ["filterx", ctx.command.name]
    fallback = TRAINING_DEFAULTS.get(ctx.command.name, {})
    for p in ctx.command.params:
        key = _config_key(p)
        if key not in values:
            continue
        value = values[key]
        if isinstance(p, click.Argument):
            words.append(shlex.quote(str(value)))
        elif value is None or value is False or value in ([], ()) \
                or value == _portable(p.name, fallback.get(p.name, p.default)):
            continue
        elif getattr(p, "is_flag", False):
            words.append(f"--{key}")
        else:
            for v in value if isinstance(value, list) else [value]:
                words += [f"--{key}", shlex.quote(str(v))]
    return " ".join(words)


def save_config(ctx: click.Context, path: Path) -> Path:
    """Write the running command's options to ``path`` (atomically) as YAML that ``--config``
    reads back. No timestamps: the same run saves the same bytes."""
    import yaml

    import filterx
    from filterx.io import atomic

    values = resolved_options(ctx)
    name = ctx.command.name
    text = (f"# options of a `filterx {name}` run (filterx {filterx.__version__}); "
            f"repeat it with: filterx {name} --config THIS_FILE\n"
            f"# the same as: {command_line(ctx, values)}\n"
            + yaml.safe_dump(values, sort_keys=False, allow_unicode=True, default_flow_style=False,
                             width=float("inf")))
    atomic.write_text(path, text)
    return path


def beside(path: Path) -> Path:
    """Where the options of a run that wrote the single file ``path`` go."""
    path = Path(os.path.abspath(os.path.expanduser(path)))
    return path.with_name(path.name + ".filterx.yaml")


def inside(directory: Path, command: str) -> Path:
    """Where the options of a run that wrote ``directory`` go."""
    return Path(os.path.abspath(os.path.expanduser(directory))) / f"filterx-{command}.yaml"


def in_dataset(dataset: Path, command: str, name: str) -> Path:
    """Where the options of a run that wrote into the dataset dir ``dataset`` go."""
    from filterx.report.info import CONFIGS

    return Path(dataset) / CONFIGS / f"{command}-{name}.yaml"


# ---------------------------------------------------------------- shared options


def common(fn):
    """-q/-v/--json/--config on every command."""
    fn = click.option("--config", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False,
                      callback=_load_config, metavar="FILE",
                      help="YAML of option values, e.g. one a run saved (the command line wins).")(fn)
    fn = click.option("--json", "as_json", is_flag=True,
                      help="Print the summary as one JSON object on stdout (logs go to stderr).")(fn)
    fn = click.option("-v", "--verbose", is_flag=True, help="Log debug messages too.")(fn)
    fn = click.option("-q", "--quiet", is_flag=True, help="No progress bars or info logs; the summary is printed.")(fn)
    return fn


DEVICE_HELP = "Where to compute; auto: CUDA when a GPU is visible, else CPU."
BACKEND_HELP = "JPEG decoder: DALI, torchvision.io, or PIL (DCT-scaled); auto: DALI if installed."


def runtime_options(fn=None, *, batch_size: int = 128):
    """--device/--backend/--batch-size/--workers, shared by the commands that decode images."""
    if fn is None:
        return lambda f: runtime_options(f, batch_size=batch_size)
    fn = click.option("--workers", default=2, show_default=True, type=click.IntRange(0),
                      help="Decode worker processes/threads.")(fn)
    fn = click.option("--batch-size", default=batch_size, show_default=True, type=click.IntRange(1),
                      help="Images per batch.")(fn)
    fn = click.option("--backend", default="auto", show_default=True,
                      type=RegistryChoice("backend", backend_names), help=BACKEND_HELP)(fn)
    fn = click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
                      help=DEVICE_HELP)(fn)
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


class RegistryChoice(click.ParamType):
    """A choice among the names of a registry, read only when needed (the model registry imports
    torch, which would slow down every command's start and --help); the error lists them all."""

    def __init__(self, what: str, names: Callable[[], Sequence[str]], metavar: str | None = None):
        self.name, self.names, self._metavar = what, names, metavar

    def convert(self, value, param, ctx):
        choices = list(self.names())
        if value not in choices:
            self.fail(f"unknown {self.name} {value!r}; valid {self.name}s: {', '.join(choices)}", param, ctx)
        return value

    def get_metavar(self, param, ctx=None):
        return self._metavar or "[" + "|".join(self.names()) + "]"

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(n) for n in self.names() if n.startswith(incomplete)]


class DefaultOption(click.Option):
    """An option left unset (None) whose value then comes from elsewhere (a config dataclass, a
    scorer's defaults): ``show_default="90"`` shows "[default: 90]", without the parentheses
    click puts around a string default."""

    def get_help_extra(self, ctx):
        extra = super().get_help_extra(ctx)
        if isinstance(self.show_default, str):
            extra["default"] = self.show_default
        return extra


class ListedOption(click.Option):
    """An option of a RegistryChoice type whose --help lists the names in its help text,
    where they wrap (a long [a|b|...] metavar would run past 80 columns)."""

    def get_help_record(self, ctx):
        base = self.help
        self.help = f"{base} One of: {', '.join(self.type.names())}."
        try:
            return super().get_help_record(ctx)
        finally:
            self.help = base


def scorer_names():
    from filterx.scorers import list_scorers

    return list_scorers()


def encoder_arch_names():
    from filterx.models.encoder import ARCHS

    return list(ARCHS)


def model_names():
    from filterx.models.archs import list_models

    return list_models()


EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


class EncoderParam(click.Path):
    """--encoder: an encoder file (from train-encoder) or a backbone spec such as
    ``torchvision:resnet50:IMAGENET1K_V2`` (filterx.models.backbones); a spec comes back as its
    canonical string (a weights file made absolute), a file as a Path. ``spec_only``: a
    backbone spec and nothing else (train-encoder --backbone)."""

    def __init__(self, spec_only: bool = False):
        super().__init__(exists=True, dir_okay=False, path_type=Path)
        self.spec_only = spec_only
        self.name = "backbone" if spec_only else "encoder"

    def convert(self, value, param, ctx):
        from filterx.models import backbones

        text = str(value)
        if self.spec_only or (not isinstance(value, Path) and backbones.looks_like_spec(text)):
            try:
                return backbones.parse_spec(text).text
            except (ValueError, FileNotFoundError) as exc:
                self.fail(str(exc), param, ctx)
        lib, sep, _ = text.partition(":")
        if self.exists and sep and "/" not in lib and not Path(text).expanduser().exists():
            # meant as a spec, of a library filterx does not know
            self.fail(f"bad encoder {text!r}: no such file, and {lib!r} is not a backbone library "
                      f"({', '.join(backbones.LIBRARIES)}); valid: {backbones.FORMS}", param, ctx)
        return super().convert(value, param, ctx)

    def get_metavar(self, param, ctx=None):
        return "SPEC" if self.spec_only else "FILE|SPEC"


ENCODER = EncoderParam()
BACKBONE = EncoderParam(spec_only=True)

