"""The ``filterx`` command line: one click group, each command a thin layer over a library call.

User errors (bad paths, bad values, unknown methods, a locked output) exit with status 2 and
one line on stderr naming the bad value and what would be valid; no traceback.

Every command prints a one-paragraph summary on stdout (``--json``: the same as one JSON
object; progress bars and logs go to stderr), and every command that writes saves the option
values it ran with, as YAML that ``--config`` reads back, next to its outputs:

- a command that writes a directory (shard OUT, pretrain/finetune OUT, report -o, demo --out,
  select --format wds): ``<dir>/filterx-<command>.yaml``;
- a command that writes into a dataset dir (embed, score): ``<dataset>/configs/<command>-<name>.yaml``
  (name: the encoder tag for embed, the score name for score);
- a command that writes one file (train-encoder OUT, select -o FILE): ``<file>.filterx.yaml``.
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

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


class FilterxGroup(click.Group):
    def main(self, args=None, prog_name=None, **kwargs):
        """Usage errors (bad option values, missing paths) as one line, exit status 2."""
        kwargs.pop("standalone_mode", None)
        try:
            rv = super().main(args, prog_name or "filterx", standalone_mode=False, **kwargs)
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
        from filterx.atomic import LockedError

        try:
            return super().invoke(ctx)
        except (*USER_ERRORS, LockedError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            click.echo(f"filterx: error: {msg}", err=True)
            ctx.exit(2)


def _setup(quiet: bool, verbose: bool) -> None:
    from filterx import progress

    progress.QUIET = quiet
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("PIL", "matplotlib", "faiss", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---------------------------------------------------------------- summaries


def _plain_json(obj):
    """``obj`` as strict JSON values: NaN and infinities become null (scripts' parsers reject
    them), numpy scalars and arrays Python numbers and lists, paths and other objects strings."""
    if isinstance(obj, dict):
        return {str(k): _plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_json(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if callable(getattr(obj, "tolist", None)):  # numpy scalars and arrays
        return _plain_json(obj.tolist())
    return str(obj)


def _emit(summary, as_json: bool, config: Path | None = None) -> None:
    """Print a command's summary: its one-paragraph line, or JSON for scripts (with the path of
    the saved options under "config")."""
    if as_json:
        from dataclasses import asdict

        data = summary.to_dict() if hasattr(summary, "to_dict") else asdict(summary)
        if config is not None:
            data["config"] = str(config)
        click.echo(json.dumps(_plain_json(data), sort_keys=True, allow_nan=False))
    elif config is None:
        click.echo(summary.line())
    else:
        text, note = summary.line(), f"; options saved to {config}"
        if "\n\n" in text:  # a table, then the paragraph (demo)
            click.echo(text + note)
        else:  # the paragraph, then details to check (score's class matches)
            first, sep, rest = text.partition("\n")
            click.echo(first + note + sep + rest)


def _finish(summary, as_json: bool, config: Path | None) -> None:
    """Save the options this run used to ``config`` (a path from the rule in the module doc),
    then print the summary."""
    if config is not None:
        save_config(click.get_current_context(), config)
    _emit(summary, as_json, config)


def _finish_rank0(summary, as_json: bool, config: Path) -> None:
    """Under torchrun only rank 0 saves and prints."""
    from filterx.runtime import dist_info

    if dist_info().is_main:
        _finish(summary, as_json, config)


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
_NOT_SAVED = ("quiet", "verbose", "as_json")
# Options holding a class spec, where "@path" names a file.
_CLASS_SPECS = ("classes", "relevant_classes")
# pretrain / finetune options left unset take their value from PretrainConfig / FinetuneConfig;
# shown in --help and written into saved configs (tests check that they agree).
TRAINING_DEFAULTS = {
    "pretrain": {"epochs": 90, "batch_size": 64, "lr": 0.01, "weight_decay": 1e-4, "schedule": "step",
                 "lr_step_epochs": 30, "val_fraction": 0.0},
    "finetune": {"epochs": 20, "batch_size": 32, "lr": 0.001, "weight_decay": 5e-4, "schedule": "inv",
                 "lr_step_epochs": 10, "val_fraction": 0.2, "pseudo_threshold": 0.95},
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
        from filterx.classes import PRESETS

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
    from filterx import atomic

    values = resolved_options(ctx)
    name = ctx.command.name
    text = (f"# options of a `filterx {name}` run (filterx {filterx.__version__}); "
            f"repeat it with: filterx {name} --config THIS_FILE\n"
            f"# the same as: {command_line(ctx, values)}\n"
            + yaml.safe_dump(values, sort_keys=False, allow_unicode=True, default_flow_style=False,
                             width=float("inf")))
    atomic.write_text(path, text)
    return path


def _beside(path: Path) -> Path:
    """Where the options of a run that wrote the single file ``path`` go."""
    path = Path(os.path.abspath(os.path.expanduser(path)))
    return path.with_name(path.name + ".filterx.yaml")


def _inside(directory: Path, command: str) -> Path:
    """Where the options of a run that wrote ``directory`` go."""
    return Path(os.path.abspath(os.path.expanduser(directory))) / f"filterx-{command}.yaml"


def _in_dataset(dataset: Path, command: str, name: str) -> Path:
    """Where the options of a run that wrote into the dataset dir ``dataset`` go."""
    from filterx.info import CONFIGS

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
                      type=click.Choice(["auto", "dali", "torchvision", "pil"]), help=BACKEND_HELP)(fn)
    fn = click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
                      help=DEVICE_HELP)(fn)
    return fn


class _RegistryChoice(click.ParamType):
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


class _DefaultOption(click.Option):
    """An option left unset (None) whose value then comes from elsewhere (a config dataclass, a
    scorer's defaults): ``show_default="90"`` shows "[default: 90]", without the parentheses
    click puts around a string default."""

    def get_help_extra(self, ctx):
        extra = super().get_help_extra(ctx)
        if isinstance(self.show_default, str):
            extra["default"] = self.show_default
        return extra


class _ListedOption(click.Option):
    """An option of a _RegistryChoice type whose --help lists the names in its help text,
    where they wrap (a long [a|b|...] metavar would run past 80 columns)."""

    def get_help_record(self, ctx):
        base = self.help
        self.help = f"{base} One of: {', '.join(self.type.names())}."
        try:
            return super().get_help_record(ctx)
        finally:
            self.help = base


def _scorer_names():
    from filterx.scorers import list_scorers

    return list_scorers()


def _model_names():
    from filterx.models import list_models

    return list_models()


EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


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


@main.command(short_help="Image folder or list file -> dataset dir (tars).")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(1), help="Samples per tar.")
@click.option("--resize-short", type=click.IntRange(8), default=None, metavar="PIXELS",
              help="Re-encode every image with its short side shrunk to this (e.g. 128 for a 112-px "
                   "pool); default: keep the original bytes.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0), help="Processes; 0 = one per core.")
@common
def shard(src, out, shard_size, resize_short, workers, quiet, verbose, as_json):
    """Turn an ImageFolder tree or a list file into a dataset dir.

    SRC is a folder with one sub-folder of images per class, or a text file of
    `path[,label]` lines. OUT (a new directory) gets WebDataset tars with DALI index files
    (OUT/shards/) and the sample index (OUT/index.zarr). Corrupt and non-image files are
    skipped and listed in OUT/shard_report.json. Re-running a killed run resumes it.

    \b
    Saves its options to: OUT/filterx-shard.yaml

    \b
    Example:
      filterx shard ~/data/imagenet/train ws/source --shard-size 1000
    """
    from filterx.shard import ShardConfig, shard as run

    _setup(quiet, verbose)
    summary = run(ShardConfig(src, out, shard_size, resize_short, workers, quiet))
    _finish(summary, as_json, _inside(out, "shard"))


@main.command("train-encoder", short_help="Train the target encoder (a ResNet) -> OUT file.")
@click.argument("target", type=EXISTING_DIR)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--arch", default="resnet18", show_default=True, type=click.Choice(["resnet18", "resnet34", "resnet50"]),
              help="torchvision ResNet, trained from scratch.")
@click.option("--resolution", default="112", show_default=True, type=click.Choice(["224", "112", "64"]),
              help="Input size in pixels; 64 is for tiny CPU runs such as the demo.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1), help="Training epochs.")
@click.option("--lr", default=0.1, show_default=True, type=float,
              help="Peak (one-cycle) learning rate for a batch of 256; scaled with --batch-size.")
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Share of each class held out to measure accuracy.")
@click.option("--seed", default=0, show_default=True, help="Seed of the split, initialisation and augmentation.")
@runtime_options(batch_size=64)
@common
def train_encoder(target, out, arch, resolution, epochs, lr, val_fraction, seed, device, backend, batch_size,
                  workers, quiet, verbose, as_json):
    """Train a ResNet on the TARGET dataset dir only; save it to the file OUT.

    OUT (e.g. ws/encoder.pt) holds the weights, architecture, resolution, class names,
    normalisation and the train/held-out split, so later commands need nothing else.

    \b
    Saves its options to: OUT.filterx.yaml

    \b
    Example:
      filterx train-encoder ws/target ws/encoder.pt --resolution 112
    """
    from filterx.encoder import EncoderConfig, train_encoder as run

    _setup(quiet, verbose)
    cfg = EncoderConfig(target, out, arch, int(resolution), epochs, batch_size, lr, val_fraction=val_fraction,
                        backend=backend, device=device, workers=workers, seed=seed, quiet=quiet)
    _finish(run(cfg), as_json, _beside(out))


@main.command(short_help="Encoder features of every sample of a dataset dir.")
@click.argument("dataset", type=EXISTING_DIR)
@click.option("--encoder", required=True, type=EXISTING_FILE, help="Encoder file from train-encoder.")
@runtime_options
@common
def embed(dataset, encoder, device, backend, batch_size, workers, quiet, verbose, as_json):
    """Compute encoder features for every sample of DATASET.

    Writes DATASET/embeddings/<encoder tag>.zarr (float16, one chunk per shard). A killed
    run re-run finishes only the shards not done; under torchrun the shards are split across
    ranks. `filterx score` embeds what it needs by itself: run this on its own to embed ahead
    of time or on several GPUs.

    \b
    Saves its options to: DATASET/configs/embed-<encoder tag>.yaml

    \b
    Examples:
      filterx embed ws/source --encoder ws/encoder.pt
      torchrun --nproc_per_node 8 -m filterx embed ws/source \\
          --encoder ws/encoder.pt
    """
    from filterx.embed import EmbedConfig, embed as run

    _setup(quiet, verbose)
    summary = run(EmbedConfig(dataset, encoder, backend, device, batch_size, workers, quiet))
    if summary.rank == 0:
        tag = summary.path.name.removesuffix(".zarr")
        _finish(summary, as_json, _in_dataset(summary.path.parent.parent, "embed", tag))


def _parse_param(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise click.BadParameter(f"{text!r} is not KEY=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().replace("-", "_"), value


# Options of `score` that map one-to-one onto scorer parameters (only passed when given).
_SCORER_OPTIONS = ("k", "distance", "order", "model", "classes", "match", "count", "random_control",
                   "solver", "damping", "labels", "val_classes", "params_", "folds")


@main.command(short_help="Score every sample of the pool with a method.")
@click.option("--method", required=True, type=_RegistryChoice("method", _scorer_names, "METHOD"), cls=_ListedOption,
              help="Scorer.")
@click.option("--source", required=True, type=EXISTING_DIR, help="Dataset dir of the pool.")
@click.option("--target", type=EXISTING_DIR, help="Dataset dir of the target (methods that compare with it).")
@click.option("--encoder", type=EXISTING_FILE, help="Encoder file from train-encoder (methods on embeddings).")
@click.option("--name", metavar="NAME", help="Store the scores under this name; default: the method's.")
@click.option("--candidates", default="source", show_default=True, type=click.Choice(["source", "target-train"]),
              help="Score the pool, or the target's own training split (influence data dropout).")
@click.option("--k", type=click.IntRange(1), cls=_DefaultOption, show_default="200",
              help="clustering: number of k-means clusters.")
@click.option("--distance", type=click.Choice(["min", "avg"]), cls=_DefaultOption, show_default="min",
              help="clustering: distance to the nearest centroid, or mean distance to all.")
@click.option("--order", type=click.Choice(["high", "low"]), cls=_DefaultOption, show_default="high",
              help="entropy: keep high (active learning) or low entropy first.")
@click.option("--model", type=click.Choice(["linear", "mlp"]), cls=_DefaultOption, show_default="linear",
              help="domain-cls: classifier on the embeddings.")
@click.option("--folds", type=click.IntRange(1), cls=_DefaultOption, show_default="1",
              help="domain-cls: cross-fitting folds.")
@click.option("--classes", metavar="SPEC",
              help="class-mask: classes to remove: names or wnids, comma-separated, @file or @office31.")
@click.option("--match", type=click.Choice(["exact", "substring"]), cls=_DefaultOption, show_default="exact",
              help="class-mask: how names match.")
@click.option("--count", type=click.IntRange(1), help="hard-classes: how many classes to remove.")
@click.option("--random-control", is_flag=True, default=None,
              help="class-mask / hard-classes: remove as many random classes instead.")
@click.option("--solver", type=click.Choice(["lissa", "cg", "exact"]), cls=_DefaultOption, show_default="cg",
              help="influence: inverse-HVP solver.")
@click.option("--damping", type=float, cls=_DefaultOption, show_default="0.01",
              help="influence: lambda added to the Hessian.")
@click.option("--labels", type=click.Choice(["pseudo", "given"]), cls=_DefaultOption, show_default="pseudo",
              help="influence: candidate labels, the classifier's or the true ones.")
@click.option("--val-classes", metavar="I,J,...", cls=_DefaultOption, show_default="all",
              help="influence: target class indexes the validation loss covers.")
@click.option("--params", "params_", type=click.Choice(["head", "last-block"]), cls=_DefaultOption,
              show_default="head", help="influence: parameters taken over.")
@click.option("-p", "--param", "extra", multiple=True, metavar="KEY=VALUE",
              help="Any other scorer parameter (repeatable), e.g. -p steps=300.")
@click.option("--seed", default=0, show_default=True, help="Random seed.")
@runtime_options
@common
def score(method, source, target, encoder, name, candidates, seed, device, backend, batch_size, workers, extra,
          quiet, verbose, as_json, **opts):
    """Score every sample of the pool with a method; store the scores with the pool.

    Writes SOURCE/scores.zarr/NAME, one float32 per sample (NaN: not scored); higher =
    keep first. With --candidates target-train the scores go to TARGET instead. Embeds the
    pool and the target first if their embeddings for the encoder are missing. Options that
    belong to one method are listed with its name; `-p KEY=VALUE` passes any other scorer
    parameter.

    \b
    Saves its options to: SOURCE/configs/score-NAME.yaml
      (TARGET/configs/score-NAME.yaml with --candidates target-train)

    \b
    Examples:
      filterx score --method clustering --source ws/source \\
          --target ws/target --encoder ws/encoder.pt --k 200
      filterx score --method domain-cls --source ws/source \\
          --target ws/target --encoder ws/encoder.pt
      filterx score --method class-mask --source ws/source --classes @office31
    """
    from filterx.score import ScoreConfig, score as run

    _setup(quiet, verbose)
    params = {}
    for key in _SCORER_OPTIONS:
        value = opts.get(key)
        if value is not None:
            pkey = "params" if key == "params_" else key
            if key == "val_classes":
                value = tuple(int(v) for v in value.split(",") if v.strip())
            params[pkey] = value
    params.update(dict(_parse_param(p) for p in extra))
    cfg = ScoreConfig(method, source, target, encoder, params, seed, name, candidates, device, backend,
                      batch_size, workers, quiet)
    summary = run(cfg)
    _finish(summary, as_json, _in_dataset(summary.dataset, "score", summary.name))


@main.command(short_help="Stored scores -> a manifest of the samples to keep.")
@click.option("--source", required=True, type=EXISTING_DIR, help="Dataset dir whose scores to select from.")
@click.option("--method", required=True, metavar="NAME",
              help="Name of the stored scores: the method, or the --name given to score.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Manifest file (.jsonl, .npy, .txt), or a directory for --format wds.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), help="Keep this share of the scored samples.")
@click.option("--count", type=click.IntRange(1), help="Keep this many samples.")
@click.option("--threshold", type=float, help="Keep every sample scoring >= this.")
@click.option("--per-class-cap", type=click.IntRange(1), help="At most this many samples of one class.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "npy", "txt", "wds"]),
              help="Manifest format; default: from the output's suffix, none = wds.")
@click.option("--txt-field", default="key", show_default=True, type=click.Choice(["key", "path"]),
              help="txt format: write sample keys or original paths.")
@click.option("--encoder", type=EXISTING_FILE, help="Refuse scores made with another encoder than this.")
@common
def select(source, method, output, fraction, count, threshold, per_class_cap, fmt, txt_field, encoder, quiet, verbose,
           as_json):
    """Turn stored scores into a manifest of the samples to keep (best first).

    Give exactly one budget: --fraction, --count or --threshold. Ties go to the lower
    sample id and unscored (NaN) samples are never kept, so the same scores give the same
    manifest. jsonl: a header line, then one line per sample (id, key, shard, label,
    score); npy: sorted ids (header in OUTPUT.json); txt: keys or paths (header in
    OUTPUT.json); wds: a directory of tars holding the selected images.

    \b
    Saves its options to: OUTPUT.filterx.yaml (wds: OUTPUT/filterx-select.yaml)

    \b
    Examples:
      filterx select --source ws/source --method domain-cls \\
          --fraction 0.06 -o subset.jsonl
      filterx select --source ws/source --method clustering \\
          --count 50000 --format wds -o ws/subset
    """
    from filterx.select import SelectConfig, select as run

    _setup(quiet, verbose)
    tag = None
    if encoder is not None:
        from filterx.embed import load_encoder_tag

        tag = load_encoder_tag(encoder)
    cfg = SelectConfig(source, method, output, fraction, count, threshold, per_class_cap, fmt, txt_field, tag, quiet)
    summary = run(cfg)
    _finish(summary, as_json, _inside(output, "select") if summary.fmt == "wds" else _beside(output))


_TRAINING_HELP = {
    "pretrain": {"lr": "Learning rate for a global batch of 256, scaled with the global batch.",
                 "val_fraction": "Without --val: share of DATA held out to evaluate on (0: none)."},
    "finetune": {"lr": "The backbone's learning rate (the new head's is x10); not scaled.",
                 "val_fraction": "Without --test: share of TARGET held out as the test split."},
}


def training_options(command: str):
    """Options shared by pretrain and finetune; unset ones take TRAINING_DEFAULTS[command]."""
    d, h = TRAINING_DEFAULTS[command], _TRAINING_HELP[command]

    def decorate(fn):
        for opt in reversed([
            click.option("--resolution", default=224, show_default=True, type=click.IntRange(16),
                         help="Input size in pixels (224 or 112 as in the literature; smaller for CPU runs)."),
            click.option("--epochs", type=click.IntRange(1), cls=_DefaultOption, show_default=str(d["epochs"]), help="Training epochs."),
            click.option("--batch-size", type=click.IntRange(1), cls=_DefaultOption, show_default=str(d["batch_size"]),
                         help="Per-rank batch size (the global batch is this x the ranks)."),
            click.option("--lr", type=float, cls=_DefaultOption, show_default=str(d["lr"]), help=h["lr"]),
            click.option("--weight-decay", type=float, cls=_DefaultOption, show_default=str(d["weight_decay"]), help="L2 weight decay."),
            click.option("--schedule", type=click.Choice(["step", "cosine", "inv"]), cls=_DefaultOption,
                         show_default=d["schedule"],
                         help="step: x0.1 every --lr-step-epochs; inv: lr (1 + 10p)^-0.75; cosine."),
            click.option("--lr-step-epochs", type=click.IntRange(1), cls=_DefaultOption,
                         show_default=str(d["lr_step_epochs"]),
                         help="Epochs between x0.1 steps (--schedule step)."),
            click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt after a kill."),
            click.option("--seed", default=0, show_default=True, help="Random seed."),
            click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
                         help=DEVICE_HELP),
            click.option("--backend", default="auto", show_default=True,
                         type=click.Choice(["auto", "dali", "torchvision", "pil"]), help=BACKEND_HELP),
            click.option("--workers", default=4, show_default=True, type=click.IntRange(0),
                         help="Decode worker processes/threads."),
        ]):
            fn = opt(fn)
        return fn

    return decorate


def _given(**kwargs) -> dict:
    """The options the user set (None means: keep the config's literature default)."""
    return {k: v for k, v in kwargs.items() if v is not None}


@main.command(short_help="Pre-train a model on a manifest or dataset dir.")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--arch", default="resnet50", show_default=True, type=_RegistryChoice("arch", _model_names),
              help="Model, trained from scratch (alexnet_lrn: AlexNet with LRN).")
@click.option("--val", type=click.Path(exists=True, path_type=Path), help="Dataset dir or manifest to evaluate on.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), cls=_DefaultOption,
              show_default=str(TRAINING_DEFAULTS["pretrain"]["val_fraction"]), help=_TRAINING_HELP["pretrain"]["val_fraction"])
@training_options("pretrain")
@common
def pretrain(data, out, arch, val, val_fraction, resolution, epochs, batch_size, lr, weight_decay, schedule,
             lr_step_epochs, resume, seed, device, backend, workers, quiet, verbose, as_json):
    """Pre-train a model on DATA: a manifest (any format) or a whole dataset dir.

    Defaults follow the literature: SGD momentum 0.9, lr 0.01 per 256 images, weight decay
    1e-4, x0.1 every 30 epochs, 90 epochs. Writes, in the directory OUT, checkpoint.pt every
    epoch (continue after a kill with --resume), metrics.jsonl (per-epoch loss, top-1, lr,
    img/s) and the final model.pt. Under torchrun it trains with DDP.

    \b
    Saves its options to: OUT/filterx-pretrain.yaml

    \b
    Examples:
      filterx pretrain subset.jsonl ws/pre --arch resnet50 --resolution 112
      torchrun --nproc_per_node 8 -m filterx pretrain ws/subset ws/pre
    """
    from filterx.train import PretrainConfig, pretrain as run

    _setup(quiet, verbose)
    cfg = PretrainConfig(data, out, arch=arch, resolution=resolution, seed=seed, device=device, backend=backend,
                         workers=workers, resume=resume, val=val, quiet=quiet,
                         **_given(val_fraction=val_fraction, epochs=epochs, batch_size=batch_size, lr=lr,
                                  weight_decay=weight_decay, schedule=schedule, lr_step_epochs=lr_step_epochs))
    _finish_rank0(run(cfg), as_json, _inside(out, "pretrain"))


@main.command(short_help="Fine-tune on the target; report its test top-1.")
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--init", type=click.Path(exists=True, path_type=Path),
              help="A pretrain model.pt / checkpoint.pt or an encoder; omit to train from scratch.")
@click.option("--arch", type=_RegistryChoice("arch", _model_names),
              help="Architecture when training from scratch; with --init, a check that it matches.")
@click.option("--test", type=click.Path(exists=True, path_type=Path), help="Target test dataset dir or manifest.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), cls=_DefaultOption,
              show_default=str(TRAINING_DEFAULTS["finetune"]["val_fraction"]), help=_TRAINING_HELP["finetune"]["val_fraction"])
@click.option("--method", default="plain", show_default=True, type=click.Choice(["plain", "dann", "pseudo-label"]),
              help="plain; or, with --unlabeled, domain adaptation.")
@click.option("--unlabeled", type=click.Path(exists=True, path_type=Path),
              help="Unlabelled target-domain dataset dir or manifest for dann / pseudo-label.")
@click.option("--freeze-backbone", is_flag=True, help="Train the new head only.")
@click.option("--pseudo-threshold", type=click.FloatRange(0, 1, min_open=True), cls=_DefaultOption,
              show_default=str(TRAINING_DEFAULTS["finetune"]["pseudo_threshold"]),
              help="pseudo-label: confidence an unlabelled image needs.")
@training_options("finetune")
@common
def finetune(target, out, init, arch, test, val_fraction, method, unlabeled, freeze_backbone, pseudo_threshold,
             resolution, epochs, batch_size, lr, weight_decay, schedule, lr_step_epochs, resume, seed, device,
             backend, workers, quiet, verbose, as_json):
    """Fine-tune on the TARGET dataset dir or manifest: a new head (lr x10), reporting the
    target test top-1 per epoch.

    Default schedule: the inverse decay lr (1 + 10p)^-0.75 of domain adaptation. With
    --unlabeled, --method dann (gradient reversal) or pseudo-label adapts to that domain.
    Writes, in the directory OUT, checkpoint.pt every epoch (--resume continues),
    metrics.jsonl and the final model.pt.

    \b
    Saves its options to: OUT/filterx-finetune.yaml

    \b
    Examples:
      filterx finetune ws/target ws/ft --init ws/pre/model.pt \\
          --test ws/target-test
      filterx finetune ws/target ws/ft-scratch --arch resnet50  # no pre-training
    """
    from filterx.train import FinetuneConfig, finetune as run

    _setup(quiet, verbose)
    if init is None and arch is None:
        raise click.UsageError("give --init (a pre-trained model) or --arch (to train from scratch)")
    cfg = FinetuneConfig(target, out, init=init, arch=arch, test=test, unlabeled=unlabeled, method=method,
                         freeze_backbone=freeze_backbone, resolution=resolution, seed=seed, device=device,
                         backend=backend, workers=workers, resume=resume, quiet=quiet,
                         **_given(val_fraction=val_fraction, pseudo_threshold=pseudo_threshold, epochs=epochs,
                                  batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule,
                                  lr_step_epochs=lr_step_epochs))
    _finish_rank0(run(cfg), as_json, _inside(out, "finetune"))


@main.command(short_help="Plots and report.md/.html of a dataset's scores.")
@click.argument("dataset", type=EXISTING_DIR)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for report.md/.html and the PNG plots (new, or an earlier report's).")
@click.option("--method", "methods", multiple=True, metavar="NAME",
              help="Stored score names to include (repeatable); default: all.")
@click.option("--fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Selection cut to mark and evaluate.")
@click.option("--grid", default=16, show_default=True, type=click.IntRange(0),
              help="Top and bottom images shown per method (0: no image grids).")
@click.option("--relevant-classes", metavar="SPEC",
              help="Class names/wnids, @file or @office31: measure each selection's precision against them.")
@common
def report(dataset, output, methods, fraction, grid, relevant_classes, quiet, verbose, as_json):
    """Plots and a summary of DATASET's stored scores: histograms with the cut, per-class
    shares, overlap between methods, and the top- and bottom-scored images.

    Writes report.md, report.html and the PNG plots to the directory OUTPUT, replacing an
    earlier report there.

    \b
    Saves its options to: OUTPUT/filterx-report.yaml

    \b
    Example:
      filterx report ws/source -o ws/report --fraction 0.06 \\
          --relevant-classes @office31
    """
    from filterx.report import make_report

    _setup(quiet, verbose)
    summary = make_report(dataset, output, methods=list(methods) or None, fraction=fraction, grid=grid,
                          relevant_classes=relevant_classes)
    _finish(summary, as_json, _inside(output, "report"))


@main.command(short_help="What a dataset dir holds (writes nothing).")
@click.argument("dataset", type=EXISTING_DIR)
@common
def info(dataset, quiet, verbose, as_json):
    """What a dataset dir holds: samples, classes, shards, embeddings, score arrays, and the
    options saved by the commands that wrote into it. Reads only; saves no options.

    \b
    Example:
      filterx info ws/source
    """
    from filterx.info import dataset_info

    _setup(quiet, verbose)
    details = dataset_info(dataset)
    if as_json:
        click.echo(json.dumps(_plain_json(details.to_dict()), sort_keys=True, allow_nan=False))
    else:
        click.echo(details.text())


@main.command(short_help="The whole chain on built-in sample data.")
@click.option("--out", default="filterx-demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Working directory (OUT) for the demo data and results.")
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(1), help="Encoder training epochs.")
@click.option("--fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Budget each method selects.")
@click.option("--seed", default=0, show_default=True, help="Seed of the sample data, training and scoring.")
@click.option("--quick", is_flag=True, help="A smaller pool and fewer epochs (about a minute, for smoke tests).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help=DEVICE_HELP)
@common
def demo(out, epochs, fraction, seed, quick, device, quiet, verbose, as_json):
    """Run the whole chain on built-in sample data and print each method's precision.

    Builds a pool (handwritten digits, photos, textures) and a target (digits 0-4 in another
    style), shards both, trains the target encoder, scores the pool with every method,
    selects a fraction, and reports how much of each selection is relevant, next to random.
    Everything goes under --out: data/, source/, target/, encoder.pt, manifests/ and the
    table in demo_results.md (and .json). A re-run reuses what is there.

    \b
    Saves its options to: OUT/filterx-demo.yaml

    \b
    Example:
      filterx demo --out /tmp/filterx-demo
    """
    from filterx.demo import DemoConfig, run_demo

    _setup(quiet, verbose)
    summary = run_demo(DemoConfig(out, epochs, fraction, seed, quick, device, quiet))
    _finish(summary, as_json, _inside(out, "demo"))


if __name__ == "__main__":
    main()
