"""train-encoder --objective moco: a filtering encoder trained without labels, then a probe.

The backbone is trained with MoCo v2 (:mod:`filterx.train.moco`, the objective ``pretrain
--objective moco`` uses, through the same epoch function :func:`filterx.train.moco_pretrain.moco_epoch`)
on every target image, labels unread, and with ``with_pool`` on the pool's images too (the
pool is large even when the target is small: the conditional pre-training setting of an
encoder for users without pretrained weights). Then a linear probe on the frozen features
gives the target classifier entropy and influence need: the probe of ``--probe-only``
(:func:`filterx.math.probe.fit_linear_probe`: mean cross-entropy + wd/2 ||theta||^2, L-BFGS to
convergence) on the target's seeded stratified training split, its held-out accuracy
measured on the rest. The contrastive stage sees the held-out images too, without their
labels; only the probe's training is restricted to the training split.

The encoder file has train-encoder's format (a torchvision ResNet whose ``fc`` is the probe,
ImageNet normalisation as in training, the split, ``config.weight_decay`` = the probe's for
influence), so every later command takes it as ``--encoder`` unchanged, and ``finetune
--init`` takes its backbone.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import filterx
from filterx.io import atomic
from filterx.io.dataset import Dataset
from filterx.models.encoder import ARCHS, ENCODER_FORMAT, state_tag
from filterx.train.encoder import check_held_out, decode_dataset, empty_classes
from filterx.math.splits import stratified_split
from filterx.decode.loader import IMAGENET_MEAN, IMAGENET_STD, load_batches, resolve_backend
from filterx.train.moco import default_queue_size
from filterx.train.moco_views import MocoAugment
from filterx.math.probe import fit_linear_probe
from filterx.stages.probe import _accuracy
from filterx.core.progress import progress
from filterx.core.runtime import resolve_device, seed_everything
from filterx.train.common import Schedule, reseed
from filterx.train.evaluation import center_crop
from filterx.train.runtime import Runtime, autocast
from filterx.train.data import batches_per_epoch
from filterx.train.moco_pretrain import build_moco, moco_epoch, moco_loader, view_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MocoEncoderConfig:
    target: Path
    out: Path
    arch: str = "resnet18"
    resolution: int = 112
    epochs: int = 200  # MoCo v2's
    batch_size: int = 64
    lr: float = 0.03  # per 256 images, scaled with batch_size; cosine schedule
    moco_weight_decay: float = 1e-4
    weight_decay: float = 5e-4  # the probe's (influence's Hessian uses it)
    val_fraction: float = 0.1
    with_pool: Path | None = None  # a dataset dir whose images join the contrastive training
    queue_size: int | None = None  # None: 65536, less for a small dataset (filterx.train.moco.default_queue_size)
    momentum: float = 0.999
    temperature: float = 0.2
    dim: int = 128
    bn_group: int = 32
    augment: MocoAugment = MocoAugment()  # the views; MoCo v2's unless set (README: a self-supervised encoder)
    # build_model's layout options (filterx.models.archs), e.g. {"width": 32, "stem": "small"} for
    # 32-64 px images on a CPU; {}: the published ResNet
    model_options: dict = field(default_factory=dict)
    backend: str = "auto"
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; valid: {', '.join(ARCHS)}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


@dataclass(frozen=True)
class MocoEncoderSummary:
    out: Path
    tag: str
    contrastive_images: int
    queue_size: int
    train_count: int
    val_count: int
    val_acc: float
    train_acc: float
    epochs: int
    seconds: float
    history: list = field(default_factory=list)

    def line(self) -> str:
        f = self.history[-1] if self.history else {}
        held = (f"held-out accuracy {self.val_acc:.1%} on {self.val_count} images" if self.val_count
                else "no held-out split (accuracy not measured; influence cannot use this encoder)")
        return (f"trained {self.tag} with MoCo v2 for {self.epochs} epochs on {self.contrastive_images} unlabelled "
                f"images (queue {self.queue_size}; final InfoNCE loss {f.get('loss', float('nan')):.4f}, "
                f"{f.get('img_s', 0):.0f} img/s), then a linear probe on {self.train_count} target images: {held} "
                f"(train {self.train_acc:.1%}); {self.seconds:.1f}s; saved to {self.out}")


def train_moco_encoder(cfg: MocoEncoderConfig) -> MocoEncoderSummary:
    """MoCo on ``cfg.target`` (+ ``cfg.with_pool``), a probe on the target; saved to ``cfg.out``."""
    t0 = time.perf_counter()
    ds = Dataset.open(cfg.target)
    present = np.unique(ds.labels[ds.labels >= 0])
    if ds.num_classes < 2 or len(present) < 2:
        raise ValueError(f"target {ds.root} has {len(present)} class(es) with images; the probe that gives the "
                         "encoder its head (a classifier) needs at least 2")
    check_held_out(ds, cfg.val_fraction)
    pool = Dataset.open(cfg.with_pool) if cfg.with_pool is not None else None
    out = Path(cfg.out)
    with atomic.run_lock(out.parent, f"train-encoder-{out.name}"):
        return _train_and_save(cfg, ds, pool, t0)


def contrastive_training(cfg: MocoEncoderConfig, tars: list[Path], count: int, rt: Runtime):
    """(trained MoCo, queue size, history) over every sample of ``tars`` (one process)."""
    backend = resolve_backend(cfg.backend)
    queue = cfg.queue_size if cfg.queue_size is not None else default_queue_size(count, cfg.batch_size)
    if cfg.queue_size is None and queue < 65536:
        log.info("moco: a queue of %d negatives (65536 would exceed half of the %d images)", queue, count)
    seed_everything(cfg.seed)
    moco = build_moco(cfg.arch, queue_size=queue, momentum=cfg.momentum, temperature=cfg.temperature,
                      dim=cfg.dim, bn_group=cfg.bn_group, model_options=cfg.model_options).to(rt.device)
    from filterx.train.moco import GroupedBN

    query = GroupedBN(moco.query, cfg.bn_group)
    opt = torch.optim.SGD(moco.query.parameters(), lr=cfg.lr * cfg.batch_size / 256, momentum=0.9,
                          weight_decay=cfg.moco_weight_decay)
    steps = batches_per_epoch(count, cfg.batch_size)
    if steps < 1:
        raise ValueError(f"{count} images give no batch of >= 2 at batch size {cfg.batch_size}")
    sched = Schedule("cosine", steps, steps * cfg.epochs).scheduler(opt)
    bar = progress(total=cfg.epochs * count, desc="train-encoder (moco)", quiet=cfg.quiet)
    history = []
    for epoch in range(cfg.epochs):
        reseed(cfg.seed, epoch, 0)
        t = time.perf_counter()
        batches = load_batches(tars, moco_loader(cfg.resolution, backend, rt.device, cfg.batch_size, cfg.workers,
                                                 cfg.seed, epoch))
        sums = moco_epoch(moco, query, opt, sched, batches, steps, resolution=cfg.resolution, seed=cfg.seed,
                          epoch=epoch, rt=rt, bar=bar, aug=cfg.augment)
        n = float(sums["n"])
        row = {"epoch": epoch, "loss": float(sums["loss"]) / max(n, 1.0), "moco_top1": float(sums["hit"]) / max(n, 1.0),
               "images": int(n), "img_s": n / max(time.perf_counter() - t, 1e-9)}
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        log.info("moco epoch %d %s", epoch, row)
    bar.close()
    return moco, queue, history


@torch.no_grad()
def frozen_features(backbone: torch.nn.Module, images: torch.Tensor, resolution: int, device: str,
                    batch_size: int = 256) -> np.ndarray:
    """(N, D) float32 features of uint8 ``images`` (N, 3, S, S): center crops of ``resolution``,
    ImageNet-normalised, ``backbone`` in eval mode."""
    backbone.eval()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    rt = Runtime(device)
    parts = []
    for i in range(0, len(images), batch_size):
        x = (center_crop(images[i : i + batch_size], resolution).to(device) - mean) / std
        with autocast(rt):
            parts.append(backbone(x).float().cpu())
    return torch.cat(parts).numpy() if parts else np.zeros((0, 0), np.float32)


def _train_and_save(cfg: MocoEncoderConfig, ds: Dataset, pool: Dataset | None, t0: float) -> MocoEncoderSummary:
    rt = Runtime(resolve_device(cfg.device))
    tars = ds.tar_paths() + (pool.tar_paths() if pool is not None else [])
    count = ds.num_samples + (pool.num_samples if pool is not None else 0)
    moco, queue, history = contrastive_training(cfg, tars, count, rt)

    train_ids, val_ids = stratified_split(ds.labels, cfg.val_fraction, cfg.seed)
    images = decode_dataset(ds, view_source(cfg.resolution), backend=cfg.backend, workers=cfg.workers, quiet=cfg.quiet)
    backbone = moco.query.backbone
    feats = frozen_features(backbone, images, cfg.resolution, rt.device)
    w, b, stats = fit_linear_probe(feats[train_ids], ds.labels[train_ids], ds.num_classes, cfg.weight_decay)
    val_acc = _accuracy(feats[val_ids], ds.labels[val_ids], w, b)
    train_acc = _accuracy(feats[train_ids], ds.labels[train_ids], w, b)
    state = {**moco.backbone_state(), "fc.weight": torch.from_numpy(w), "fc.bias": torch.from_numpy(b)}
    tag = state_tag(cfg.arch, cfg.resolution, state)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()}
    config["augment"] = dataclasses.asdict(cfg.augment)  # plain values: the file loads with weights_only
    payload = {
        "filterx_encoder": ENCODER_FORMAT,
        "filterx_version": filterx.__version__,
        "tag": tag,
        "arch": cfg.arch,
        "model_kwargs": dict(cfg.model_options),
        "resolution": cfg.resolution,
        "num_classes": ds.num_classes,
        "class_names": [c.name for c in ds.classes],
        "empty_classes": empty_classes(ds),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "feature_dim": int(feats.shape[1]),
        "state_dict": state,
        "objective": "moco",
        "head": "linear probe",
        "target": {"root": str(ds.root), "fingerprint": ds.fingerprint},
        "pool": {"root": str(pool.root), "fingerprint": pool.fingerprint} if pool is not None else None,
        "train_ids": train_ids.tolist(),
        "val_ids": val_ids.tolist(),
        "metrics": {"val_acc": val_acc, "train_acc": train_acc, "moco_queue": queue, "history": history, **stats},
        "config": {**config, "objective": "moco", "label_smoothing": 0.0},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic.write_bytes(cfg.out, buf.getvalue())
    return MocoEncoderSummary(Path(cfg.out), tag, count, queue, len(train_ids), len(val_ids), val_acc, train_acc,
                              cfg.epochs, time.perf_counter() - t0, history)
