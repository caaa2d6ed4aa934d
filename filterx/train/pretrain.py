"""pretrain: data-parallel supervised training on a manifest's selection or a whole dataset.

    summary = pretrain(PretrainConfig(data="subset.jsonl", out="runs/r50", arch="resnet50"))

Defaults follow the ImageNet literature: SGD with momentum 0.9, weight decay 1e-4, x0.1 every
30 epochs, 90 epochs; lr at a global batch of 256, scaled linearly with the global batch
(per-rank batch x world size): 0.1 for the ResNets (He et al. 2016; Goyal et al. 2017, "0.1 kn/256"),
0.01 for ``alexnet_lrn`` (the BVLC AlexNet solver: base_lr 0.01 at batch 256; Krizhevsky et al.
2012 used 0.01 at batch 128); bf16 autocast and channels_last on CUDA. (``lr=None`` picks the
arch's; see :func:`default_lr`.)

Distributed: run the same call under ``torchrun --nproc_per_node N`` (add ``--nnodes`` /
``--rdzv-endpoint`` for several machines; the output dir must then be on a shared file system
for resumption). Each rank reads its share of every epoch, ceil(N / world size) images in
the same number of steps on every rank (the loader's rank split: with the torchvision / pil
backends one seeded shuffle dealt round-robin and cut into batches in order, so step t's
global batch is the same images whatever the world size and ``workers``, for a fixed global
batch; only the epoch's last step differs when the world size does not divide N, the ranks
then padding it with images from the epoch's start. DALI gives each rank a fixed part of the
tars, shuffled within it, so its global batches depend on the world size). Augmentation is
drawn per rank. Gradients are averaged by DDP, rank 0 logs and saves. On CUDA BatchNorm is synchronised across ranks
(``sync_bn``); torch has no CPU SyncBatchNorm, so on the CPU each rank normalises with its own
batch and only networks without BatchNorm (``alexnet_lrn``) match a one-process run exactly.

Adversarially robust training (``adv_eps > 0``): every augmented batch is replaced by its PGD
adversarial examples (:mod:`filterx.train.adversarial`: pixel space, model in eval mode for the
attack, 2.5 eps / steps) before the step, and the held-out data is also scored under the same
attack (``val_robust_top1``, ``val_robust_loss``).


See :mod:`filterx.train.common` for the output files and how resumption stays exact, and
:mod:`filterx.train.finetune` for fine-tuning and domain adaptation.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from filterx.io import atomic
from filterx.decode.loader import LoaderConfig, load_batches, resolve_backend
from filterx.models.archs import build_model, list_models
from filterx.train.adversarial import DEFAULT_STEPS, Attack, check_attack
from filterx.train.moco_views import moco_augment
from filterx.core.runtime import seed_everything
from filterx.train.checkpoints import CHECKPOINT, CHECKPOINT_FORMAT, config_dict, resume_from
from filterx.train.common import (
    PRETRAIN_SOFT_SETTINGS as SOFT_SETTINGS, SCHEDULES, Run, Schedule, TrainSummary, epoch_images, finish, fit,
    supervised_step,
)
from filterx.train.evaluation import evaluate, loader_batches, topk_correct
from filterx.train.runtime import (
    Runtime, default_workers, prepare_model, setup_runtime, teardown_runtime, to_input, wrap_ddp,
)
from filterx.train.data import (  # noqa: F401  (resolve_training_data: re-exported for callers)
    TrainingData, batches_per_epoch, held_out_split, resolve_training_data, usable_batches,
)
from filterx.train.finetune import FinetuneConfig, finetune  # noqa: F401  (one import for both)

log = logging.getLogger(__name__)

OBJECTIVES = ("supervised", "moco")


@dataclass(frozen=True)
class PretrainConfig:
    data: Path  # dataset dir or manifest
    out: Path  # output dir: checkpoint.pt, metrics.jsonl, model.pt
    arch: str = "resnet50"
    resolution: int = 224
    epochs: int = 90
    batch_size: int = 64  # per rank; the global batch is batch_size x world size
    lr: float | None = None  # at a global batch of 256, scaled linearly; None: default_lr(arch)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"  # step | cosine | inv
    lr_step_epochs: int = 30
    lr_gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    val: Path | None = None  # a dataset dir / manifest to evaluate on every epoch
    val_fraction: float = 0.0  # else hold out this share of the data (0: no evaluation)
    augment: bool = True  # random resized crop + flip; off: center crops
    model_options: dict = field(default_factory=dict)  # build_model kwargs, e.g. {"dropout": 0.0}
    sync_bn: bool = True  # SyncBatchNorm across ranks on CUDA
    backend: str = "auto"
    device: str = "auto"
    workers: int = field(default_factory=default_workers)  # min(4, the cores available)
    seed: int = 0
    resume: bool = False  # continue from out/checkpoint.pt
    save_every: int = 0  # also keep epoch_NNNN.pt every this many epochs
    quiet: bool = False
    # objective "moco": MoCo v2 without labels (filterx.train.moco_pretrain; its defaults: MOCO_DEFAULTS)
    objective: str = "supervised"
    moco_queue: int | None = None  # negatives; None: 65536, less for a small dataset
    moco_momentum: float = 0.999  # key encoder EMA
    moco_temperature: float = 0.2
    moco_dim: int = 128  # projection output
    moco_bn_group: int = 32  # images per BatchNorm group (shuffled BN)
    # the two views: overrides of MocoAugment's fields (e.g. {"scale": (0.5, 1.0)}); {}: MoCo v2's. Python only
    moco_views: dict = field(default_factory=dict)
    # PGD adversarial training (filterx.train.adversarial): eps in pixels [0, 1]; 0: standard training
    adv_eps: float = 0.0
    adv_norm: str = "l2"  # l2 | linf
    adv_steps: int = DEFAULT_STEPS
    adv_step_size: float | None = None  # None: 2.5 * eps / steps

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}")
        if self.arch not in list_models():
            raise ValueError(f"unknown arch {self.arch!r}; valid: {', '.join(list_models())}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size", "lr_step_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution < 16:
            raise ValueError(f"resolution must be >= 16 pixels, got {self.resolution}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val is not None and self.val_fraction > 0:
            raise ValueError("give either val (a dataset to evaluate on) or val_fraction, not both")
        check_attack(self.adv_eps, self.adv_norm, self.adv_steps, self.adv_step_size)
        moco_augment(self.moco_views)  # unknown view parameters fail here, not after the data is read
        if self.moco_views and self.objective != "moco":
            raise ValueError(f"moco_views {self.moco_views} set for objective {self.objective!r}: only moco draws two views")
        if self.adv_eps > 0 and self.objective != "supervised":
            raise ValueError(f"adversarial training (adv_eps {self.adv_eps}) attacks a classifier's labels; "
                             f"objective {self.objective!r} has none: use objective supervised")


# lr at a global batch of 256 of the recipe each arch comes from; ResNets: DEFAULT_LR.
DEFAULT_LR = 0.1
ARCH_LR = {"alexnet_lrn": 0.01}


def default_lr(arch: str) -> float:
    """The literature's lr per 256 images for ``arch`` (module doc): 0.1, alexnet_lrn 0.01."""
    return ARCH_LR.get(arch, DEFAULT_LR)


def pretrain(cfg: PretrainConfig) -> TrainSummary:
    """Train ``cfg.arch`` from scratch on ``cfg.data``; see the module doc. Returns the summary
    (per-epoch history: loss, train_top1, lr, img_s, val_top1/val_top5/val_loss when evaluating).
    ``objective="moco"``: self-supervised, see :mod:`filterx.train.moco_pretrain`."""
    if cfg.objective == "moco":
        from filterx.train.moco_pretrain import pretrain_moco

        return pretrain_moco(cfg)
    t0 = time.perf_counter()
    out = Path(cfg.out)
    data = resolve_training_data(cfg.data)
    if cfg.val is not None:
        train, val = data, resolve_training_data(cfg.val)
        if val.num_classes != data.num_classes:
            raise ValueError(f"val data {cfg.val} has {val.num_classes} classes, training data {data.num_classes}")
    elif cfg.val_fraction > 0:
        train, val = held_out_split(data, cfg.val_fraction, cfg.seed)
    else:
        train, val = data, None
    backend = resolve_backend(cfg.backend, subset=train.ids is not None)
    rt = setup_runtime(cfg.device)
    try:
        lock = atomic.run_lock(out, "pretrain") if rt.is_main else contextlib.nullcontext()
        with lock:
            return _pretrain(cfg, rt, out, train, val, backend, t0)
    finally:
        teardown_runtime(rt)


def _pretrain(cfg: PretrainConfig, rt: Runtime, out: Path, train: TrainingData, val: TrainingData | None,
              backend: str, t0: float) -> TrainSummary:
    seed_everything(cfg.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = build_model(cfg.arch, train.num_classes, **cfg.model_options)
    model = prepare_model(model, rt, cfg.sync_bn)
    if rt.world_size > 1 and not rt.cuda and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                  for m in model.modules()):
        log.warning("BatchNorm statistics are per rank on the CPU (no SyncBatchNorm there)")
    global_batch = cfg.batch_size * rt.world_size
    lr_256 = cfg.lr if cfg.lr is not None else default_lr(cfg.arch)
    lr = lr_256 * global_batch / 256
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = batches_per_epoch(train.count, cfg.batch_size, cfg.workers, rt.world_size, backend)
    if steps < 1:
        raise ValueError(f"{train.count} training images give no batch of >= 2 per rank at batch size "
                         f"{cfg.batch_size} on {rt.world_size} rank(s)")
    schedule = Schedule(cfg.schedule, steps, steps * cfg.epochs, cfg.lr_step_epochs, cfg.lr_gamma,
                        warmup_steps=steps * cfg.warmup_epochs)
    sched = schedule.scheduler(opt)
    attack = Attack(cfg.adv_eps, cfg.adv_norm, cfg.adv_steps, cfg.adv_step_size) if cfg.adv_eps > 0 else None
    # adv_* only for adversarial runs: a standard run's settings stay those of earlier versions (resumable)
    plain = {k: v for k, v in config_dict(cfg).items()
             if (attack is not None or not k.startswith("adv_")) and k != "moco_views"}
    settings = {**plain, "lr": lr_256, "world_size": rt.world_size, "global_batch": global_batch,
                "train_data": train.identity()}  # lr: the one used, whether given or the arch's

    start_epoch, history = resume_from(out, cfg.resume, settings, SOFT_SETTINGS + ("world_size",),
                                       {"model": model}, opt, sched)
    if start_epoch and rt.is_main:
        log.info("resuming %s after epoch %d of %d", out / CHECKPOINT, start_epoch, cfg.epochs)
    ddp = wrap_ddp(model, rt)

    def train_epoch(epoch: int, bar) -> dict:
        ddp.train()
        lcfg = LoaderConfig(resolution=cfg.resolution, backend=backend, device=rt.device,
                            batch_size=cfg.batch_size, workers=cfg.workers, train=cfg.augment,
                            shuffle=True, seed=cfg.seed, epoch=epoch)
        batches = load_batches(train.tars, lcfg, rank=rt.rank, world_size=rt.world_size, ids=train.ids)
        zero = torch.zeros((), dtype=torch.float64, device=rt.device)
        sums = {"n": zero.clone(), "labelled": zero.clone(), "loss": zero.clone(), "top1": zero.clone(),
                "top5": zero.clone()}
        for b in usable_batches(batches, steps):
            y = b.labels.to(rt.device, non_blocking=True)
            x = to_input(b.images, rt)
            if attack is not None:  # on the augmented batch itself; the plain module: no DDP hooks
                x = attack(model, x, y)
            loss, logits = supervised_step(ddp, opt, x, y, rt, cfg.label_smoothing)
            sched.step()
            with torch.no_grad():
                keep = y >= 0
                sums["n"] += len(y)
                sums["labelled"] += keep.sum()
                sums["loss"] += loss * keep.sum()
                sums["top1"] += topk_correct(logits[keep], y[keep], 1).sum()
                sums["top5"] += topk_correct(logits[keep], y[keep], 5).sum()
            bar.update(len(y) * rt.world_size)
        return sums

    def summarize(t: dict) -> dict:
        k = max(t["labelled"], 1.0)
        row = {"loss": t["loss"] / k, "train_top1": t["top1"] / k}
        if train.num_classes >= 5:
            row["train_top5"] = t["top5"] / k
        return row

    def evaluate_epoch(epoch: int) -> dict:
        if val is None:
            return {}
        val_backend = resolve_backend(cfg.backend, subset=val.ids is not None)
        batches = loader_batches(val, resolution=cfg.resolution, backend=val_backend, batch_size=cfg.batch_size,
                                 workers=cfg.workers, rt=rt)
        return evaluate(model, batches, rt, num_classes=val.num_classes, prefix="val", attack=attack)

    def payload() -> dict:
        return {"filterx_checkpoint": CHECKPOINT_FORMAT, "kind": "pretrain", "arch": cfg.arch,
                "model_kwargs": dict(cfg.model_options), "num_classes": train.num_classes,
                "class_names": list(train.class_names), "resolution": cfg.resolution,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "settings": settings,
                "adversarial": attack.settings() if attack is not None else None}

    samples = epoch_images(train.count, rt.world_size)
    run = Run(out, "pretrain", cfg.epochs, samples, train_epoch, summarize, evaluate_epoch, payload,
              sched, cfg.seed, cfg.save_every, history)
    fit(run, rt, start_epoch, cfg.quiet)
    model_path = finish(run, rt, {})
    return TrainSummary("pretrain", out, model_path, cfg.epochs, start_epoch, rt.world_size,
                        time.perf_counter() - t0, list(run.history))


