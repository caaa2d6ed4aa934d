"""domain-cls on pixels (``--on pixels``): a CNN trained to tell target images from pool images;
score = its logit for "target".

The domain classifier of conditional pre-training (Chakraborty et al.): a ResNet-18 (``arch``,
any ResNet or AlexNet of :mod:`filterx.models.archs`; ``width`` narrows a ResNet for CPU runs,
``stem="small"`` gives it the small-image stem) trained from scratch on decoded, augmented
images (the loader's training transform: random resized crop and flip), every batch half pool
and half target. Each half is drawn as shuffled epochs of its side, so a small target is
oversampled, seen once per epoch of its own, while the pool goes by. With ``folds > 1`` the pool
is split at random and each part is scored by a classifier that never trained on it (as
domain-cls on embeddings does): on a small pool a CNN learns its pool images by heart and would
score the target-like ones low for having seen them labelled "pool". With ``members > 1`` each
fold trains that many classifiers, from different initialisations and batch orders, and scores by
their mean logit (a deep ensemble): member m of a run at seed s trains with the seeds of a single
classifier at seed s + m * folds (on the run's own fold split), so with one fold the ensemble at
seed s is the mean of the single runs at seeds s, s+1, ..., s + members - 1. ``colour`` adds
colour steps to the training images (:data:`COLOURS`: grayscale, colour jitter), so that the
target's palette alone does not tell it from the pool; "mixed" gives the members none, gray and
jitter in turn. ``views`` scores each pool image by the mean logit over several views of it
(test-time augmentation): 1 the loader's evaluation image (the centre crop), 2 also its mirror, 4
also the whole frame (no crop) and its mirror.

Registered as the streaming scorer ``domain-cls/pixels``, the variant of ``domain-cls`` that
``--on pixels`` chooses (:func:`pixel_domain_scores`, called with a StreamContext); it needs
``--target``, not an encoder.

Resumable as ``influence --params last-block`` is (:mod:`filterx.scorers.lastblock`): once
trained, the classifiers' weights are stored in the work store (``ctx.work``, a
:mod:`filterx.io.rowstore` store keyed by the run's facts and this scorer's parameters); the
pool is then scored shard by shard, each shard's scores stored as soon as it is done (rows,
then its done flag). A killed run re-trains nothing once the weights are stored, and scores only
the shards not done; scoring batches are fixed by the dataset alone
(:func:`~filterx.scorers.lastblock.shard_aligned_batches`), so the resumed scores are
bit-identical to an uninterrupted run's on the same machine and thread count.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from filterx.core.faults import crash_point
from filterx.core.progress import progress
from filterx.decode.colour import STRONG, ColourSteps, recolour
from filterx.decode.loader import Batch, LoaderConfig, SkipBadSamples, load_batches
from filterx.io import rowstore
from filterx.models.archs import RESNET_STEMS, build_model, list_models
from filterx.scorers import Option, ScoreResult, StreamContext, register_scorer
from filterx.scorers.lastblock import score_pool_shards

log = logging.getLogger(__name__)
TARGET, POOL, COLOUR = 1, 0, 2  # the sides' seed streams (and the colour draws')
# ``colour``: the colour steps added to the crop and flip of training images (scoring sees the
# images as they are). "gray": grayscale half the time; "jitter": also SimCLR's colour jitter of
# strength 1 (brightness, contrast, saturation 0.8, hue 0.2; p 0.8), as the small-image MoCo
# views have it. Both keep the classifier from telling target from pool by palette alone, which
# helps where palette is the target's style and hurts where it is content (README, "Colour in
# the pixel classifier"). "mixed" (an ensemble's setting): member m takes MIXED[m % 3].
COLOURS = {"none": None, "gray": ColourSteps(jitter_p=0.0, gray_p=0.5), "jitter": STRONG}
MIXED = ("none", "gray", "jitter")
COLOUR_CHOICES = (*COLOURS, "mixed")
# ``views``: the images of a pool sample the score averages the logit over (test-time augmentation)
VIEWS = {1: "the centre crop", 2: "the centre crop and its mirror",
         4: "the centre crop, the whole frame and their mirrors"}


def member_colour(colour: str, member: int) -> str:
    """The colour steps member ``member`` trains with (a key of COLOURS)."""
    return MIXED[member % len(MIXED)] if colour == "mixed" else colour


def _side_seed(seed: int, fold: int, side: int) -> int:
    """The loader seed of one side (pool or target) of one fold's training: independent streams."""
    return int(np.random.SeedSequence([seed, fold, side]).generate_state(1)[0])


def balanced_half(tars, cfg: LoaderConfig, half: int, *, ids: np.ndarray | None = None,
                  on_error=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (ids (half,) int64, images (half, 3, R, R)) batches from ``tars`` (only ``ids``
    when given): shuffled epochs one after another (epoch e shuffled and augmented by
    (cfg.seed, e)), cut into batches of exactly ``half`` images whatever the loader's batch
    sizes, so a side smaller than the other is oversampled, every image once per epoch."""
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    have, epoch = 0, 0
    while True:
        got = 0
        for b in load_batches(tars, replace(cfg, epoch=epoch), ids=ids,
                              **({} if on_error is None else {"on_error": on_error})):
            pending.append((b.ids, b.images))
            have += len(b.ids)
            got += len(b.ids)
            while have >= half:
                all_ids, images = torch.cat([i for i, _ in pending]), torch.cat([x for _, x in pending])
                yield all_ids[:half], images[:half]
                pending, have = [(all_ids[half:], images[half:])], have - half
        if got == 0:
            raise ValueError(f"no image of {tars[0].parent} could be decoded for training")
        epoch += 1


def _layout(width: int | None, stem: str | None) -> dict:
    """build_model's layout options of a pixel classifier: only those given (an AlexNet takes none)."""
    return {k: v for k, v in (("width", width), ("stem", stem)) if v is not None}


def _member_seed(seed: int, folds: int, member: int) -> int:
    """The run seed member ``member`` trains with: a single classifier's, at seed + member * folds
    (member 0 is the single classifier; no two (member, fold) pairs of a run share an init seed)."""
    return seed + member * folds


def _weights_name(fold: int, member: int) -> str:
    """The work-store array of one classifier's weights (member 0's name is a single classifier's)."""
    return f"classifier_{fold}" if member == 0 else f"classifier_{fold}_{member}"


def train_pixel_classifier(source, target, pool_ids: np.ndarray | None, cfg: LoaderConfig, *, arch: str,
                           width: int | None, steps: int, lr: float, weight_decay: float, seed: int,
                           fold: int = 0, quiet: bool = True, stem: str | None = None,
                           label: str = "", colour: str = "none") -> tuple[nn.Module, dict]:
    """Train a balanced pool (0) vs target (1) classifier on decoded pixels.

    ``source``, ``target``: datasets; ``pool_ids``: the pool samples it may train on (None: all);
    ``cfg``: the training loader (``train=True``, ``batch_size`` = half a batch). AdamW with a
    linear warm-up over the first 5% of ``steps``, then cosine decay; bf16 autocast and
    channels_last on CUDA. Returns (the model in eval mode, training facts: final loss and
    accuracy over the last tenth of the steps, bad samples skipped). ``label``: names the classifier
    in the progress bar and log (e.g. "fold 1, member 2"). ``colour``: a key of :data:`COLOURS`,
    colour steps after the loader's crop and flip, drawn from a generator of (seed, fold).
    """
    device = torch.device(cfg.device)
    torch.manual_seed(seed + fold)
    model = build_model(arch, 1, **_layout(width, stem)).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, steps - warm))))
    half = cfg.batch_size
    skipped = SkipBadSamples()
    # the pool read whole (DALI can), the target whole; an id subset goes through a backend that can
    pool_cfg = replace(cfg, seed=_side_seed(seed, fold, POOL),
                       backend="auto" if pool_ids is not None and cfg.backend == "dali" else cfg.backend)
    pool = balanced_half(source.tar_paths(), pool_cfg, half, ids=pool_ids, on_error=skipped)
    tgt = balanced_half(target.tar_paths(), replace(cfg, seed=_side_seed(seed, fold, TARGET)), half,
                        on_error=skipped)
    aug = COLOURS[colour]
    gen = torch.Generator().manual_seed(_side_seed(seed, fold, COLOUR))
    y = torch.cat([torch.full((half,), float(POOL)), torch.full((half,), float(TARGET))]).to(device)
    loss_fn = nn.BCEWithLogitsLoss()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    tail = max(1, steps // 10)
    losses, correct = [], []
    model.train()
    bar = progress(total=steps, desc=f"domain classifier ({label})" if label else "domain classifier",
                   quiet=quiet)
    for step in range(steps):
        x = torch.cat([next(pool)[1].to(device), next(tgt)[1].to(device)])
        if aug is not None:
            x = _recoloured(x, aug, gen, cfg)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            logits = model(x).squeeze(1).float()
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= steps - tail:
            losses.append(float(loss.detach()))
            correct.append(float(((logits > 0).float() == y).float().mean()))
        bar.update(1)
    bar.close()
    facts = {"train_loss": float(np.mean(losses)), "train_accuracy": float(np.mean(correct)),
             "bad_training_samples": len(skipped.bad)}
    log.info("domain classifier%s: loss %.4f, balanced accuracy %.3f over its last %d steps",
             f" ({label})" if label else "", facts["train_loss"], facts["train_accuracy"], tail)
    return model.eval(), facts


def _recoloured(x: torch.Tensor, aug: ColourSteps, gen: torch.Generator, cfg: LoaderConfig) -> torch.Tensor:
    """``aug``'s colour steps on a batch the loader normalised with ``cfg``'s mean and std."""
    mean = torch.tensor(cfg.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (recolour((x * std + mean).clamp(0, 1), aug, gen) - mean) / std


def _weights_bytes(model: nn.Module) -> np.ndarray:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _load_weights(model: nn.Module, stored: np.ndarray) -> nn.Module:
    state = torch.load(io.BytesIO(stored.tobytes()), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def view_batches(tars, cfg: LoaderConfig, views: int) -> Iterator[Batch]:
    """The pool's scoring batches: the loader's evaluation images (``cfg``: the centre crop of
    ``cfg.crop_fraction``), or with ``views`` 4 each image's centre crop and whole frame
    (``crop_fraction`` 1) side by side in the channels, (B, 6, R, R), read by two loaders and
    paired by id whatever order their batches come in (labels -1)."""
    if views < 4:
        yield from load_batches(tars, cfg)
        return
    waiting: tuple[dict, dict] = ({}, {})
    for pair in itertools.zip_longest(load_batches(tars, cfg), load_batches(tars, replace(cfg, crop_fraction=1.0))):
        for side, batch in zip(waiting, pair):
            if batch is not None:
                side.update(zip(batch.ids.tolist(), batch.images))
        both = sorted(waiting[0].keys() & waiting[1].keys())
        if both:
            images = torch.stack([torch.cat([waiting[0].pop(i), waiting[1].pop(i)]) for i in both])
            yield Batch(torch.tensor(both, dtype=torch.int64), images, torch.full((len(both),), -1))
    if waiting[0] or waiting[1]:
        raise RuntimeError(f"the centre-crop and whole-frame passes over the pool read different samples "
                           f"({len(waiting[0])} and {len(waiting[1])} unpaired)")


def _view_logits(model: nn.Module, images: torch.Tensor, views: int) -> torch.Tensor:
    """(B,) the mean target logit over ``views`` views of a batch from :func:`view_batches`."""
    crops = [images] if views < 4 else [images[:, :3], images[:, 3:]]
    if views > 1:
        crops += [c.flip(3) for c in crops]
    return torch.stack([model(c).squeeze(1).float() for c in crops]).mean(0)


def _logits(models: list[list[nn.Module]], fold_of: np.ndarray, ids: np.ndarray, images: torch.Tensor,
            device: torch.device, views: int = 1) -> np.ndarray:
    """(B,) float32 target logits of a compute batch, each sample by the classifiers of its fold
    (``models[fold]``: the fold's members; their mean logit), each over ``views`` views."""
    out = np.empty(len(ids), dtype=np.float32)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    images = images.to(device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    folds = fold_of[ids]
    with torch.inference_mode(), amp:
        for f, members in enumerate(models):
            sel = folds == f
            if sel.any():
                batch = images[torch.from_numpy(sel).to(device)]
                out[sel] = np.mean([_view_logits(m, batch, views).cpu().numpy() for m in members], axis=0)
    return out


def check_pixels(params, candidates: str) -> None:
    """domain-cls on pixels tells the pool from the target: it scores the pool only."""
    if candidates != "source":
        raise ValueError(f"domain-cls --on pixels scores the pool (--candidates source), not {candidates!r}")


@register_scorer(
    "domain-cls/pixels", kind="streaming", variant_of="domain-cls", choose_by=("on", "pixels"),
    needs=("target_labels",), check=check_pixels, options={
        "arch": Option("with --on pixels, the network", choices=tuple(list_models())),
        "width": Option("with --on pixels, a ResNet's first-stage channels (64 as published; 16 for CPU runs)",
                        min=1),
        "stem": Option("with --on pixels, a ResNet's stem: imagenet (7x7 stride 2 and max pool, as published) or "
                       "small (3x3 stride 1, no pool: layer4 keeps a 4x4 map at 32 px)", choices=RESNET_STEMS),
        "resolution": Option("with --on pixels, the side of the images it sees", min=16),
        "steps": Option("with --on pixels, training steps (batches of --batch-size, half pool, half target)",
                        min=1),
        "folds": Option("cross-fitting folds", min=1),
        "members": Option("with --on pixels, classifiers per fold, trained at different seeds; the score is "
                          "their mean logit (an ensemble: steadier rankings, members times the training time)",
                          min=1),
        "colour": Option("with --on pixels, colour steps on training images besides crop and flip: none, gray "
                         "(grayscale half the time), jitter (also colour jitter of strength 1), so that palette "
                         "alone does not tell the target; or mixed, with --members >= 2: member m takes none, "
                         "gray, jitter in turn", choices=COLOUR_CHOICES),
        "views": Option("with --on pixels, views of each pool image scored, the score their mean logit: 1 the "
                        "centre crop, 2 also its mirror, 4 also the whole frame and its mirror", min=1)})
def pixel_domain_scores(
    ctx: StreamContext,
    *,
    seed: int,
    arch: str = "resnet18",
    width: int | None = None,
    stem: str | None = None,
    resolution: int = 112,
    steps: int = 2000,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    folds: int = 1,
    members: int = 1,
    colour: str = "none",
    views: int = 1,
) -> tuple[np.ndarray, ScoreResult]:
    """Logit of "target" from a CNN trained on pixels, balanced batches (arch: any trainer
    model; width: a narrower ResNet, e.g. 16 for CPU runs; stem: a ResNet's stem, "small" for
    small images; resolution in pixels; batches of --batch-size, half pool and half target;
    members: classifiers per fold whose logits are averaged; colour: colour steps in training, per
    member with "mixed"; views: 1, 2 or 4 views of each pool image at scoring, :data:`VIEWS`)."""
    problems = [f"{k} must be >= {lo}, got {v}" for k, v, lo in
                (("steps", steps, 1), ("folds", folds, 1), ("members", members, 1), ("resolution", resolution, 16))
                if v < lo] + ([f"width must be >= 1, got {width}"] if width is not None and width < 1 else []) \
        + ([f"lr must be > 0, got {lr}"] if not lr > 0 else [])
    if arch not in list_models():
        problems.append(f"unknown arch {arch!r}; valid: {', '.join(list_models())}")
    if colour == "mixed" and members < 2:  # an unknown colour: the registry's choices refuse it
        problems.append("colour mixed takes --members >= 2 (member m takes none, gray, jitter in turn), "
                        f"got {members}")
    if views not in VIEWS:
        problems.append(f"views must be 1, 2 or 4 ({'; '.join(f'{k}: {v}' for k, v in VIEWS.items())}), got {views}")
    if ctx.batch_size < 2 or ctx.batch_size % 2:
        problems.append(f"--batch-size must be even and >= 2 (half pool, half target), got {ctx.batch_size}")
    if problems:
        raise ValueError("domain-cls --on pixels: " + "; ".join(problems))
    build_model(arch, 1, **_layout(width, stem))  # a layout the arch refuses (or an unknown stem) fails now
    source, target = ctx.source, ctx.target
    if folds > 1 and folds > source.num_samples:
        raise ValueError(f"domain-cls --on pixels: folds ({folds}) exceeds the pool's {source.num_samples} images")
    # stem, members, colour and views only when not the default: a run without them keeps the work-store
    # key (and stored weights) it had
    params = dict(arch=arch, width=width, **({} if stem is None else {"stem": stem}), resolution=resolution,
                  steps=steps, lr=lr, weight_decay=weight_decay, folds=folds,
                  **({} if members == 1 else {"members": members}),
                  **({} if colour == "none" else {"colour": colour}),
                  **({} if views == 1 else {"views": views}))
    device = torch.device(ctx.device)
    fold_of = np.random.default_rng(seed).integers(0, folds, source.num_samples) if folds > 1 \
        else np.zeros(source.num_samples, dtype=np.int64)
    layout = rowstore.RowLayout("scores", (), "float32", tuple(source.shard_counts), source.fingerprint,
                                json.loads(json.dumps({**ctx.key, "params": params, "batch_size": ctx.batch_size},
                                                      default=str)))
    store = None if ctx.work is None else rowstore.open_rows(ctx.work, layout, on_mismatch="discard")
    train_cfg = LoaderConfig(resolution=resolution, backend=ctx.backend, device=ctx.device,
                             batch_size=ctx.batch_size // 2, workers=ctx.workers, train=True, shuffle=True)
    trained = store is None
    slots = [(f, m) for f in range(folds) for m in range(members)]
    if store is None:
        weights, facts = {}, []
        for f, m in slots:
            pool_ids = np.flatnonzero(fold_of != f) if folds > 1 else None
            label = ", ".join([f"fold {f}"] * (folds > 1) + [f"member {m}"] * (members > 1))
            model, fact = train_pixel_classifier(source, target, pool_ids, train_cfg, arch=arch, width=width,
                                                 steps=steps, lr=lr, weight_decay=weight_decay,
                                                 seed=_member_seed(seed, folds, m), fold=f, quiet=ctx.quiet,
                                                 stem=stem, label=label, colour=member_colour(colour, m))
            weights[_weights_name(f, m)] = _weights_bytes(model)
            facts.append(fact)
        if ctx.work is not None:
            rowstore.create(ctx.work, layout, arrays=weights, extra_attrs={"training": facts})
            store = rowstore.open_rows(ctx.work, layout)
    else:
        log.info("domain-cls --on pixels: reusing the classifier stored in %s", ctx.work)
    if store is not None:  # one path for a fresh and a resumed run: the weights as stored
        facts = store.attrs["training"]
        weights = {_weights_name(f, m): store.array(_weights_name(f, m)) for f, m in slots}
    models = [[_load_weights(build_model(arch, 1, **_layout(width, stem)), weights[_weights_name(f, m)]).to(device)
               for m in range(members)] for f in range(folds)]

    todo = list(range(source.num_shards)) if store is None else store.undone()
    reused = source.num_shards - len(todo)
    if reused:
        log.info("domain-cls --on pixels: %d of %d shards already scored in %s; scoring the other %d",
                 reused, source.num_shards, ctx.work, len(todo))
    eval_cfg = replace(train_cfg, train=False, shuffle=False, batch_size=ctx.batch_size)
    scores = score_pool_shards(source, todo, store, lambda: view_batches(source.tar_paths(todo), eval_cfg, views),
                               ctx.batch_size,
                               lambda ids, images: _logits(models, fold_of, ids, images, device, views),
                               desc="domain-cls (pixels)", after_shard=lambda s: crash_point("domain.shard"),
                               quiet=ctx.quiet)
    attrs = {"trained": trained, "shards_scored": len(todo), "shards_reused": reused,
             "train_loss": float(np.mean([f["train_loss"] for f in facts])),
             "train_accuracy": float(np.mean([f["train_accuracy"] for f in facts])),
             "bad_training_samples": int(sum(f["bad_training_samples"] for f in facts)),
             "mean_source_logit": float(np.nanmean(scores)), "training": facts}
    return np.arange(source.num_samples), ScoreResult(scores, attrs=attrs)
