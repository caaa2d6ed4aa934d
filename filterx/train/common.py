"""What pretrain and finetune share: the torchrun runtime, learning-rate schedules, the
supervised step, evaluation, checkpoints, and the epoch loop with resumption (the data
sources are in :mod:`filterx.train.data`).

Exact resumption: everything random in an epoch is a function of (seed, epoch, rank) only. The
loader's shuffle is seeded with (seed, epoch), its augmentation with (seed, epoch, rank, batch);
torch/numpy/python RNGs are reseeded from (seed, epoch, rank) at the start of every epoch
(dropout, new heads). So an epoch
run after a restart from the previous epoch's checkpoint (model, optimizer, scheduler) computes
exactly what the uninterrupted run did, on the same machine and thread count.

Output directory (written by rank 0, atomically):

    checkpoint.pt    the full state after the latest epoch (resume reads it)
    epoch_NNNN.pt    the same, kept every ``save_every`` epochs when asked
    metrics.jsonl    one JSON line per epoch (loss, top-1/top-5, lr, img/s, ...)
    model.pt         the final weights with arch, classes and metrics (what finetune reads)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import filterx
from filterx.io import atomic
from filterx.core import collectives
from filterx.core.faults import crash_point
from filterx.decode.loader import LoaderConfig, load_batches, samples_per_rank
from filterx.core.progress import progress
from filterx.core.runtime import init_distributed, load_marked_dict, resolve_device
from filterx.train.data import TrainingData

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
MODEL = "model.pt"
CHECKPOINT_FORMAT = 1
SCHEDULES = ("step", "cosine", "inv")


def default_workers() -> int:
    """Decode workers when none are asked for: the cores this process may use, at most 4 (more
    than the cores only makes the DataLoader warn and the workers compete)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


# ---------------------------------------------------------------- runtime


@dataclass(frozen=True)
class Runtime:
    device: str
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this run initialised torch.distributed (and tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def setup_runtime(device: str) -> Runtime:
    """Resolve the device and join the torchrun job, if any (NCCL on CUDA, gloo on the CPU)."""
    import torch.distributed as dist

    device = resolve_device(device)
    was_up = dist.is_available() and dist.is_initialized()
    info = init_distributed(device)
    if device == "cuda":
        device = f"cuda:{info.local_rank}"
    return Runtime(device, info.rank, info.world_size, owns_group=info.world_size > 1 and not was_up)


def teardown_runtime(rt: Runtime) -> None:
    import torch.distributed as dist

    if rt.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def autocast(rt: Runtime):
    """bf16 autocast on CUDA; full float32 on the CPU (bf16 CPU kernels are slower there)."""
    if rt.cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_input(x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    x = x.to(rt.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if rt.cuda else x


def prepare_model(model: nn.Module, rt: Runtime, sync_bn: bool) -> nn.Module:
    """On the device, channels_last on CUDA, SyncBatchNorm across ranks on CUDA when asked
    (torch has no CPU SyncBatchNorm: on the CPU each rank normalises with its own batch)."""
    if sync_bn and rt.world_size > 1 and rt.cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(rt.device)
    return model.to(memory_format=torch.channels_last) if rt.cuda else model


def wrap_ddp(model: nn.Module, rt: Runtime) -> nn.Module:
    if rt.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(rt.device).index] if rt.cuda else None
    return DistributedDataParallel(model, device_ids=ids)


# ---------------------------------------------------------------- schedules and seeds


@dataclass(frozen=True)
class Schedule:
    """Learning-rate multiplier per training step (LambdaLR): ``step`` (x ``gamma`` every
    ``step_epochs``), ``cosine``, or ``inv`` = (1 + inv_gamma p) ** -inv_power with p the
    training progress 0 -> 1 (Ganin & Lempitsky's domain-adaptation schedule); times a linear
    warm-up over the first ``warmup_steps``."""

    kind: str
    steps_per_epoch: int
    total_steps: int
    step_epochs: int = 30
    gamma: float = 0.1
    inv_gamma: float = 10.0
    inv_power: float = 0.75
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; valid: {', '.join(SCHEDULES)}")

    def factor(self, step: int) -> float:
        p = min(1.0, step / max(1, self.total_steps))
        if self.kind == "step":
            f = self.gamma ** ((step // max(1, self.steps_per_epoch)) // max(1, self.step_epochs))
        elif self.kind == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * p))
        else:
            f = (1.0 + self.inv_gamma * p) ** (-self.inv_power)
        if step < self.warmup_steps:
            f *= (step + 1) / self.warmup_steps
        return f

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        # a lambda (not this object) so that the schedule's settings are not saved in, and
        # restored from, the scheduler's state: a resumed run may extend ``epochs``.
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: self.factor(s))


def reseed(seed: int, epoch: int, rank: int) -> None:
    """Seed torch, numpy and python from (seed, epoch, rank) alone (see the module doc)."""
    a, b = np.random.SeedSequence([seed, epoch, rank]).generate_state(2)
    torch.manual_seed(int(a))
    np.random.seed(int(b))
    random.seed(int(a) ^ int(b))


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------- losses and evaluation


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the labelled rows (label >= 0); 0 (not NaN) when there are none,
    so that a rank with an unlabelled batch still takes its DDP step."""
    per = F.cross_entropy(logits, labels.clamp_min(0), reduction="none", label_smoothing=label_smoothing)
    keep = (labels >= 0).to(per.dtype)
    return (per * keep).sum() / keep.sum().clamp_min(1.0)


def supervised_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                    rt: Runtime, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of the pretrain loop on a batch already on the device: forward (bf16
    autocast on CUDA), labelled cross-entropy in float32, backward (DDP all-reduces the
    gradients here), optimizer step. Returns (loss, logits), detached."""
    with autocast(rt):
        logits = model(x)
    loss = labelled_cross_entropy(logits.float(), y, label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    crash_point("train.step")
    return loss.detach(), logits.detach()


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) bool: the label is among the ``k`` highest logits (k capped at the class count)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1)


@torch.no_grad()
def evaluate(model: nn.Module, data: TrainingData, *, resolution: int, backend: str, batch_size: int,
             workers: int, rt: Runtime, prefix: str = "val", attack: Callable | None = None) -> dict:
    """Top-1 (and top-5 with >= 5 classes) accuracy and mean loss of ``model`` over the
    labelled samples of ``data`` (center crops), each rank reading its share; exact under DDP
    (the padding the loader adds to even out ranks is removed by sample id). With ``attack``
    (``attack(model, x, y) -> x_adv``, e.g. :class:`filterx.train.adversarial.Attack`) also the
    top-1 and loss on the attacked images (``{prefix}_robust_top1``, ``{prefix}_robust_loss``)."""
    was_training = model.training
    model.eval()
    cfg = LoaderConfig(resolution=resolution, backend=backend, device=rt.device, batch_size=batch_size,
                       workers=workers, train=False, shuffle=False)
    ids, top1, top5, losses, robust_top1, robust_losses = [], [], [], [], [], []
    for b in load_batches(data.tars, cfg, rank=rt.rank, world_size=rt.world_size, ids=data.ids):
        x = to_input(b.images, rt)
        with autocast(rt):
            logits = model(x).float()
        y = b.labels.to(logits.device)
        keep = y >= 0
        logits, y = logits[keep], y[keep]
        ids.append(b.ids[keep.cpu()].numpy())
        top1.append(topk_correct(logits, y, 1).cpu().numpy())
        top5.append(topk_correct(logits, y, 5).cpu().numpy())
        losses.append(F.cross_entropy(logits, y, reduction="none").cpu().numpy())
        if attack is not None:
            x_adv = attack(model, x[keep], y)  # grad-enabled inside; the model stays in eval mode
            with autocast(rt):
                adv_logits = model(x_adv).float()
            robust_top1.append(topk_correct(adv_logits, y, 1).cpu().numpy())
            robust_losses.append(F.cross_entropy(adv_logits, y, reduction="none").cpu().numpy())
    model.train(was_training)
    parts = [np.concatenate(a) if a else np.zeros(0)
             for a in (ids, top1, top5, losses, robust_top1, robust_losses)]
    if rt.world_size > 1:
        gathered = collectives.all_gather_object(parts)
        parts = [np.concatenate([g[i] for g in gathered]) for i in range(len(parts))]
    ids_all, first = np.unique(parts[0].astype(np.int64), return_index=True)
    n = len(ids_all)
    out = {f"{prefix}_top1": float(parts[1][first].mean()) if n else float("nan"),
           f"{prefix}_loss": float(parts[3][first].mean()) if n else float("nan"),
           f"{prefix}_count": n}
    if data.num_classes >= 5:
        out[f"{prefix}_top5"] = float(parts[2][first].mean()) if n else float("nan")
    if attack is not None:
        out[f"{prefix}_robust_top1"] = float(parts[4][first].mean()) if n else float("nan")
        out[f"{prefix}_robust_loss"] = float(parts[5][first].mean()) if n else float("nan")
    return out


# ---------------------------------------------------------------- checkpoints


def config_dict(cfg) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()}


def save_checkpoint(path: Path, payload: dict) -> None:
    with atomic.atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """A filterx checkpoint / model file (pretrain or finetune); clear errors for other files."""
    return load_marked_dict(path, "filterx_checkpoint", CHECKPOINT_FORMAT, "checkpoint",
                            "filterx pretrain / finetune")


def resume_from(out: Path, resume: bool, settings: dict, soft: tuple[str, ...],
                modules: dict[str, nn.Module | None], opt, sched) -> tuple[int, list[dict]]:
    """(start epoch, history): restore ``out/checkpoint.pt`` into ``modules`` (checkpoint key ->
    module; None entries skipped), the optimizer, scheduler and RNG states when resuming.

    A checkpoint without ``resume`` is refused (no silent overwrite); settings that differ from
    the saved run, other than ``soft`` ones, are refused by name.
    """
    path = out / CHECKPOINT
    if not path.exists():
        return 0, []
    if not resume:
        raise ValueError(f"{out} already holds a training run ({CHECKPOINT}); pass resume=True "
                         "(--resume) to continue it, or choose another output dir")
    saved = load_checkpoint(path)
    check_resumable(saved["settings"], settings, soft, path)
    for key, module in modules.items():
        if module is not None:
            module.load_state_dict(saved[key])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    set_rng_states(saved["rng"])
    return int(saved["epoch"]), list(saved["history"])


def check_resumable(saved: dict, current: dict, soft: tuple[str, ...], path: Path) -> None:
    """Raise ValueError when a resumed run changes a setting that changes its results; warn
    for ``soft`` ones (epochs, workers, device ...)."""
    ignore = {"resume", "quiet", "out"}
    diff = {k: (saved.get(k), v) for k, v in current.items() if k not in ignore and saved.get(k) != v}
    hard = {k: d for k, d in diff.items() if k not in soft}
    if hard:
        changes = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in hard.items())
        raise ValueError(f"cannot resume {path} with other settings ({changes}); "
                         "use the original settings or another output dir")
    for k, (a, b) in diff.items():
        log.warning("resuming %s with %s changed from %r to %r: the result will differ from an "
                    "uninterrupted run", path, k, a, b)


def write_metrics(out: Path, history: list[dict]) -> None:
    atomic.write_text(out / METRICS, "".join(json.dumps(row) + "\n" for row in history))


# ---------------------------------------------------------------- the epoch loop


@dataclass
class Run:
    """One training run as the loop sees it. ``train_epoch(epoch, bar)`` returns the summed
    statistics of the epoch on this rank (a dict of float tensors, ``n`` = images);
    ``summarize`` turns the all-reduced sums into the logged metrics; ``evaluate(epoch)``
    returns held-out metrics; ``payload()`` the checkpoint contents besides epoch/history."""

    out: Path
    desc: str
    epochs: int
    samples_per_epoch: int  # over all ranks
    train_epoch: Callable[[int, object], dict]
    summarize: Callable[[dict], dict]
    evaluate: Callable[[int], dict]
    payload: Callable[[], dict]
    scheduler: torch.optim.lr_scheduler.LRScheduler
    seed: int
    save_every: int = 0
    history: list = field(default_factory=list)


def fit(run: Run, rt: Runtime, start_epoch: int, quiet: bool) -> list[dict]:
    """Epochs ``start_epoch .. run.epochs - 1``; after each, rank 0 saves the checkpoint and
    the metrics; all ranks then wait for it (so that a crash never loses a saved epoch)."""
    bar = progress(total=run.epochs * run.samples_per_epoch, desc=run.desc, quiet=quiet or not rt.is_main)
    bar.initial = bar.n = start_epoch * run.samples_per_epoch
    bar.refresh()
    for epoch in range(start_epoch, run.epochs):
        reseed(run.seed, epoch, rt.rank)
        lr = float(run.scheduler.get_last_lr()[0])
        t0 = time.perf_counter()
        sums = run.train_epoch(epoch, bar)
        keys = sorted(sums)
        total = collectives.all_reduce_sum(torch.stack([sums[k].detach().double() for k in keys]))
        seconds = time.perf_counter() - t0
        totals = dict(zip(keys, total.tolist()))
        row = {"epoch": epoch, "lr": lr, **run.summarize(totals), "images": int(totals["n"]),
               "img_s": totals["n"] / max(seconds, 1e-9), "seconds": seconds}
        row.update(run.evaluate(epoch))
        run.history.append(row)
        if rt.is_main:
            payload = {**run.payload(), "epoch": epoch + 1, "history": run.history, "rng": rng_states()}
            save_checkpoint(run.out / CHECKPOINT, payload)
            if run.save_every and (epoch + 1) % run.save_every == 0:
                save_checkpoint(run.out / f"epoch_{epoch + 1:04d}.pt", payload)
            write_metrics(run.out, run.history)
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            log.info("%s epoch %d/%d %s", run.desc, epoch + 1, run.epochs, shown)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "val_top1", "test_top1") if k in row})
        collectives.barrier()
        crash_point("train.epoch")
    bar.close()
    return run.history


def finish(run: Run, rt: Runtime, extra: dict) -> Path:
    """Write ``model.pt`` (rank 0): the final weights and metadata, without optimizer state."""
    path = run.out / MODEL
    if rt.is_main:
        payload = {k: v for k, v in run.payload().items() if k not in ("optimizer", "scheduler")}
        save_checkpoint(path, {**payload, **extra, "epoch": len(run.history), "history": run.history,
                               "filterx_version": filterx.__version__})
    collectives.barrier()
    return path


@dataclass(frozen=True)
class TrainSummary:
    kind: str
    out: Path
    model: Path
    epochs: int
    start_epoch: int
    world_size: int
    seconds: float
    history: list = field(default_factory=list)

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    def best(self, key: str) -> tuple[float, int] | None:
        """(best value of ``key``, its epoch), or None when no epoch logged it."""
        rows = [(r[key], r["epoch"]) for r in self.history if key in r and not math.isnan(r[key])]
        return max(rows, key=lambda t: (t[0], -t[1])) if rows else None

    def line(self) -> str:
        f = self.final
        parts = [f"{self.kind}: {self.epochs} epochs"
                 + (f" (resumed at {self.start_epoch})" if self.start_epoch else "")
                 + f" on {self.world_size} rank(s) in {self.seconds:.1f}s"]
        timed = [r for r in self.history if "images" in r and "seconds" in r]
        if timed:
            rate = sum(r["images"] for r in timed) / max(sum(r["seconds"] for r in timed), 1e-9)
            parts.append(f"{timed[-1]['images']} images per epoch, {rate:.0f} img/s")
        if "loss" in f:
            parts.append(f"final loss {f['loss']:.4f}")
        best = self.best("val_top1")
        if best:
            parts.append(f"val_top1 {f['val_top1']:.1%} (best {best[0]:.1%} at epoch {best[1]})")
        if "val_robust_top1" in f:
            parts.append(f"val_robust_top1 {f['val_robust_top1']:.1%} under the training attack")
        if "test_top1" in f:  # reported at the epoch validation chose, never its own best
            at = next((r for r in self.history if r["epoch"] == best[1]), None) if best else None
            if at is not None and "test_top1" in at:
                parts.append(f"test_top1 {at['test_top1']:.1%} at epoch {best[1]}, the best on val "
                             f"(last epoch {f['test_top1']:.1%})")
            else:
                parts.append(f"test_top1 {f['test_top1']:.1%} (last epoch)")
        parts.append(f"saved to {self.model} (checkpoint.pt and metrics.jsonl beside it)")
        return "; ".join(parts)


# Settings a resumed pre-training run may change without a ValueError (it warns that results will
# differ). Paths may move between runs: the data's fingerprint and count (train_data) must not change.
PRETRAIN_SOFT_SETTINGS = ("epochs", "workers", "backend", "device", "save_every", "batch_size", "data", "val")


def epoch_images(count: int, world_size: int) -> int:
    """Images an epoch feeds over all ranks (for the progress bar; padding included)."""
    return samples_per_rank(count, world_size) * world_size
