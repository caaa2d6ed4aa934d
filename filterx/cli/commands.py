"""The ``filterx`` command line: one click group, each command a thin layer over a library call.

User errors (bad paths, bad values, unknown methods, a locked output) exit with status 2 and
one line on stderr naming the bad value and what would be valid; no traceback.

Every command prints a one-paragraph summary on stdout (``--json``: the same as one JSON
object; progress bars and logs go to stderr), and every command that writes saves the option
values it ran with, as YAML that ``--config`` reads back, next to its outputs (where:
``filterx.cli.common``).
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import click

from filterx.cli.common import (
    BACKBONE, BACKEND_HELP, DEVICE_HELP, ENCODER, EXISTING_DIR, TRAINING_DEFAULTS, DefaultOption, ListedOption,
    RegistryChoice, ScoreCommand, backend_names, beside, check_runner, common, encoder_arch_names, finish,
    finish_rank0, format_names, in_dataset, inside, model_names, plain_json, runner_options, runtime_options,
    scorer_names, setup,
)

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


@main.command(short_help="Image folder or list file -> dataset dir (tars).")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(1), help="Samples per tar.")
@click.option("--resize-short", type=click.IntRange(8), default=None, metavar="PIXELS",
              help="Re-encode every image with its short side shrunk to this (e.g. 128 for a 112-px "
                   "pool); default: keep the original bytes.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0),
              help="Processes; 0 = one per core (--runner ray: actors; 0 = one per CPU of the cluster).")
@click.option("--num-classes", type=click.IntRange(1), default=None, metavar="N",
              help="List files with integer labels: there are N classes (labels 0..N-1). Needed when a "
                   "label is >= the number of labelled lines, which is otherwise refused as a typo.")
@runner_options(actors=False)
@common
def shard(src, out, shard_size, resize_short, workers, num_classes, runner, address, quiet, verbose, as_json):
    """Turn an ImageFolder tree or a list file into a dataset dir.

    SRC is a folder with one sub-folder of images per class, or a text file of
    `path[,label]` lines. OUT (a new directory) gets WebDataset tars with DALI index files
    (OUT/shards/) and the sample index (OUT/index.zarr). Corrupt and non-image files are
    skipped and listed in OUT/shard_report.json. Re-running a killed run resumes it.

    List file labels are all integers (class indexes 0..K-1) or all class names; a label of
    the other kind, an empty or negative label, or an integer label >= the number of
    labelled lines without --num-classes is refused, naming the line. A first line
    `path,label` (or file/filename..., class/category...) is a header and skipped.

    \b
    Saves its options to: OUT/filterx-shard.yaml

    \b
    Example:
      filterx shard ~/data/imagenet/train ws/source --shard-size 1000
      filterx shard train_list.txt ws/source --num-classes 1000
      filterx shard /nfs/train /nfs/ws/source --runner ray --address auto
    """
    from filterx.stages.shard import ShardConfig, shard as run

    check_runner(runner, address)
    setup(quiet, verbose)
    summary = run(ShardConfig(src, out, shard_size, resize_short, workers, quiet, num_classes, runner, address))
    finish_rank0(summary, as_json, inside(out, "shard"))


@main.command("train-encoder", short_help="Train the target encoder (a ResNet, or a probe on a backbone) -> OUT.")
@click.argument("target", type=EXISTING_DIR)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--arch", default="resnet18", show_default=True, type=RegistryChoice("arch", encoder_arch_names),
              help="torchvision ResNet, trained from scratch.")
@click.option("--resolution", default="112", show_default=True, type=click.Choice(["224", "112", "64"]),
              help="Input size in pixels; 64 is for tiny CPU runs such as the demo.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1), help="Training epochs.")
@click.option("--lr", default=0.1, show_default=True, type=float,
              help="Peak (one-cycle) learning rate for a batch of 256; scaled with --batch-size.")
@click.option("--weight-decay", default=5e-4, show_default=True, type=click.FloatRange(0),
              help="L2 weight decay (of the ResNet, or of the probe's mean cross-entropy objective).")
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Share of each class held out to measure accuracy.")
@click.option("--backbone", type=BACKBONE, default=None,
              help="A pretrained backbone spec (torchvision:MODEL[:WEIGHTS][@FILE], timm:..., open_clip:...); "
                   "with --probe-only: a linear probe on its frozen features instead of a ResNet.")
@click.option("--probe-only", is_flag=True, help="Train only a linear probe on --backbone's frozen features.")
@click.option("--objective", default="supervised", show_default=True, type=click.Choice(["supervised", "moco"]),
              help="moco: MoCo v2 on the target's images without labels (and --with-pool's), then a linear probe on "
                   "the target labels as the head; --epochs then defaults to 200 and --lr to 0.03 (cosine), "
                   "--weight-decay is the probe's.")
@click.option("--with-pool", type=EXISTING_DIR, default=None, metavar="DATASET",
              help="--objective moco: the pool's images join the contrastive training (a large pool for a small target).")
@click.option("--seed", default=0, show_default=True, help="Seed of the split, initialisation and augmentation.")
@runtime_options(batch_size=64)
@common
def train_encoder(target, out, arch, resolution, epochs, lr, weight_decay, val_fraction, backbone, probe_only,
                  objective, with_pool, seed, device, backend, batch_size, workers, quiet, verbose, as_json):
    """Train a ResNet on the TARGET dataset dir only (or, with --backbone SPEC --probe-only, a
    linear probe on a frozen pretrained backbone); save it to the file OUT.

    OUT (e.g. ws/encoder.pt) holds the weights (for a probe: the backbone spec and the probe),
    architecture, resolution, class names, normalisation and the train/held-out split, so
    later commands need nothing else: embed and score take --encoder OUT.

    \b
    Saves its options to: OUT.filterx.yaml

    \b
    Examples:
      filterx train-encoder ws/target ws/encoder.pt --resolution 112
      filterx train-encoder ws/target ws/probe.pt --probe-only \\
          --backbone torchvision:resnet50:IMAGENET1K_V2
      filterx train-encoder ws/target ws/moco.pt --objective moco \\
          --with-pool ws/source
    """
    setup(quiet, verbose)
    if objective == "moco" or with_pool is not None:
        _train_moco_encoder(locals())
        return
    if probe_only or backbone is not None:
        ctx = click.get_current_context()
        if backbone is None:
            raise click.UsageError("--probe-only needs --backbone SPEC (the frozen backbone to probe)")
        if not probe_only:
            raise click.UsageError("--backbone trains only a linear probe on the frozen backbone for now; "
                                   "add --probe-only")
        given = [f"--{n.replace('_', '-')}" for n in ("arch", "resolution", "epochs", "lr")
                 if ctx.get_parameter_source(n) is click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to a probe (the backbone's own preprocessing "
                                   "sets the resolution; the probe is solved to convergence)")
        from filterx.stages.probe import ProbeConfig, train_probe

        cfg = ProbeConfig(target, out, backbone, weight_decay=weight_decay, val_fraction=val_fraction, seed=seed,
                          backend=backend, device=device, batch_size=batch_size, workers=workers, quiet=quiet)
        finish(train_probe(cfg), as_json, beside(out))
        return
    from filterx.train.encoder import EncoderConfig, train_encoder as run

    cfg = EncoderConfig(target, out, arch, int(resolution), epochs, batch_size, lr, weight_decay=weight_decay,
                        val_fraction=val_fraction, backend=backend, device=device, workers=workers, seed=seed,
                        quiet=quiet)
    finish(run(cfg), as_json, beside(out))


def _train_moco_encoder(opts: dict) -> None:
    """train-encoder --objective moco: its option checks and defaults (MoCo v2's 200 epochs, lr 0.03)."""
    from filterx.stages.moco_encoder import MocoEncoderConfig, train_moco_encoder

    if opts["objective"] != "moco":
        raise click.UsageError("--with-pool joins the pool to contrastive training; add --objective moco")
    if opts["probe_only"] or opts["backbone"] is not None:
        raise click.UsageError("--objective moco trains its own backbone; it takes no --backbone / --probe-only")
    ctx = click.get_current_context()
    for name, value in (("epochs", 200), ("lr", 0.03)):
        if ctx.get_parameter_source(name) is click.core.ParameterSource.DEFAULT:
            ctx.params[name] = opts[name] = value
    cfg = MocoEncoderConfig(opts["target"], opts["out"], opts["arch"], int(opts["resolution"]), opts["epochs"],
                            opts["batch_size"], opts["lr"], weight_decay=opts["weight_decay"],
                            val_fraction=opts["val_fraction"], with_pool=opts["with_pool"], backend=opts["backend"],
                            device=opts["device"], workers=opts["workers"], seed=opts["seed"], quiet=opts["quiet"])
    finish(train_moco_encoder(cfg), opts["as_json"], beside(opts["out"]))


@main.command(short_help="Encoder features of every sample of a dataset dir.")
@click.argument("dataset", type=EXISTING_DIR)
@click.option("--encoder", required=True, type=ENCODER,
              help="Encoder file from train-encoder, or a backbone spec, e.g. torchvision:resnet50:IMAGENET1K_V2 "
                   "or timm:MODEL@weights.safetensors (README: Encoders).")
@runtime_options
@runner_options
@common
def embed(dataset, encoder, device, backend, batch_size, workers, runner, actors, address, quiet, verbose, as_json):
    """Compute encoder features for every sample of DATASET.

    Writes DATASET/embeddings/<encoder tag>.zarr (float16, one chunk per shard). A killed
    run re-run finishes only the shards not done; under torchrun the shards are split across
    ranks, with --runner ray over Ray actors (one per GPU, each holding the model; one shard
    per task). `filterx score` embeds what it needs by itself: run this on its own to embed
    ahead of time or on several GPUs.

    \b
    Saves its options to: DATASET/configs/embed-<encoder tag>.yaml

    \b
    Examples:
      filterx embed ws/source --encoder ws/encoder.pt
      filterx embed ws/source --encoder torchvision:resnet50:IMAGENET1K_V2
      torchrun --nproc_per_node 8 -m filterx embed ws/source \\
          --encoder ws/encoder.pt
      filterx embed /nfs/ws/source --encoder /nfs/ws/encoder.pt \\
          --runner ray --address auto
    """
    from filterx.stages.embed import EmbedConfig, embed as run

    check_runner(runner, address, actors)
    setup(quiet, verbose)
    summary = run(EmbedConfig(dataset, encoder, backend, device, batch_size, workers, quiet, runner, address, actors))
    if summary.rank == 0:
        tag = summary.path.name.removesuffix(".zarr")
        finish(summary, as_json, in_dataset(summary.path.parent.parent, "embed", tag))


def _parse_param(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise click.BadParameter(f"{text!r} is not KEY=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().replace("-", "_"), value


@main.command(cls=ScoreCommand, short_help="Score every sample of the pool with a method.")
@click.option("--method", required=True, type=RegistryChoice("method", scorer_names, "METHOD"), cls=ListedOption,
              help="Scorer.")
@click.option("--source", required=True, type=EXISTING_DIR, help="Dataset dir of the pool.")
@click.option("--target", type=EXISTING_DIR, help="Dataset dir of the target (methods that compare with it).")
@click.option("--encoder", type=ENCODER,
              help="Encoder file from train-encoder, or a backbone spec such as torchvision:resnet50:IMAGENET1K_V2 "
                   "(methods on embeddings; entropy and influence need a file with a head).")
@click.option("--name", metavar="NAME", help="Store the scores under this name; default: the method's.")
@click.option("--candidates", default="source", show_default=True, type=click.Choice(["source", "target-train"]),
              help="Score the pool, or the target's own training split (influence data dropout).")
@click.option("-p", "--param", "extra", multiple=True, metavar="KEY=VALUE",
              help="Any other scorer parameter (repeatable), e.g. -p steps=300.")
@click.option("--seed", default=0, show_default=True, help="Random seed.")
@runtime_options
@runner_options
@common
def score(method, source, target, encoder, name, candidates, seed, device, backend, batch_size, workers, extra,
          runner, actors, address, quiet, verbose, as_json, **opts):
    """Score every sample of the pool with a method; store the scores with the pool.

    Writes SOURCE/scores.zarr/NAME, one float32 per sample (NaN: not scored); higher =
    keep first. With --candidates target-train the scores go to TARGET instead. Embeds the
    pool and the target first if their embeddings for the encoder are missing. Options that
    belong to one method are listed with its name; `-p KEY=VALUE` passes any other scorer
    parameter. --runner applies to the embedding it does; the scoring itself (including the
    pixel pass of --params last-block influence) runs in this process.

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
    from filterx.stages.score import ScoreConfig, score as run

    check_runner(runner, address, actors)
    setup(quiet, verbose)
    # the method options the registry declares (ScoreCommand), passed only when given
    params = {key.rstrip("_"): value for key, value in opts.items() if value is not None}
    if isinstance(params.get("val_classes"), str):
        params["val_classes"] = tuple(int(v) for v in params["val_classes"].split(",") if v.strip())
    params.update(dict(_parse_param(p) for p in extra))
    cfg = ScoreConfig(method, source, target, encoder, params, seed, name, candidates, device, backend,
                      batch_size, workers, quiet, runner, address, actors)
    summary = run(cfg)
    if summary.rank == 0:  # under torchrun the other ranks only embedded their share
        finish(summary, as_json, in_dataset(summary.dataset, "score", summary.name))


@main.command(short_help="Stored scores -> a manifest of the samples to keep.")
@click.option("--source", required=True, type=EXISTING_DIR, help="Dataset dir whose scores to select from.")
@click.option("--method", required=True, metavar="NAME[,NAME...]",
              help="Name of the stored scores: the method, or the --name given to score; "
                   "several, comma-separated, with --combine.")
@click.option("--combine", type=click.Choice(["rank-mean", "rank-min"]),
              help="Fuse several --method scores by rank: the mean of their normalised ranks, or the best one.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Manifest file (.jsonl, .npy, .txt), or a directory for --format wds.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), help="Keep this share of the scored samples.")
@click.option("--count", type=click.IntRange(1), help="Keep this many samples.")
@click.option("--threshold", type=float, help="Keep every sample scoring >= this (a number, not nan).")
@click.option("--per-class-cap", type=click.IntRange(1),
              help="At most this many samples of one class; unlabelled samples (label -1) are not capped.")
@click.option("--format", "fmt", type=RegistryChoice("format", format_names),
              help="Manifest format; default: from the output's suffix, none = wds.")
@click.option("--txt-field", default="key", show_default=True, type=click.Choice(["key", "path"]),
              help="txt format: write sample keys or original paths.")
@click.option("--encoder", type=ENCODER, help="Refuse scores made with another encoder (file or spec) than this.")
@common
def select(source, method, combine, output, fraction, count, threshold, per_class_cap, fmt, txt_field, encoder, quiet,
           verbose, as_json):
    """Turn stored scores into a manifest of the samples to keep (best first).

    Give exactly one budget: --fraction, --count or --threshold. Ties go to the lower
    sample id and unscored (NaN) samples are never kept, so the same scores give the same
    manifest; a budget that keeps nothing (a threshold above every score) writes an empty
    manifest and warns why. --per-class-cap leaves unlabelled samples (label -1) uncapped.
    --method A,B with --combine (rank-mean or rank-min) selects from a fusion of several scores:
    each turned into ranks (ties share their average rank; a sample some score leaves NaN is
    never kept), then their mean or best rank; the header records the methods and the rule.
    jsonl: a header line, then one line per sample (id, key, shard, label, score); npy:
    sorted ids (header in OUTPUT.json); txt: keys or paths (header in OUTPUT.json); wds: a
    directory of tars holding the selected images.

    \b
    Saves its options to: OUTPUT.filterx.yaml (wds: OUTPUT/filterx-select.yaml)

    \b
    Examples:
      filterx select --source ws/source --method domain-cls \\
          --fraction 0.06 -o subset.jsonl
      filterx select --source ws/source --method clustering \\
          --count 50000 --format wds -o ws/subset
      filterx select --source ws/source --method knn-target,domain-cls \\
          --combine rank-mean --fraction 0.06 -o subset.jsonl
    """
    from filterx.stages.select import SelectConfig, select as run

    setup(quiet, verbose)
    tag = None
    if encoder is not None:
        from filterx.stages.embed import load_encoder_tag

        tag = load_encoder_tag(encoder)
    cfg = SelectConfig(source, method, output, fraction, count, threshold, per_class_cap, fmt, txt_field, tag, quiet,
                       combine)
    summary = run(cfg)
    finish(summary, as_json, inside(output, "select") if summary.fmt == "wds" else beside(output))


_TRAINING_HELP = {
    "pretrain": {"lr": "Learning rate for a global batch of 256, scaled with the global batch "
                       "(ResNets: Goyal et al.; alexnet_lrn: the BVLC AlexNet solver).",
                 "lr_shown": "0.1 ResNets, 0.01 alexnet_lrn",
                 "val_fraction": "Without --val: share of DATA held out to evaluate on (0: none)."},
    "finetune": {"lr": "The backbone's learning rate (the new head's is x10); not scaled.",
                 "val_fraction": "Share of each training class held out to choose the epoch reported "
                                 "(0: none, the last epoch is reported); never the test data.",
                 "test_fraction": "Without --test: share of each TARGET class held out as the test split."},
}


def training_options(command: str):
    """Options shared by pretrain and finetune; unset ones take TRAINING_DEFAULTS[command]."""
    d, h = TRAINING_DEFAULTS[command], _TRAINING_HELP[command]

    def decorate(fn):
        for opt in reversed([
            click.option("--resolution", default=224, show_default=True, type=click.IntRange(16),
                         help="Input size in pixels (224 or 112 as in the literature; smaller for CPU runs)."),
            click.option("--epochs", type=click.IntRange(1), cls=DefaultOption, show_default=str(d["epochs"]), help="Training epochs."),
            click.option("--batch-size", type=click.IntRange(1), cls=DefaultOption, show_default=str(d["batch_size"]),
                         help="Per-rank batch size (the global batch is this x the ranks)."),
            click.option("--lr", type=float, cls=DefaultOption, show_default=h.get("lr_shown", str(d["lr"])),
                         help=h["lr"]),
            click.option("--weight-decay", type=float, cls=DefaultOption, show_default=str(d["weight_decay"]), help="L2 weight decay."),
            click.option("--schedule", type=click.Choice(["step", "cosine", "inv"]), cls=DefaultOption,
                         show_default=d["schedule"],
                         help="step: x0.1 every --lr-step-epochs; inv: lr (1 + 10p)^-0.75; cosine."),
            click.option("--lr-step-epochs", type=click.IntRange(1), cls=DefaultOption,
                         show_default=str(d["lr_step_epochs"]),
                         help="Epochs between x0.1 steps (--schedule step)."),
            click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt after a kill."),
            click.option("--seed", default=0, show_default=True, help="Random seed."),
            click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
                         help=DEVICE_HELP),
            click.option("--backend", default="auto", show_default=True,
                         type=RegistryChoice("backend", backend_names), help=BACKEND_HELP),
            click.option("--workers", type=click.IntRange(0), cls=DefaultOption, show_default="min(4, cores)",
                         help="Decode worker processes/threads; default: the cores available, at most 4."),
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
@click.option("--arch", default="resnet50", show_default=True, type=RegistryChoice("arch", model_names),
              help="Model, trained from scratch (alexnet_lrn: AlexNet with LRN).")
@click.option("--val", type=click.Path(exists=True, path_type=Path), help="Dataset dir or manifest to evaluate on.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), cls=DefaultOption,
              show_default=str(TRAINING_DEFAULTS["pretrain"]["val_fraction"]), help=_TRAINING_HELP["pretrain"]["val_fraction"])
@click.option("--objective", default="supervised", show_default=True, type=click.Choice(["supervised", "moco"]),
              help="moco: MoCo v2 without labels; unset options then take its recipe: 200 epochs, lr 0.03 per 256, "
                   "cosine, weight decay 1e-4.")
@click.option("--moco-queue", type=click.IntRange(1), default=None, show_default="65536, less for a small dataset",
              help="moco: negatives in the queue (largest power of two up to half the images when under 131072).")
@click.option("--moco-momentum", default=0.999, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="moco: key encoder momentum (moving average).")
@click.option("--moco-temperature", default=0.2, show_default=True, type=click.FloatRange(0, min_open=True),
              help="moco: InfoNCE temperature.")
@click.option("--adv-eps", default=0.0, show_default=True, type=click.FloatRange(0),
              help="PGD adversarial training (Madry et al.) with this radius, in pixels [0, 1] (0: standard "
                   "training). Robust-transfer studies: L2 1 and 3 at 224 px; Madry et al.: L-inf 8/255 = 0.0314.")
@click.option("--adv-norm", default="l2", show_default=True, type=click.Choice(["l2", "linf"]),
              help="The ball of the attack: L2 over the whole image, or L-inf per pixel value.")
@click.option("--adv-steps", default=7, show_default=True, type=click.IntRange(1),
              help="PGD steps, from a random point of the ball (7: the robustness library's default; "
                   "Salman et al.'s robust ImageNet models: 3).")
@click.option("--adv-step-size", type=click.FloatRange(0, min_open=True), cls=DefaultOption,
              show_default="2.5 * eps / steps", help="PGD step size (the rule of Madry et al. and the "
                                                     "robustness library).")
@training_options("pretrain")
@common
def pretrain(data, out, arch, val, val_fraction, objective, moco_queue, moco_momentum, moco_temperature, adv_eps,
             adv_norm, adv_steps, adv_step_size, resolution, epochs, batch_size, lr, weight_decay, schedule,
             lr_step_epochs, resume, seed, device, backend, workers, quiet, verbose, as_json):
    """Pre-train a model on DATA: a manifest (any format) or a whole dataset dir.

    Defaults follow the literature: SGD momentum 0.9, lr 0.1 per 256 images for ResNets (0.01
    for alexnet_lrn), weight decay 1e-4, x0.1 every 30 epochs, 90 epochs. Writes, in the
    directory OUT, checkpoint.pt every epoch (continue after a kill with --resume),
    metrics.jsonl (per-epoch loss, top-1, lr, img/s) and the final model.pt. Under torchrun
    it trains with DDP. With --adv-eps it trains on PGD adversarial examples of each augmented
    batch and logs val_robust_top1 (the held-out data under the same attack) beside val_top1.

    --objective moco (labels unread): MoCo v2 (Chen et al. 2020): momentum key encoder
    (0.999), a queue of 65536 negatives, InfoNCE at temperature 0.2, an MLP projection head
    (2048-2048-128 for resnet50), two crops with RandomResizedCrop(0.2-1), colour jitter
    0.4/0.4/0.4/0.1 (p 0.8), grayscale (p 0.2), Gaussian blur (p 0.5) and flips; SGD lr 0.03
    per 256, weight decay 1e-4, cosine, 200 epochs. Under torchrun: shuffled BatchNorm and
    the keys of every rank in the queue. OUT also gets model_torchvision.pth (the backbone
    as a plain torchvision state dict, no fc); finetune --init OUT/model.pt takes it.

    \b
    Saves its options to: OUT/filterx-pretrain.yaml

    \b
    Examples:
      filterx pretrain subset.jsonl ws/pre --arch resnet50 --resolution 112
      filterx pretrain subset.jsonl ws/moco --objective moco --arch resnet50
      torchrun --nproc_per_node 8 -m filterx pretrain ws/subset ws/pre
      filterx pretrain ws/subset ws/pre-l2-3 --adv-eps 3 --val-fraction 0.05
    """
    from filterx.train.pretrain import PretrainConfig, pretrain as run

    setup(quiet, verbose)
    given = _given(workers=workers, val_fraction=val_fraction, epochs=epochs, batch_size=batch_size, lr=lr,
                   weight_decay=weight_decay, schedule=schedule, lr_step_epochs=lr_step_epochs)
    if objective == "moco":
        from filterx.train.moco_pretrain import MOCO_DEFAULTS

        ctx = click.get_current_context()
        for key, value in MOCO_DEFAULTS.items():  # what the run takes is what its options file says
            if ctx.params.get(key) is None:
                ctx.params[key] = value
        given = {**MOCO_DEFAULTS, **given}
    cfg = PretrainConfig(data, out, arch=arch, resolution=resolution, seed=seed, device=device, backend=backend,
                         resume=resume, val=val, quiet=quiet, objective=objective, moco_queue=moco_queue,
                         moco_momentum=moco_momentum, moco_temperature=moco_temperature, adv_eps=adv_eps,
                         adv_norm=adv_norm, adv_steps=adv_steps, adv_step_size=adv_step_size, **given)
    finish_rank0(run(cfg), as_json, inside(out, "pretrain"))


@main.command(short_help="Fine-tune on the target; report its test top-1.")
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--init", type=click.Path(exists=True, path_type=Path),
              help="A pretrain model.pt / checkpoint.pt or an encoder; omit to train from scratch.")
@click.option("--arch", type=RegistryChoice("arch", model_names),
              help="Architecture when training from scratch; with --init, a check that it matches.")
@click.option("--test", type=click.Path(exists=True, path_type=Path), help="Target test dataset dir or manifest.")
@click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), cls=DefaultOption,
              show_default=str(TRAINING_DEFAULTS["finetune"]["test_fraction"]),
              help=_TRAINING_HELP["finetune"]["test_fraction"])
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), cls=DefaultOption,
              show_default=str(TRAINING_DEFAULTS["finetune"]["val_fraction"]), help=_TRAINING_HELP["finetune"]["val_fraction"])
@click.option("--method", default="plain", show_default=True, type=click.Choice(["plain", "dann", "pseudo-label"]),
              help="plain; or, with --unlabeled, domain adaptation.")
@click.option("--unlabeled", type=click.Path(exists=True, path_type=Path),
              help="Unlabelled target-domain dataset dir or manifest for dann / pseudo-label.")
@click.option("--freeze-backbone", is_flag=True,
              help="Train the new head only (the same as --train-blocks 0); BatchNorm statistics stay as loaded.")
@click.option("--init-blocks", type=click.IntRange(0), metavar="N",
              help="With --init: load only the stem and the first N stages, re-initialise the rest. "
                   "Stages: ResNets layer1-4 (N 0-4), alexnet_lrn conv1-5, fc6, fc7 (N 0-7; no stem). "
                   "Default: all.")
@click.option("--train-blocks", type=click.IntRange(0), metavar="K",
              help="Train only the last K stages and the head; the stem and earlier stages are frozen "
                   "(no gradient, modules in eval mode: BatchNorm statistics stay fixed, dropout off). "
                   "0: the head alone. Default: everything trains.")
@click.option("--pseudo-threshold", type=click.FloatRange(0, 1, min_open=True), cls=DefaultOption,
              show_default=str(TRAINING_DEFAULTS["finetune"]["pseudo_threshold"]),
              help="pseudo-label: confidence an unlabelled image needs.")
@training_options("finetune")
@common
def finetune(target, out, init, arch, test, test_fraction, val_fraction, method, unlabeled, freeze_backbone,
             init_blocks, train_blocks, pseudo_threshold, resolution, epochs, batch_size, lr, weight_decay, schedule, lr_step_epochs, resume,
             seed, device, backend, workers, quiet, verbose, as_json):
    """Fine-tune on the TARGET dataset dir or manifest: a new head (lr x10), reporting the
    target validation and test top-1 per epoch.

    The epoch reported is the one of best validation top-1 (a split of the training data);
    the test top-1 given is that epoch's (and the last's): test data never chooses.

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
    from filterx.train.pretrain import FinetuneConfig, finetune as run

    setup(quiet, verbose)
    if init is None and arch is None:
        raise click.UsageError("give --init (a pre-trained model) or --arch (to train from scratch)")
    cfg = FinetuneConfig(target, out, init=init, arch=arch, test=test, unlabeled=unlabeled, method=method,
                         freeze_backbone=freeze_backbone, init_blocks=init_blocks, train_blocks=train_blocks,
                         resolution=resolution, seed=seed, device=device,
                         backend=backend, resume=resume, quiet=quiet,
                         **_given(workers=workers, test_fraction=test_fraction, val_fraction=val_fraction,
                                  pseudo_threshold=pseudo_threshold, epochs=epochs,
                                  batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule,
                                  lr_step_epochs=lr_step_epochs))
    finish_rank0(run(cfg), as_json, inside(out, "finetune"))


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
    from filterx.report.page import make_report

    setup(quiet, verbose)
    summary = make_report(dataset, output, methods=list(methods) or None, fraction=fraction, grid=grid,
                          relevant_classes=relevant_classes)
    finish(summary, as_json, inside(output, "report"))


@main.command(short_help="What a dataset dir holds (writes nothing).")
@click.argument("dataset", type=EXISTING_DIR)
@common
def info(dataset, quiet, verbose, as_json):
    """What a dataset dir holds: samples, classes, shards, embeddings, score arrays, and the
    options saved by the commands that wrote into it. Reads only; saves no options.

    Each tar's size is checked against its DALI index (no data is read): a truncated or
    missing tar, or an index that does not match its tar, is listed (DAMAGED / MISSING, and
    under "damaged_shards" / "missing_tars" with --json), a WARNING line says which shards
    readers will fail on, and the exit status is 1 (0 when every tar is whole).

    \b
    Example:
      filterx info ws/source
    """
    from filterx.report.info import dataset_info

    setup(quiet, verbose)
    details = dataset_info(dataset)
    if as_json:
        click.echo(json.dumps(plain_json(details.to_dict()), sort_keys=True, allow_nan=False))
        if not details.healthy:
            click.echo(f"filterx info: {details.warning()}", err=True)
    else:
        click.echo(details.text())
    if not details.healthy:
        click.get_current_context().exit(1)


@main.command(short_help="The whole chain on built-in sample data.")
@click.option("--out", default="filterx-demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Working directory (OUT) for the demo data and results.")
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(1), help="Encoder training epochs.")
@click.option("--fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Budget each method selects.")
@click.option("--seed", default=0, show_default=True, help="Seed of the sample data, training and scoring.")
@click.option("--quick", is_flag=True, help="A smaller pool and fewer epochs, for smoke tests (19 s on 2 CPU cores).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help=DEVICE_HELP)
@common
def demo(out, epochs, fraction, seed, quick, device, quiet, verbose, as_json):
    """Run the whole chain on built-in sample data and print each method's precision.

    Builds a pool (handwritten digits, photos, textures) and a target (digits 0-4 in another
    style), shards both, trains the target encoder, scores the pool with every method,
    selects a fraction, and reports how much of each selection is relevant, next to random.
    Everything goes under --out: data/, source/, target/, encoder.pt, manifests/ and the
    table in demo_results.md (and .json). A re-run reuses what is there. It runs with
    portable CPU numerics (FILTERX_PORTABLE=1: oneDNN and MKL pinned to AVX2, 2 threads), so
    that its table is as close across machines as torch allows.

    \b
    Saves its options to: OUT/filterx-demo.yaml

    \b
    Example:
      filterx demo --out /tmp/filterx-demo
    """
    import logging
    import sys

    from filterx.core import portable

    if "torch" not in sys.modules:  # a fresh process: the CLI imports torch only in commands
        portable.enable()
    setup(quiet, verbose)
    if not portable.active():
        logging.getLogger("filterx.stages.demo").warning(
            "torch was imported before the demo started: it runs with this machine's native CPU numerics, "
            "so its table may differ from the README's in the last digits")
    from filterx.stages.demo import DemoConfig, run_demo

    summary = run_demo(DemoConfig(out, epochs, fraction, seed, quick, device, quiet))
    finish(summary, as_json, inside(out, "demo"))


if __name__ == "__main__":
    main()
