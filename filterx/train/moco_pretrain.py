"""pretrain --objective moco: MoCo-v2 self-supervised pre-training (labels are not read).

    summary = pretrain(PretrainConfig(data="subset.jsonl", out="runs/moco", arch="resnet50",
                                      objective="moco", **MOCO_DEFAULTS))

The recipe of Chen et al. 2020 (MoCo v2; :mod:`filterx.train.moco` for the objective,
:mod:`filterx.train.moco_views` for the views): SGD momentum 0.9, lr 0.03 per 256 images (scaled
with the global batch as the supervised trainer scales its own), weight decay 1e-4, cosine
schedule, 200 epochs, key encoder momentum 0.999, queue 65536 (smaller for a small dataset:
:func:`filterx.train.moco.default_queue_size`), temperature 0.2, MLP head 2048 -> 2048 -> 128 for
ResNet-50 (hidden = the backbone's feature width).

The loader delivers each image resized and center-cropped to its full short side at
R / 0.875 pixels (no augmentation); the two views are drawn from that on the device, from a
generator seeded by (seed, epoch, rank, step), and the key batch's shuffle from one seeded by
(seed, epoch, step) alone, the same on every rank. With the trainer's per-epoch reseeding and
the key encoder, queue and queue pointer in ``checkpoint.pt``, ``--resume`` is bit-identical
to an uninterrupted run on the CPU.

Under torchrun: DDP over the query encoder, shuffled BatchNorm across ranks for the key
encoder (the MoCo code base's choice; SyncBN is not used), every rank's keys gathered into
the queue through :mod:`filterx.core.collectives`, so every rank holds the same queue.

Output (besides the trainer's checkpoint.pt / metrics.jsonl / model.pt, where ``model`` is
the query backbone's state dict without a head, which ``finetune --init`` completes with a
new one): ``model_torchvision.pth``, the same backbone as a plain torchvision state dict
(``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` misses exactly
``fc.weight`` / ``fc.bias``, as the MoCo code base's linear-classification script expects).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from filterx.io import atomic
from filterx.decode.loader import LoaderConfig, load_batches, resolve_backend
from filterx.models.archs import backbone_and_head, build_model
from filterx.train.moco import MoCo, GroupedBN, default_queue_size
from filterx.train.moco_views import MocoAugment, moco_augment, two_crops
from filterx.core.runtime import seed_everything
from filterx.train.checkpoints import CHECKPOINT, CHECKPOINT_FORMAT, config_dict, resume_from
from filterx.train.common import Run, Schedule, TrainSummary, finish, fit
from filterx.train.runtime import Runtime, autocast, setup_runtime, teardown_runtime, wrap_ddp
from filterx.train.data import TrainingData, batches_per_epoch, resolve_training_data, usable_batches

log = logging.getLogger(__name__)

# What pretrain takes for the options left unset with objective "moco" (MoCo v2's recipe).
MOCO_DEFAULTS = {"epochs": 200, "lr": 0.03, "schedule": "cosine", "weight_decay": 1e-4}
TORCHVISION_STATE = "model_torchvision.pth"


def build_moco(arch: str, *, queue_size: int, momentum: float, temperature: float, dim: int,
               bn_group: int, model_options: dict | None = None) -> MoCo:
    """A MoCo over ``arch``'s backbone (its head replaced by Identity), float32 on the CPU."""
    model = build_model(arch, 1, **(model_options or {}))
    backbone, head = backbone_and_head(model)
    return MoCo(backbone, head.in_features, dim=dim, queue_size=queue_size, momentum=momentum, temperature=temperature,
                bn_group=bn_group)


def view_source(resolution: int) -> int:
    """The size the loader delivers for views of ``resolution`` (the evaluation resize)."""
    return int(round(resolution / 0.875))


def step_generators(seed: int, epoch: int, step: int, rank: int) -> tuple[torch.Generator, torch.Generator]:
    """(this rank's augmentation generator, the key shuffle's, the same on every rank)."""
    a, = np.random.SeedSequence([seed, epoch, step, 0, rank]).generate_state(1)
    b, = np.random.SeedSequence([seed, epoch, step, 1]).generate_state(1)
    return torch.Generator().manual_seed(int(a)), torch.Generator().manual_seed(int(b))


def moco_epoch(moco: MoCo, query: nn.Module, opt: torch.optim.Optimizer, sched, batches, steps: int, *,
               resolution: int, seed: int, epoch: int, rt: Runtime, bar=None,
               aug: MocoAugment = MocoAugment()) -> dict:
    """One epoch of MoCo steps over ``batches`` (images in [0, 1], square), views drawn with
    ``aug`` (MoCo v2's by default); returns the sums {n, loss, hit} (float64 tensors on the
    device) for the trainer's all-reduce."""
    moco.train()
    zero = torch.zeros((), dtype=torch.float64, device=rt.device)
    sums = {"n": zero.clone(), "loss": zero.clone(), "hit": zero.clone()}
    for t, b in enumerate(usable_batches(batches, steps)):
        aug_gen, shuffle_gen = step_generators(seed, epoch, t, rt.rank)
        images = b.images.to(rt.device, non_blocking=True)
        im_q, im_k = two_crops(images, resolution, aug_gen, aug)
        if rt.cuda:
            im_q, im_k = (x.contiguous(memory_format=torch.channels_last) for x in (im_q, im_k))
        with autocast(rt):
            loss, hit = moco.step(query, im_q, im_k, shuffle_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            n = len(hit)
            sums["n"] += n
            sums["loss"] += loss.detach().double() * n
            sums["hit"] += hit.sum()
        if bar is not None:
            bar.update(n * rt.world_size)
    return sums


def moco_loader(resolution: int, backend: str, device: str, batch_size: int, workers: int, seed: int,
                epoch: int) -> LoaderConfig:
    """Shuffled, unaugmented square images in [0, 1] at :func:`view_source` pixels."""
    return LoaderConfig(resolution=view_source(resolution), backend=backend, device=device, batch_size=batch_size,
                        workers=workers, train=False, shuffle=True, seed=seed, epoch=epoch,
                        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_fraction=1.0)


def pretrain_moco(cfg) -> TrainSummary:
    """``filterx.train.pretrain`` for ``cfg.objective == "moco"`` (a PretrainConfig)."""
    from filterx.train.common import PRETRAIN_SOFT_SETTINGS as SOFT_SETTINGS

    t0 = time.perf_counter()
    if cfg.val is not None or cfg.val_fraction > 0:
        raise ValueError("moco pre-training reads no labels, so it has no held-out top-1 to report; drop "
                         "--val / --val-fraction and evaluate the backbone with filterx finetune --init")
    out = Path(cfg.out)
    train = resolve_training_data(cfg.data)
    backend = resolve_backend(cfg.backend, subset=train.ids is not None)
    rt = setup_runtime(cfg.device)
    try:
        lock = atomic.run_lock(out, "pretrain") if rt.is_main else contextlib.nullcontext()
        with lock:
            return _pretrain_moco(cfg, rt, out, train, backend, t0, SOFT_SETTINGS)
    finally:
        teardown_runtime(rt)


def _pretrain_moco(cfg, rt: Runtime, out: Path, train: TrainingData, backend: str, t0: float,
                   soft: tuple[str, ...]) -> TrainSummary:
    from filterx.train.common import epoch_images

    global_batch = cfg.batch_size * rt.world_size
    queue = cfg.moco_queue if cfg.moco_queue is not None else default_queue_size(train.count, global_batch)
    if cfg.moco_queue is None and rt.is_main and queue < 65536:
        log.info("moco: a queue of %d negatives (65536 would exceed half of the %d images)", queue, train.count)
    seed_everything(cfg.seed)  # the same initial weights and queue on every rank
    moco = build_moco(cfg.arch, queue_size=queue, momentum=cfg.moco_momentum, temperature=cfg.moco_temperature,
                      dim=cfg.moco_dim, bn_group=cfg.moco_bn_group, model_options=cfg.model_options)
    moco = moco.to(rt.device)
    if rt.cuda:
        moco = moco.to(memory_format=torch.channels_last)
    lr_256 = cfg.lr if cfg.lr is not None else MOCO_DEFAULTS["lr"]
    opt = torch.optim.SGD(moco.query.parameters(), lr=lr_256 * global_batch / 256, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    steps = batches_per_epoch(train.count, cfg.batch_size, cfg.workers, rt.world_size, backend)
    if steps < 1:
        raise ValueError(f"{train.count} images give no batch of >= 2 per rank at batch size {cfg.batch_size} "
                         f"on {rt.world_size} rank(s)")
    schedule = Schedule(cfg.schedule, steps, steps * cfg.epochs, cfg.lr_step_epochs, cfg.lr_gamma,
                        warmup_steps=steps * cfg.warmup_epochs)
    sched = schedule.scheduler(opt)
    aug = moco_augment(cfg.moco_views)
    # moco_views only when set: runs with MoCo v2's views keep the settings of earlier versions (resumable)
    settings = {**{k: v for k, v in config_dict(cfg).items() if k != "moco_views" or v}, "lr": lr_256, "moco_queue": queue, "world_size": rt.world_size,
                "global_batch": global_batch, "train_data": train.identity()}
    start_epoch, history = resume_from(out, cfg.resume, settings, soft + ("world_size",), {"moco": moco}, opt, sched)
    if start_epoch and rt.is_main:
        log.info("resuming %s after epoch %d of %d", out / CHECKPOINT, start_epoch, cfg.epochs)
    query = wrap_ddp(GroupedBN(moco.query, moco.bn_group), rt)

    def train_epoch(epoch: int, bar) -> dict:
        lcfg = moco_loader(cfg.resolution, backend, rt.device, cfg.batch_size, cfg.workers, cfg.seed, epoch)
        batches = load_batches(train.tars, lcfg, rank=rt.rank, world_size=rt.world_size, ids=train.ids)
        return moco_epoch(moco, query, opt, sched, batches, steps, resolution=cfg.resolution, seed=cfg.seed,
                          epoch=epoch, rt=rt, bar=bar, aug=aug)

    def summarize(t: dict) -> dict:
        return {"loss": t["loss"] / max(t["n"], 1.0), "moco_top1": t["hit"] / max(t["n"], 1.0)}

    def payload() -> dict:
        return {"filterx_checkpoint": CHECKPOINT_FORMAT, "kind": "pretrain", "objective": "moco", "arch": cfg.arch,
                "model_kwargs": dict(cfg.model_options), "num_classes": max(1, train.num_classes),
                "class_names": list(train.class_names), "resolution": cfg.resolution,
                "model": moco.backbone_state(),
                "moco": {k: v.detach().cpu() for k, v in moco.state_dict().items()},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "settings": settings}

    run = Run(out, "pretrain-moco", cfg.epochs, epoch_images(train.count, rt.world_size), train_epoch, summarize,
              lambda epoch: {}, payload, sched, cfg.seed, cfg.save_every, history)
    fit(run, rt, start_epoch, cfg.quiet)
    model_path = finish(run, rt, {"head": None})
    if rt.is_main:
        with atomic.atomic_path(out / TORCHVISION_STATE) as tmp:
            torch.save(moco.backbone_state(), tmp)
    return TrainSummary("pretrain (moco)", out, model_path, cfg.epochs, start_epoch, rt.world_size,
                        time.perf_counter() - t0, list(run.history))
