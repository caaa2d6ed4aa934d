"""finetune: a pretrained network (or a fresh one, the baseline) trained on the target.

    finetune(FinetuneConfig(target="office/amazon", out="runs/ft", init="runs/r50/model.pt",
                            test="office/amazon-test"))

The pretrained head is replaced by a new one for the target's classes, which learns ``head_lr_mult``
(10) times faster than the backbone; ``freeze_backbone`` trains the head alone (a linear probe:
the backbone, BatchNorm statistics included, stays bit-for-bit as loaded, because its params get
no gradient and its modules stay in eval mode). Transfer studies' variants (:mod:`filterx.train.partial_init`):
``init_blocks`` N loads only the stem and the first N stages of ``init`` (the rest keeps a fresh
initialisation); ``train_blocks`` K trains only the last K stages and the head, the earlier
ones frozen like the linear probe's backbone (``freeze_backbone`` is ``train_blocks=0``). Schedules: ``inv`` (default), lr x (1 + 10 p) ** -0.75
with p the training progress 0 -> 1 as in domain-adaptation work, ``step`` or ``cosine``.

Unsupervised domain adaptation towards an ``unlabeled`` dataset (the labelled target is the
"source" domain here, the unlabelled images the "target" domain):

- ``dann`` (Ganin & Lempitsky 2015): a domain classifier MLP reads the backbone's features
  through a gradient reversal layer whose coefficient follows 2 / (1 + exp(-10 p)) - 1, so the
  backbone learns features the classifier cannot tell apart;
- ``pseudo-label`` (Lee 2013, with FixMatch's cut-off): unlabelled images whose max softmax is
  at least ``pseudo_threshold`` (0.95) join the loss with their argmax as the label.

Each step feeds the labelled and the unlabelled batch through the network together (the
modules and losses: :mod:`filterx.train.adaptation`).

Model selection never looks at the test data. A seeded, stratified validation split
(``val_fraction`` of every class) is carved out of the training data; every epoch is evaluated
on it and on the test data (``test``, or else a held-out ``test_fraction`` of the target,
carved first). The selected epoch is the one of highest ``val_top1``, and the number to report
is ``test_top1`` at that epoch (``test_top1_at_best_val``; the last epoch's as well). model.pt
holds the last epoch's weights.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from filterx.io import atomic
from filterx.core.faults import crash_point
from filterx.decode.loader import Batch, LoaderConfig, load_batches, resolve_backend
from filterx.models.archs import (
    backbone_and_head, build_model, feature_dim, list_models, replace_head,
)
from filterx.train.partial_init import block_record, check_block_options, check_blocks, freeze_stages, load_stages
from filterx.core.runtime import seed_everything
from filterx.train.checkpoints import (
    CHECKPOINT_FORMAT, MODEL, config_dict, load_initial_weights, resume_from,
)
from filterx.train.adaptation import (
    DomainClassifier, FinetuneNet, dann_lambda, finetune_loss, grad_reverse, pseudo_label_loss,
)
from filterx.train.common import SCHEDULES, Run, Schedule, TrainSummary, finish, fit
from filterx.train.evaluation import evaluate, loader_batches
from filterx.train.runtime import (
    Runtime, autocast, default_workers, prepare_model, setup_runtime, teardown_runtime, to_input, wrap_ddp,
)
from filterx.train.data import (
    TrainingData, batches_per_epoch, held_out_split, resolve_training_data, usable_batches,
)

log = logging.getLogger(__name__)

METHODS = ("plain", "dann", "pseudo-label")
# Paths may move between runs: the target's fingerprint and count (train_data) must not change.
SOFT_SETTINGS = ("epochs", "workers", "backend", "device", "save_every", "world_size", "target", "test",
                 "unlabeled", "init")


@dataclass(frozen=True)
class FinetuneConfig:
    target: Path  # labelled target training data: dataset dir or manifest
    out: Path
    init: Path | None = None  # pretrain model.pt / checkpoint.pt or an encoder file; None: from scratch
    arch: str | None = None  # from scratch (or a check against init's arch)
    test: Path | None = None  # target test data; else ``test_fraction`` of ``target`` held out
    test_fraction: float = 0.2  # without ``test``: share of every class of the target kept for test
    val_fraction: float = 0.1  # share of every training class kept to select the epoch (0: none)
    unlabeled: Path | None = None  # unlabelled target-domain images (dann / pseudo-label)
    method: str = "plain"  # plain | dann | pseudo-label
    freeze_backbone: bool = False  # the head alone: the same as train_blocks=0
    init_blocks: int | None = None  # with init: load the stem + the first N stages only; None: all
    train_blocks: int | None = None  # train the last K stages + the head only; None: everything
    resolution: int = 224
    epochs: int = 20
    batch_size: int = 32  # per rank
    lr: float = 0.001  # the backbone's; not scaled with the batch
    head_lr_mult: float = 10.0  # the new head's (and the domain classifier's) lr multiple
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "inv"  # inv | step | cosine
    inv_gamma: float = 10.0
    inv_power: float = 0.75
    lr_step_epochs: int = 10
    lr_gamma: float = 0.1
    label_smoothing: float = 0.0
    dann_hidden: int = 1024
    pseudo_threshold: float = 0.95
    pseudo_weight: float = 1.0
    augment: bool = True
    model_options: dict = field(default_factory=dict)  # build_model kwargs, over the init's
    sync_bn: bool = True
    backend: str = "auto"
    device: str = "auto"
    workers: int = field(default_factory=default_workers)  # min(4, the cores available)
    seed: int = 0
    resume: bool = False
    save_every: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.method != "plain" and self.unlabeled is None:
            raise ValueError(f"method {self.method!r} needs an unlabeled target-domain dataset")
        if self.method == "plain" and self.unlabeled is not None:
            raise ValueError("unlabeled data is used by methods dann and pseudo-label only, not plain")
        check_block_options(self.init_blocks, self.train_blocks, has_init=self.init is not None,
                            freeze_backbone=self.freeze_backbone, method=self.method)
        if self.init is None and self.arch is None:
            raise ValueError(f"from scratch (no init checkpoint) needs an arch; valid: {', '.join(list_models())}")
        if self.arch is not None and self.arch not in list_models():
            raise ValueError(f"unknown arch {self.arch!r}; valid: {', '.join(list_models())}")
        if self.arch is not None:  # with init, checked again against the checkpoint's arch
            check_blocks(self.arch, self.init_blocks, self.trained_blocks, has_init=self.init is not None)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if not 0.0 < self.pseudo_threshold <= 1.0:
            raise ValueError(f"pseudo_threshold must be in (0, 1], got {self.pseudo_threshold}")
        for name in ("epochs", "batch_size", "lr_step_epochs", "dann_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.test is None and not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"without a test dataset test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1) (0: no validation split), got {self.val_fraction}")

    @property
    def trained_blocks(self) -> int | None:
        """The stages trained besides the head: ``train_blocks``, 0 with ``freeze_backbone``."""
        return 0 if self.freeze_backbone else self.train_blocks


# ---------------------------------------------------------------- model set-up


def initial_model(cfg: FinetuneConfig, num_classes: int) -> tuple[nn.Module, str, dict]:
    """(model with a fresh ``num_classes`` head, arch, model kwargs): loaded from ``cfg.init``
    (its stem and first ``cfg.init_blocks`` stages only, when set) or built from scratch."""
    if cfg.init is None:
        kwargs = dict(cfg.model_options)
        return build_model(cfg.arch, num_classes, **kwargs), cfg.arch, kwargs
    init = load_initial_weights(cfg.init)
    arch = init["arch"]
    if cfg.arch is not None and cfg.arch != arch:
        raise ValueError(f"init checkpoint {cfg.init} holds a {arch}, not the {cfg.arch} asked for")
    check_blocks(arch, cfg.init_blocks, cfg.trained_blocks, has_init=True)
    kwargs = {**init["model_kwargs"], **cfg.model_options}
    model = build_model(arch, init["num_classes"], **kwargs)
    load_stages(model, arch, init["state_dict"], cfg.init_blocks)
    replace_head(model, num_classes)
    return model, arch, kwargs


def unlabeled_batches(data: TrainingData, base: LoaderConfig, epoch: int, rt: Runtime) -> Iterator[Batch]:
    """Endless unlabelled batches for one epoch: passes k = 0, 1, ... over ``data``, each
    shuffled by (seed, epoch, k) so that a resumed epoch sees the same images."""
    for k in itertools.count():
        cfg = replace(base, epoch=epoch * 1000 + k)
        got = False
        for b in load_batches(data.tars, cfg, rank=rt.rank, world_size=rt.world_size, ids=data.ids):
            got = True
            yield b
        if not got:
            raise ValueError(f"unlabeled data {data.source} gave no images")


def _same_classes(a: TrainingData, b: TrainingData) -> None:
    """Labels are class indices, so the target and the test data must list the same classes in
    the same order; the error names the classes that differ."""
    if a.class_names == b.class_names:
        return
    only_test = [n for n in b.class_names if n not in a.class_names]
    only_target = [n for n in a.class_names if n not in b.class_names]
    what = (f"classes only in the test data: {only_test[:10]}, only in the target: {only_target[:10]}"
            if only_test or only_target else "the same classes in another order")
    raise ValueError(f"test data {b.source} and target {a.source} must list the same classes (labels are "
                     f"class indices); {what}; give both the same class folders (shard keeps an empty "
                     "folder as a class)")


def _check_test_coverage(train: TrainingData, test: TrainingData) -> None:
    """Warn about test images of classes the training data has no image of: the head's output
    for them is never trained, so they count as errors in test_top1 (the accuracy is right,
    but would puzzle without a word)."""
    tested = test.labels[test.labels >= 0]
    untrained = np.setdiff1d(tested, train.labels[train.labels >= 0])
    if len(untrained):
        n = int(np.isin(tested, untrained).sum())
        log.warning("%d of the %d test images are of %d classes the training data has no image of "
                    "(they count as errors): %s", n, len(tested), len(untrained),
                    ", ".join(test.class_names[i] for i in untrained))


# ---------------------------------------------------------------- finetune


def split_target(cfg: FinetuneConfig) -> tuple[TrainingData, TrainingData | None, TrainingData]:
    """(train, validation or None, test): test is ``cfg.test`` or else ``test_fraction`` of the
    target; validation is ``val_fraction`` of what remains, so the three never share an image."""
    target = resolve_training_data(cfg.target)
    if cfg.test is not None:
        train, test = target, resolve_training_data(cfg.test)
        _same_classes(target, test)
    else:
        train, test = held_out_split(target, cfg.test_fraction, cfg.seed, what="test")
    val = None
    if cfg.val_fraction > 0:
        train, val = held_out_split(train, cfg.val_fraction, cfg.seed, what="validation")
    return train, val, test


def selected_epoch(history: list[dict]) -> dict:
    """What a run reports: the epoch of highest ``val_top1`` (the earliest on ties) and
    ``test_top1`` there, with the last epoch's ``test_top1``. Test data never chooses."""
    out: dict = {"test_top1_last": history[-1].get("test_top1") if history else None}
    rows = [r for r in history if not math.isnan(r.get("val_top1", math.nan))]
    if rows:
        best = max(rows, key=lambda r: (r["val_top1"], -r["epoch"]))
        out.update(best_val_top1=best["val_top1"], best_val_epoch=best["epoch"],
                   test_top1_at_best_val=best.get("test_top1"))
    else:
        out.update(best_val_top1=None, best_val_epoch=None, test_top1_at_best_val=None)
    return out


def finetune(cfg: FinetuneConfig) -> TrainSummary:
    """Fine-tune on ``cfg.target`` (see the module doc). The summary's history has per epoch
    loss, train_top1, val_top1/val_loss (with a validation split), test_top1/test_loss (+ top5
    with >= 5 classes), lr (the first parameter group's: the backbone's, or the head's when it
    is frozen), img_s, and for dann domain_loss/domain_acc, for pseudo-label pseudo_share;
    ``selected_epoch(summary.history)`` (also in model.pt) is what to report."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    train, val, test = split_target(cfg)
    _check_test_coverage(train, test)
    unlabeled = resolve_training_data(cfg.unlabeled) if cfg.unlabeled is not None else None
    backend = resolve_backend(cfg.backend, subset=train.ids is not None)
    rt = setup_runtime(cfg.device)
    try:
        lock = atomic.run_lock(out, "finetune") if rt.is_main else contextlib.nullcontext()
        with lock:
            return _finetune(cfg, rt, out, train, val, test, unlabeled, backend, t0)
    finally:
        teardown_runtime(rt)


def _finetune(cfg: FinetuneConfig, rt: Runtime, out: Path, train: TrainingData, val: TrainingData | None,
              test: TrainingData, unlabeled: TrainingData | None, backend: str, t0: float) -> TrainSummary:
    seed_everything(cfg.seed)
    net, arch, kwargs = initial_model(cfg, train.num_classes)
    domain = DomainClassifier(feature_dim(net), cfg.dann_hidden) if cfg.method == "dann" else None
    ft = prepare_model(FinetuneNet(net, domain), rt, cfg.sync_bn)
    net = ft.net
    frozen_modules = freeze_stages(net, arch, cfg.trained_blocks)  # before the optimizer and DDP see them
    blocks = block_record(arch, cfg.init_blocks, cfg.trained_blocks, cfg.init is not None)
    log.info("finetune %s: loaded %s; re-initialised %s; frozen %s", arch, blocks["loaded"] or "nothing",
             blocks["reinitialised"] or "nothing", blocks["frozen"] or "nothing")
    backbone, head = backbone_and_head(net)
    groups = [{"params": [p for p in backbone.parameters() if p.requires_grad], "lr": cfg.lr},
              {"params": list(head.parameters()), "lr": cfg.lr * cfg.head_lr_mult},
              {"params": list(domain.parameters()) if domain is not None else [], "lr": cfg.lr * cfg.head_lr_mult}]
    opt = torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    steps = batches_per_epoch(train.count, cfg.batch_size, cfg.workers, rt.world_size, backend)
    if steps < 1:
        raise ValueError(f"{train.count} target images give no batch of >= 2 per rank at batch size "
                         f"{cfg.batch_size} on {rt.world_size} rank(s)")
    total_steps = steps * cfg.epochs
    schedule = Schedule(cfg.schedule, steps, total_steps, cfg.lr_step_epochs, cfg.lr_gamma,
                        cfg.inv_gamma, cfg.inv_power)
    sched = schedule.scheduler(opt)
    settings = {**config_dict(cfg), "world_size": rt.world_size, "arch": arch,
                "train_data": train.identity(), "val_data": val.identity() if val is not None else None}

    start_epoch, history = resume_from(out, cfg.resume, settings, SOFT_SETTINGS,
                                       {"model": net, "domain": domain}, opt, sched)
    ddp = wrap_ddp(ft, rt)
    loader = LoaderConfig(resolution=cfg.resolution, backend=backend, device=rt.device,
                          batch_size=cfg.batch_size, workers=cfg.workers, train=cfg.augment,
                          shuffle=True, seed=cfg.seed)
    unl_loader = None
    if unlabeled is not None:
        unl_backend = resolve_backend(cfg.backend, subset=unlabeled.ids is not None)
        unl_loader = replace(loader, backend=unl_backend, seed=cfg.seed + 1)

    def train_epoch(epoch: int, bar) -> dict:
        ddp.train()
        for m in frozen_modules:  # BatchNorm keeps its running statistics, dropout is off
            m.eval()
        batches = load_batches(train.tars, replace(loader, epoch=epoch), rank=rt.rank,
                               world_size=rt.world_size, ids=train.ids)
        unl = unlabeled_batches(unlabeled, unl_loader, epoch, rt) if unlabeled is not None else None
        sums: dict[str, torch.Tensor] = {}
        try:
            for i, b in enumerate(usable_batches(batches, steps)):
                lam = dann_lambda((epoch * steps + i) / total_steps)
                x_u = to_input(next(unl).images, rt) if unl is not None else None
                y = b.labels.to(rt.device, non_blocking=True)
                with autocast(rt):
                    logits, dom = ddp(to_input(b.images, rt), x_u, lam)
                loss, stats = finetune_loss(logits, dom, y, method=cfg.method, pseudo_threshold=cfg.pseudo_threshold,
                                            pseudo_weight=cfg.pseudo_weight, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                crash_point("train.step")
                for k, v in stats.items():
                    sums[k] = sums[k] + v if k in sums else v.double()
                bar.update(len(y) * rt.world_size)
        finally:
            if unl is not None:
                unl.close()
        return sums

    def summarize(t: dict) -> dict:
        row = {"loss": t["loss"] / t["n"], "ce": t["ce"] / max(t["labelled"], 1.0),
               "train_top1": t["top1"] / max(t["labelled"], 1.0)}
        if "domain_n" in t:
            row.update(domain_loss=t["domain_loss"] / t["n"], domain_acc=t["domain_correct"] / t["domain_n"])
        if "unlabeled" in t:
            row["pseudo_share"] = t["pseudo_kept"] / max(t["unlabeled"], 1.0)
        return row

    def evaluate_epoch(epoch: int) -> dict:
        row = {}
        for data, prefix in ((val, "val"), (test, "test")):
            if data is not None:
                batches = loader_batches(data, resolution=cfg.resolution,
                                         backend=resolve_backend(cfg.backend, subset=data.ids is not None),
                                         batch_size=cfg.batch_size, workers=cfg.workers, rt=rt)
                row.update(evaluate(net, batches, rt, num_classes=data.num_classes, prefix=prefix))
        return row

    def payload() -> dict:
        return {"filterx_checkpoint": CHECKPOINT_FORMAT, "kind": "finetune", "arch": arch, "model_kwargs": kwargs,
                "num_classes": train.num_classes, "class_names": list(train.class_names),
                "resolution": cfg.resolution, "method": cfg.method,
                "init": str(cfg.init) if cfg.init is not None else None, "blocks": blocks,
                "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "domain": {k: v.detach().cpu() for k, v in domain.state_dict().items()} if domain is not None else None,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "settings": settings}

    samples = -(-train.count // rt.world_size) * rt.world_size
    run = Run(out, "finetune", cfg.epochs, samples, train_epoch, summarize, evaluate_epoch, payload,
              sched, cfg.seed, cfg.save_every, history)
    fit(run, rt, start_epoch, cfg.quiet)
    summary = TrainSummary("finetune", out, out / MODEL, cfg.epochs, start_epoch, rt.world_size,
                           time.perf_counter() - t0, list(run.history))
    finish(run, rt, selected_epoch(summary.history))
    return summary


# What tests import from here besides this module's own (domain adaptation: filterx.train.adaptation).
__all__ = [
    "METHODS", "SOFT_SETTINGS", "DomainClassifier", "FinetuneConfig", "FinetuneNet", "dann_lambda", "finetune",
    "finetune_loss", "grad_reverse", "initial_model", "load_initial_weights", "pseudo_label_loss",
    "selected_epoch", "split_target", "unlabeled_batches",
]
