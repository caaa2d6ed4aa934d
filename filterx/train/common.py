"""What pretrain and finetune share: learning-rate schedules, seeds, the supervised step, and the
epoch loop with resumption. The device and ranks are in :mod:`filterx.train.runtime`, evaluation
in :mod:`filterx.train.evaluation`, checkpoints and the output files in
:mod:`filterx.train.checkpoints`, the data sources in :mod:`filterx.train.data`.

Exact resumption: everything random in an epoch is a function of (seed, epoch, rank) only. The
loader's shuffle is seeded with (seed, epoch), its augmentation with (seed, epoch, rank, batch);
torch/numpy/python RNGs are reseeded from (seed, epoch, rank) at the start of every epoch
(dropout, new heads). So an epoch
run after a restart from the previous epoch's checkpoint (model, optimizer, scheduler) computes
exactly what the uninterrupted run did, on the same machine and thread count.
"""

from __future__ import annotations

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
from filterx.core import collectives
from filterx.core.faults import crash_point
from filterx.core.progress import progress
from filterx.decode.loader import samples_per_rank
from filterx.train.checkpoints import CHECKPOINT, CHECKPOINT_FORMAT, METRICS, MODEL, load_checkpoint, rng_states, \
    save_checkpoint, write_metrics
from filterx.train.runtime import Runtime, autocast, prepare_model, to_input

log = logging.getLogger(__name__)

SCHEDULES = ("step", "cosine", "inv")


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



# ---------------------------------------------------------------- losses


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


# The names tests and benchmarks import from here, besides this module's own (the output files and
# the runtime moved to filterx.train.checkpoints and filterx.train.runtime).
__all__ = [
    "CHECKPOINT", "CHECKPOINT_FORMAT", "METRICS", "MODEL", "PRETRAIN_SOFT_SETTINGS", "SCHEDULES", "Run", "Runtime",
    "Schedule", "TrainSummary", "epoch_images", "finish", "fit", "labelled_cross_entropy", "load_checkpoint",
    "prepare_model", "reseed", "supervised_step", "to_input",
]
