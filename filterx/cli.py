"""The ``filterx`` command line: one click group, each command a thin layer over a library call.

User errors (bad paths, bad values, unknown methods, a locked output) exit with status 2 and
one line on stderr naming the bad value and what would be valid; no traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

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


def _emit(summary, as_json: bool) -> None:
    """Print a command's summary: its one-paragraph line, or JSON for scripts."""
    if as_json:
        from dataclasses import asdict

        click.echo(json.dumps(asdict(summary), default=str, sort_keys=True))
    else:
        click.echo(summary.line())


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


def common(fn):
    """-q/-v/--json/--config on every command."""
    fn = click.option("--config", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False,
                      callback=_load_config, help="YAML file of option values (the command line wins).")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")(fn)
    fn = click.option("-v", "--verbose", is_flag=True, help="Log more.")(fn)
    fn = click.option("-q", "--quiet", is_flag=True, help="No progress bars or info logs.")(fn)
    return fn


def runtime_options(fn=None, *, batch_size: int = 128):
    """--device/--backend/--batch-size/--workers, shared by the commands that decode images."""
    if fn is None:
        return lambda f: runtime_options(f, batch_size=batch_size)
    fn = click.option("--workers", default=2, show_default=True, type=click.IntRange(0), help="Decode worker processes/threads.")(fn)
    fn = click.option("--batch-size", default=batch_size, show_default=True, type=click.IntRange(1))(fn)
    fn = click.option("--backend", default="auto", show_default=True,
                      type=click.Choice(["auto", "dali", "torchvision", "pil"]),
                      help="Decoder: DALI, torchvision.io, or PIL with DCT-domain scaling; auto = DALI when installed.")(fn)
    fn = click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))(fn)
    return fn


EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group(cls=FilterxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="filterx")
def main():
    """filterx: pick the part of a large image pool that serves a small target dataset.

    \b
    Typical run:
      filterx shard ~/data/imagenet/train ws/source
      filterx shard ~/data/office31/webcam ws/target
      filterx train-encoder ws/target ws/encoder.pt --arch resnet18 --resolution 112
      filterx score --method clustering --source ws/source --target ws/target --encoder ws/encoder.pt
      filterx select --source ws/source --method clustering --fraction 0.06 -o subset.jsonl
    """


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(1), help="Samples per tar.")
@click.option("--resize-short", type=click.IntRange(8), default=None,
              help="Re-encode every image with its short side shrunk to this many pixels (e.g. 128 for a 112-px pool).")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0), help="Processes; 0 = one per core.")
@common
def shard(src, out, shard_size, resize_short, workers, quiet, verbose, as_json):
    """Turn an ImageFolder tree or a list file into a dataset dir.

    SRC is a folder of class sub-folders, or a text file of `path[,label]` lines. OUT gets
    WebDataset tars with DALI index files and index.zarr. Corrupt and non-image files are
    skipped and listed in OUT/shard_report.json. Re-running a killed run resumes it.

    \b
    Example:
      filterx shard ~/data/imagenet/train ws/source --shard-size 1000
    """
    from filterx.shard import ShardConfig, shard as run

    _setup(quiet, verbose)
    _emit(run(ShardConfig(src, out, shard_size, resize_short, workers, quiet)), as_json)


@main.command("train-encoder")
@click.argument("target", type=EXISTING_DIR)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--arch", default="resnet18", show_default=True, type=click.Choice(["resnet18", "resnet34", "resnet50"]))
@click.option("--resolution", default="112", show_default=True, type=click.Choice(["224", "112", "64"]),
              help="Input size; 64 is for tiny CPU runs such as the demo.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=0.1, show_default=True, type=float, help="Peak learning rate for a batch of 256.")
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Share of each class held out to measure accuracy.")
@click.option("--seed", default=0, show_default=True)
@runtime_options(batch_size=64)
@common
def train_encoder(target, out, arch, resolution, epochs, lr, val_fraction, seed, device, backend, batch_size,
                  workers, quiet, verbose, as_json):
    """Train a ResNet on the TARGET dataset dir only; save it to OUT.

    The file holds the architecture, resolution, class names, normalisation and the
    train/held-out split, so later commands need nothing else.

    \b
    Example:
      filterx train-encoder ws/target ws/encoder.pt --arch resnet18 --resolution 112
    """
    from filterx.encoder import EncoderConfig, train_encoder as run

    _setup(quiet, verbose)
    cfg = EncoderConfig(target, out, arch, int(resolution), epochs, batch_size, lr, val_fraction=val_fraction, backend=backend, device=device, workers=workers, seed=seed,
                        quiet=quiet)
    _emit(run(cfg), as_json)


@main.command()
@click.argument("dataset", type=EXISTING_DIR)
@click.option("--encoder", required=True, type=EXISTING_FILE, help="Encoder file from train-encoder.")
@runtime_options
@common
def embed(dataset, encoder, device, backend, batch_size, workers, quiet, verbose, as_json):
    """Compute encoder features for every sample of DATASET (resumable, torchrun-aware).

    Writes DATASET/embeddings/<encoder tag>.zarr (float16, one chunk per shard). A killed run
    re-run finishes only the shards not done. Under torchrun, shards are split across ranks.

    \b
    Examples:
      filterx embed ws/source --encoder ws/encoder.pt
      torchrun --nproc_per_node 8 -m filterx embed ws/source --encoder ws/encoder.pt
    """
    from filterx.embed import EmbedConfig, embed as run

    _setup(quiet, verbose)
    summary = run(EmbedConfig(dataset, encoder, backend, device, batch_size, workers, quiet))
    if summary.rank == 0:
        _emit(summary, as_json)


def _method_choices():
    from filterx.scorers import list_scorers

    return list_scorers()


class _MethodChoice(click.ParamType):
    """--method: any registered scorer; the error lists them all."""

    name = "method"

    def convert(self, value, param, ctx):
        choices = _method_choices()
        if value not in choices:
            self.fail(f"unknown method {value!r}; valid methods: {', '.join(choices)}", param, ctx)
        return value

    def get_metavar(self, param, ctx=None):
        return "[" + "|".join(_method_choices()) + "]"


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


@main.command()
@click.option("--method", required=True, type=_MethodChoice(), help="Scorer name.")
@click.option("--source", required=True, type=EXISTING_DIR, help="Dataset dir of the pool.")
@click.option("--target", type=EXISTING_DIR, help="Dataset dir of the target.")
@click.option("--encoder", type=EXISTING_FILE, help="Encoder file from train-encoder.")
@click.option("--name", help="Store the scores under this name instead of the method's.")
@click.option("--candidates", default="source", show_default=True, type=click.Choice(["source", "target-train"]),
              help="Score the pool, or the target's own training split (influence data dropout).")
@click.option("--k", type=click.IntRange(1), help="clustering: number of k-means clusters [200].")
@click.option("--distance", type=click.Choice(["min", "avg"]), help="clustering: distance to centroids [min].")
@click.option("--order", type=click.Choice(["high", "low"]), help="entropy: keep high (active) or low entropy [high].")
@click.option("--model", type=click.Choice(["linear", "mlp"]), help="domain-cls: classifier on embeddings [linear].")
@click.option("--folds", type=click.IntRange(1), help="domain-cls: cross-fitting folds [1].")
@click.option("--classes", help="class-mask: names or wnids, comma-separated, @file or @office31.")
@click.option("--match", type=click.Choice(["exact", "substring"]), help="class-mask: how names match [exact].")
@click.option("--count", type=click.IntRange(1), help="hard-classes: how many classes to remove.")
@click.option("--random-control", is_flag=True, default=None, help="class-mask / hard-classes: mask as many random classes.")
@click.option("--solver", type=click.Choice(["lissa", "cg", "exact"]), help="influence: inverse-HVP solver.")
@click.option("--damping", type=float, help="influence: lambda added to the Hessian.")
@click.option("--labels", type=click.Choice(["pseudo", "given"]), help="influence: candidate labels.")
@click.option("--val-classes", help="influence: comma-separated target class indexes for the validation loss.")
@click.option("--params", "params_", type=click.Choice(["head", "last-block"]), help="influence: parameters taken over.")
@click.option("-p", "--param", "extra", multiple=True, help="Any scorer parameter as KEY=VALUE (repeatable).")
@click.option("--seed", default=0, show_default=True)
@runtime_options
@common
def score(method, source, target, encoder, name, candidates, seed, device, backend, batch_size, workers, extra,
          quiet, verbose, as_json, **opts):
    """Score every sample of the pool with a method; store the scores with the pool.

    Embeds the pool and the target first if their embeddings for the encoder are missing.
    Options that belong to one method are listed with its name; `-p KEY=VALUE` passes any
    other scorer parameter.

    \b
    Examples:
      filterx score --method clustering --source ws/source --target ws/target --encoder ws/encoder.pt --k 200
      filterx score --method domain-cls --source ws/source --target ws/target --encoder ws/encoder.pt
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
    _emit(run(cfg), as_json)


@main.command()
@click.option("--source", required=True, type=EXISTING_DIR, help="Dataset dir whose scores to select from.")
@click.option("--method", required=True, help="Name of the stored scores (the method, or --name given to score).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Manifest file (.jsonl, .npy, .txt) or a directory for --format wds.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), help="Keep this share of the scored samples, in (0, 1].")
@click.option("--count", type=click.IntRange(1), help="Keep this many samples.")
@click.option("--threshold", type=float, help="Keep every sample scoring >= this.")
@click.option("--per-class-cap", type=click.IntRange(1), help="At most this many samples of one class.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "npy", "txt", "wds"]), help="Default: from the output name.")
@click.option("--txt-field", default="key", show_default=True, type=click.Choice(["key", "path"]),
              help="txt format: write sample keys or original paths.")
@click.option("--encoder", type=EXISTING_FILE, help="Refuse scores that were made with another encoder than this.")
@common
def select(source, method, output, fraction, count, threshold, per_class_cap, fmt, txt_field, encoder, quiet, verbose,
           as_json):
    """Turn stored scores into a manifest of the samples to keep (best first).

    \b
    Examples:
      filterx select --source ws/source --method domain-cls --fraction 0.06 -o subset.jsonl
      filterx select --source ws/source --method clustering --count 50000 --format wds -o ws/subset
    """
    from filterx.select import SelectConfig, select as run

    _setup(quiet, verbose)
    tag = None
    if encoder is not None:
        from filterx.embed import load_encoder_tag

        tag = load_encoder_tag(encoder)
    cfg = SelectConfig(source, method, output, fraction, count, threshold, per_class_cap, fmt, txt_field, tag, quiet)
    _emit(run(cfg), as_json)


@main.command()
@click.option("--out", default="filterx-demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Working directory for the demo data and results.")
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(1), help="Encoder training epochs.")
@click.option("--fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Budget each method selects.")
@click.option("--seed", default=0, show_default=True)
@click.option("--quick", is_flag=True, help="A smaller pool and fewer epochs (about a minute, for smoke tests).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@common
def demo(out, epochs, fraction, seed, quick, device, quiet, verbose, as_json):
    """Run the whole chain on built-in sample data and print each method's precision.

    Builds a pool (handwritten digits, photos, textures) and a target (digits 0-4 in another
    style), shards both, trains the target encoder, scores the pool with every method,
    selects a fraction, and reports how much of each selection is relevant, next to random.

    \b
    Example:
      filterx demo --out /tmp/filterx-demo
    """
    from filterx.demo import DemoConfig, run_demo

    _setup(quiet, verbose)
    summary = run_demo(DemoConfig(out, epochs, fraction, seed, quick, device, quiet))
    _emit(summary, as_json)


def _arch_choice():
    from filterx.models import list_models

    return click.Choice(list_models())


def training_options(fn):
    """Options shared by pretrain and finetune."""
    for opt in reversed([
        click.option("--resolution", default=224, show_default=True, type=click.IntRange(16),
                     help="Input size (224 or 112 as in the literature; smaller for CPU runs)."),
        click.option("--epochs", type=click.IntRange(1), help="Training epochs."),
        click.option("--batch-size", type=click.IntRange(1), help="Per-rank batch size."),
        click.option("--lr", type=float, help="Learning rate."),
        click.option("--weight-decay", type=float, help="L2 weight decay."),
        click.option("--schedule", type=click.Choice(["step", "cosine", "inv"]),
                     help="step: x0.1 every --lr-step-epochs; inv: lr (1 + 10p)^-0.75; cosine."),
        click.option("--lr-step-epochs", type=click.IntRange(1), help="Epochs between x0.1 steps."),
        click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt after a kill."),
        click.option("--seed", default=0, show_default=True),
        click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])),
        click.option("--backend", default="auto", show_default=True,
                     type=click.Choice(["auto", "dali", "torchvision", "pil"])),
        click.option("--workers", default=4, show_default=True, type=click.IntRange(0)),
    ]):
        fn = opt(fn)
    return fn


def _given(**kwargs) -> dict:
    """The options the user set (None means: keep the config's literature default)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _emit_rank0(summary, as_json: bool) -> None:
    from filterx.runtime import dist_info

    if dist_info().is_main:
        _emit(summary, as_json)


@main.command()
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--arch", default="resnet50", show_default=True, type=_arch_choice())
@click.option("--val", type=click.Path(exists=True, path_type=Path), help="Dataset dir or manifest to evaluate on.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), help="Else hold out this share.")
@training_options
@common
def pretrain(data, out, arch, val, val_fraction, resolution, epochs, batch_size, lr, weight_decay, schedule,
             lr_step_epochs, resume, seed, device, backend, workers, quiet, verbose, as_json):
    """Pre-train a model on a manifest (any format) or a whole dataset dir.

    Defaults follow the literature: SGD momentum 0.9, lr 0.01 per 256 images, weight decay
    1e-4, x0.1 every 30 epochs, 90 epochs. Writes OUT/checkpoint.pt every epoch (resume with
    --resume), OUT/metrics.jsonl and OUT/model.pt. Under torchrun it trains with DDP.

    \b
    Examples:
      filterx pretrain subset.jsonl ws/pre --arch resnet50 --resolution 112
      torchrun --nproc_per_node 8 -m filterx pretrain ws/subset ws/pre --arch resnet50
    """
    from filterx.train import PretrainConfig, pretrain as run

    _setup(quiet, verbose)
    cfg = PretrainConfig(data, out, arch=arch, resolution=resolution, seed=seed, device=device, backend=backend,
                         workers=workers, resume=resume, val=val, quiet=quiet,
                         **_given(val_fraction=val_fraction, epochs=epochs, batch_size=batch_size, lr=lr,
                                  weight_decay=weight_decay, schedule=schedule, lr_step_epochs=lr_step_epochs))
    _emit_rank0(run(cfg), as_json)


@main.command()
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--init", type=click.Path(exists=True, path_type=Path),
              help="A pretrain model.pt / checkpoint.pt or an encoder; omit to train from scratch.")
@click.option("--arch", type=_arch_choice(), help="Architecture when training from scratch.")
@click.option("--test", type=click.Path(exists=True, path_type=Path), help="Target test dataset dir or manifest.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True),
              help="Without --test: share of TARGET held out as the test split [0.2].")
@click.option("--method", default="plain", show_default=True, type=click.Choice(["plain", "dann", "pseudo-label"]))
@click.option("--unlabeled", type=click.Path(exists=True, path_type=Path),
              help="Unlabelled target-domain dataset for dann / pseudo-label.")
@click.option("--freeze-backbone", is_flag=True, help="Train the new head only.")
@click.option("--pseudo-threshold", type=click.FloatRange(0, 1), help="pseudo-label: confidence cut-off [0.95].")
@training_options
@common
def finetune(target, out, init, arch, test, val_fraction, method, unlabeled, freeze_backbone, pseudo_threshold,
             resolution, epochs, batch_size, lr, weight_decay, schedule, lr_step_epochs, resume, seed, device,
             backend, workers, quiet, verbose, as_json):
    """Fine-tune on the target: a new head (lr x10), reporting target test top-1 per epoch.

    Default schedule: the inverse decay lr (1 + 10p)^-0.75 of domain adaptation. With
    --unlabeled, --method dann (gradient reversal) or pseudo-label adapts to that domain.

    \b
    Examples:
      filterx finetune ws/target ws/ft --init ws/pre/model.pt --test ws/target-test
      filterx finetune ws/target ws/ft-scratch --arch resnet50      # the no-pre-training baseline
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
    _emit_rank0(run(cfg), as_json)


@main.command()
@click.argument("dataset", type=EXISTING_DIR)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for report.md/.html and the PNG plots.")
@click.option("--method", "methods", multiple=True, help="Stored score names to include (repeatable); default: all.")
@click.option("--fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Selection cut to mark and evaluate.")
@click.option("--grid", default=16, show_default=True, type=click.IntRange(0),
              help="Top and bottom images shown per method (0: no image grids).")
@click.option("--relevant-classes", help="Class names/wnids (or @file) to measure each selection's precision against.")
@common
def report(dataset, output, methods, fraction, grid, relevant_classes, quiet, verbose, as_json):
    """Plots and a summary of a dataset's scores: histograms with the cut, per-class shares,
    overlap between methods, and the top- and bottom-scored images.

    \b
    Example:
      filterx report ws/source -o ws/report --fraction 0.06 --relevant-classes @office31
    """
    from filterx.report import make_report

    _setup(quiet, verbose)
    summary = make_report(dataset, output, methods=list(methods) or None, fraction=fraction, grid=grid,
                          relevant_classes=relevant_classes)
    click.echo(json.dumps(summary.to_dict(), default=str, sort_keys=True) if as_json else summary.line())


@main.command()
@click.argument("dataset", type=EXISTING_DIR)
@common
def info(dataset, quiet, verbose, as_json):
    """What a dataset dir holds: samples, classes, shards, embeddings, score arrays.

    \b
    Example:
      filterx info ws/source
    """
    from filterx.info import dataset_info

    _setup(quiet, verbose)
    details = dataset_info(dataset)
    click.echo(json.dumps(details.to_dict(), default=str, sort_keys=True) if as_json else details.text())


if __name__ == "__main__":
    main()
