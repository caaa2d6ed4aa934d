"""The pipeline's commands: shard, train-encoder, embed, score, select."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from filterx.cli.common import (
    check_runner, common, encoder_arch_names, finish, finish_rank0, format_names, runner_options,
    runtime_options, scorer_names, setup,
)
from filterx.cli.configs import beside, in_dataset, inside
from filterx.cli.params import BACKBONE, ENCODER, EXISTING_DIR, EXISTING_FILE, ConfigOption, ListedOption, RegistryChoice
from filterx.cli.group import main
from filterx.cli.scorer_options import ScoreCommand


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


def encoder_config():
    from filterx.train.encoder import EncoderConfig

    return EncoderConfig


@main.command("train-encoder", short_help="Train the target encoder (a ResNet, or a probe on a backbone) -> OUT.")
@click.argument("target", type=EXISTING_DIR)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--arch", cls=ConfigOption, config=encoder_config, type=RegistryChoice("arch", encoder_arch_names),
              help="torchvision ResNet, trained from scratch.")
@click.option("--resolution", cls=ConfigOption, config=encoder_config, type=click.Choice(["224", "112", "64", "32"]),
              help="Input size in pixels; 64 and 32 are for small images and tiny CPU runs such as the demo.")
@click.option("--width", type=click.IntRange(1), default=None, show_default="64, as published",
              help="The ResNet's first-stage channels (stages w, 2w, 4w, 8w): narrower for CPU runs.")
@click.option("--stem", type=click.Choice(["imagenet", "small"]), default=None, show_default="imagenet",
              help="small: a 3x3 stride-1 conv and no max pool (CIFAR's), for 32-64 px images, where the ImageNet "
                   "stem leaves the last stage a 1x1-2x2 map; 16x the compute at one resolution.")
@click.option("--epochs", cls=ConfigOption, config=encoder_config, type=click.IntRange(1), help="Training epochs.")
@click.option("--lr", cls=ConfigOption, config=encoder_config, type=float,
              help="Peak (one-cycle) learning rate for a batch of 256; scaled with --batch-size.")
@click.option("--weight-decay", cls=ConfigOption, config=encoder_config, type=click.FloatRange(0),
              help="L2 weight decay (of the ResNet, or of the probe's mean cross-entropy objective).")
@click.option("--val-fraction", cls=ConfigOption, config=encoder_config, type=click.FloatRange(0, 1, max_open=True),
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
@click.option("--init", type=EXISTING_FILE, default=None, metavar="FILE",
              help="Start the supervised ResNet from this backbone (e.g. a --objective moco encoder, to fine-tune "
                   "it on the target's labels, or pretrain's model.pt): its weights but the head, and its input "
                   "normalisation.")
@click.option("--seed", cls=ConfigOption, config=encoder_config, type=int,
              help="Seed of the split, initialisation and augmentation.")
@runtime_options(config=encoder_config)
@common
def train_encoder(target, out, arch, resolution, width, stem, epochs, lr, weight_decay, val_fraction, backbone,
                  probe_only, objective, with_pool, init, seed, device, backend, batch_size, workers, quiet, verbose,
                  as_json):
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
      filterx train-encoder ws/target ws/moco-ft.pt --init ws/moco.pt
    """
    setup(quiet, verbose)
    if init is not None and (objective == "moco" or with_pool is not None or probe_only or backbone is not None):
        raise click.UsageError("--init starts the supervised ResNet from a backbone; it does not combine with "
                               "--objective moco, --with-pool, --backbone or --probe-only")
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
        given = [f"--{n.replace('_', '-')}" for n in ("arch", "resolution", "width", "stem", "epochs", "lr")
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
                        quiet=quiet, init=init, model_options=_layout(width, stem))
    finish(run(cfg), as_json, beside(out))


def _layout(width: int | None, stem: str | None) -> dict:
    """build_model's layout options from --width / --stem, those given only (so that --init's hold)."""
    return {k: v for k, v in (("width", width), ("stem", stem)) if v is not None}


def _train_moco_encoder(opts: dict) -> None:
    """train-encoder --objective moco: its option checks and defaults (MoCo v2's 200 epochs, lr 0.03)."""
    from filterx.stages.moco_encoder import MocoEncoderConfig, train_moco_encoder

    if opts["objective"] != "moco":
        raise click.UsageError("--with-pool joins the pool to contrastive training; add --objective moco")
    if opts["probe_only"] or opts["backbone"] is not None:
        raise click.UsageError("--objective moco trains its own backbone; it takes no --backbone / --probe-only")
    ctx = click.get_current_context()
    defaults = {f.name: f.default for f in dataclasses.fields(MocoEncoderConfig)}
    for name in ("epochs", "lr"):  # MoCo v2's, where train-encoder's own were not overridden
        if ctx.get_parameter_source(name) is click.core.ParameterSource.DEFAULT:
            ctx.params[name] = opts[name] = defaults[name]
    cfg = MocoEncoderConfig(opts["target"], opts["out"], opts["arch"], int(opts["resolution"]), opts["epochs"],
                            opts["batch_size"], opts["lr"], weight_decay=opts["weight_decay"],
                            val_fraction=opts["val_fraction"], with_pool=opts["with_pool"], backend=opts["backend"],
                            device=opts["device"], workers=opts["workers"], seed=opts["seed"], quiet=opts["quiet"],
                            model_options=_layout(opts["width"], opts["stem"]))
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
                   "(methods on embeddings; entropy, influence and grad-align need a file with a head).")
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
@click.option("--combine", type=click.Choice(["rank-mean", "rank-min", "rank-max"]),
              help="Fuse several --method scores by rank: the mean of their normalised ranks, the best one "
                   "(a union) or the worst one (an intersection).")
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
    --method A,B with --combine (rank-mean, rank-min or rank-max) selects from a fusion of several
    scores: each turned into ranks (ties share their average rank; a sample some score leaves NaN
    is never kept), then their mean, best or worst rank (rank-max keeps what every score ranks
    high); the header records the methods and the rule. The scores may come from different
    encoders (score --name tells them apart).
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
