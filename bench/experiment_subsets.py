"""Does a filtered pre-training subset beat a random one? A paired experiment on generated data.

    python bench/experiment_subsets.py [--quick] [--seeds 10] [--jobs 2] [--work DIR]

For each budget (6% and 12% of the pool) and each method (random, domain-cls, clustering min,
knn-target) a narrow ResNet-18 is pre-trained on the method's subset for the SAME number of SGD
steps, then fine-tuned on the target until its validation accuracy stops improving, and tested
once on target-style test images nobody trained on. Two baselines get the same fine-tuning: "no
pre-training" (from scratch) and "whole pool" (the same steps on all of it). Everything that is
not the subset is the same in every row of a seed.

- Data (made once in ``--work``, reused when there): ``make_sample_data`` with ``pool_per_class``
  images per pool class (10 digit, 10 photo, 10 texture classes: 30,000 images by default; the
  known relevant part is the pool digits 0-4, the target's classes, 16.7%), the target (5 digit
  classes in another style, ``target_per_class`` each), the demo's encoder trained on the target,
  and the scores of filterx's own scorers (``filterx.stages.score``, the demo's variants).
- Test: ``test_per_class`` target-style digits per class, made by a second ``make_sample_data``
  call with the data's seed: the same split of the handwriting bank, so they are drawn from the
  target's half (never a pool glyph) and rendered afresh (new shifts, rotations, blur, colours and
  noise); the target's training images are drawn from the same half, so glyphs recur, the images
  do not. Seen by no encoder, scorer or training run, and evaluated once per run.
- Fine-tuning data: the encoder's training split of the target, split again per seed into
  ``1 - ft_val_fraction`` for training and ``ft_val_fraction`` for validation (stratified).
- Pre-training variants (``variants``): every arm pre-trains supervised on the pool's labels; on
  the first budget's subsets of ``variant_methods`` (random and knn-target by default) also
  adversarially robust (``robust``: PGD in L2, ``adv_eps`` 0.5 at 32 px, ``adv_steps`` 3) and
  self-supervised (``moco``: MoCo v2, labels unread, views for 32 px), each paired with random
  of its own variant. The same steps, net and fine-tuning for all.
- Fine-tuning is early-stopped on that validation split: constant lr (0.001 for the backbone,
  the new head 10x: finetune's default; protocol 4 used 0.01, which a pilot found twice as noisy:
  the paired difference's std over 6 seeds 5.4 points at 0.01, 2.8 at 0.001; over the 12 seeds
  of the protocol-5 run it was 4.1-4.8 at 6%), validation top-1 after
  every epoch (ties: the lower validation loss); checked every ``ft_chunk`` epochs, the run stops
  at the first check that finds ``ft_patience`` or more epochs since the best (so 10-14 with the
  defaults), or at ``ft_max_epochs``; the weights of the best validation epoch are the ones tested.
- Fewer classes (``classes_removed``): the pool less the hardest 10% / 20% of its classes
  (filterx's ``hard-classes``: a linear probe on the encoder's embeddings of the pool, accuracy
  on a held-out 10% of each class), against as many classes removed at random
  (``--random-control``, drawn per seed); the same steps as the subsets.
- Seeds vary pre-training and fine-tuning (initial weights, order), the validation split and the
  random subset; the scored subsets are the same for every seed (the scores are deterministic).
  Statistics are paired by seed: for each method and budget the mean of (method - random) over
  seeds, its 95% confidence interval (t with n - 1 degrees of freedom) and the two-sided paired
  t-test p-value.

One torch thread per run by default: on the 2-core development machine two intra-op threads made
a ResNet-18 step at 32 px about 15x slower than one (OpenMP threads waiting for each other on a
shared machine); ``--jobs 2`` runs two runs side by side in two processes instead.

Finished runs are kept in ``WORK/experiment/runs`` under a hash of their settings, so a killed
run re-run continues (``--fresh`` ignores them).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(REPO))

from bench.suite import DEFAULT_OUT, format_markdown_table, format_table, machine_description, results_stem  # noqa: E402

# key -> (label, scorer, params); random's scores are drawn per seed, the others once (seed 0)
METHODS = {
    "random": ("random", "random", {}),
    "domain-cls-mlp": ("domain-cls (mlp, 2 folds)", "domain-cls", {"model": "mlp", "folds": 2, "steps": 300}),
    "domain-cls-linear": ("domain-cls (linear)", "domain-cls", {"model": "linear", "steps": 300}),
    "clustering-min": ("clustering (min)", "clustering", {"k": 50, "distance": "min"}),
    "clustering-avg": ("clustering (avg)", "clustering", {"k": 50, "distance": "avg"}),
    "knn-target": ("knn-target (k 10)", "knn-target", {"k": 10}),
    "influence": ("influence (pseudo-labels)", "influence", {"labels": "pseudo"}),
}
DEFAULT_METHODS = ("random", "domain-cls-mlp", "clustering-min", "knn-target")
# the fewer-classes arms: key -> label; each removes a fraction of the pool's classes
CLASS_METHODS = {"hard-classes": "fewer classes: hardest removed",
                 "random-classes": "fewer classes: random removed"}
# what a row's paired difference is taken with; random references get none
REFERENCE = {"hard-classes": "random-classes"}
RANDOM_REFERENCES = ("random", "random-classes")
# settings that say which runs to do or how to run them, not what a run computes
NOT_IN_RUN_KEY = ("work", "seeds", "methods", "budgets", "classes_removed", "variants", "variant_methods", "threads",
                  "jobs", "quick", "fresh")
# pre-training variants: supervised on the pool's labels (every arm), and on the first budget's
# subsets of ``variant_methods`` an adversarially robust one and a self-supervised one
VARIANTS = ("supervised", "robust", "moco")
PROTOCOL = 5  # 5: fine-tuning at lr 0.001 (4: 0.01), variants; runs of another protocol are not reused


@dataclass(frozen=True)
class ExperimentConfig:
    work: Path
    seeds: tuple[int, ...] = tuple(range(10))
    methods: tuple[str, ...] = DEFAULT_METHODS
    budgets: tuple[float, ...] = (0.06, 0.12)
    classes_removed: tuple[float, ...] = (0.1, 0.2)  # fewer-classes arms: shares of the pool's classes
    variants: tuple[str, ...] = VARIANTS  # pre-training variants (VARIANTS); supervised runs every arm
    variant_methods: tuple[str, ...] = ("random", "knn-target")  # what robust / moco run on (the first budget)
    # data: 30 pool classes x pool_per_class; the target and its test set in the target's style
    pool_per_class: int = 1000
    pool_photos: int = 10
    pool_textures: int = 10
    target_per_class: int = 60
    test_per_class: int = 600
    data_seed: int = 0
    encoder_epochs: int = 20  # the demo encoder's (64 px, on the target)
    # pre-training: the same steps for every subset and the whole pool
    steps: int = 500
    arch: str = "resnet18"
    width: int = 16  # the first stage's channels (64 as published): a narrow net for 2 CPU cores
    resolution: int = 32
    pretrain_batch: int = 60  # 30,000 / 60 = 500 steps per pool epoch
    pretrain_lr: float = 0.1  # at a batch of 256, scaled linearly (0.023 at 60); cosine
    # fine-tuning: early-stopped on a validation split of the target's training images
    ft_max_epochs: int = 60
    ft_patience: int = 10
    ft_chunk: int = 5  # epochs between two early-stopping checks (the run resumes in between)
    ft_val_fraction: float = 0.2
    ft_batch: int = 32
    ft_lr: float = 0.001  # backbone (finetune's default); the new head 10x; constant
    augment: bool = False  # the loader's random resized crops (area 0.08-1) + flips, in both stages
    # variant "robust": PGD in L2 (filterx.train.adversarial; step size 2.5 eps / steps); CIFAR's
    # L2 radius at 32 px (0.5 of a [0, 1] image), few steps for CPU cost
    adv_eps: float = 0.5
    adv_steps: int = 3
    # variant "moco": MoCo v2 (lr 0.03 at 256, cosine, weight decay 1e-4, temperature 0.2) with
    # the views that work at 32 px (tests/test_moco.py: crops of at least half the area, strong colour)
    moco_lr: float = 0.03
    backend: str = "torchvision"
    threads: int = 1
    jobs: int = 1
    device: str = "auto"
    quick: bool = False
    fresh: bool = False

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; valid: {', '.join(METHODS)}")
        if "random" not in self.methods:
            raise ValueError("the methods must include random: every comparison is paired with it")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or "supervised" not in self.variants:
            raise ValueError(f"variants must include supervised and be of {', '.join(VARIANTS)}; got {list(self.variants)}")
        if len(self.variants) > 1 and ("random" not in self.variant_methods
                                       or any(m not in self.methods for m in self.variant_methods)):
            raise ValueError(f"variant_methods {list(self.variant_methods)} must include random and be among the "
                             f"methods {list(self.methods)}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        bad = [b for b in self.budgets if not 0.0 < b < 1.0]
        if bad:
            raise ValueError(f"budgets must be fractions in (0, 1), got {bad}")
        bad = [b for b in self.classes_removed if not 0.0 < b < 1.0]
        if bad:
            raise ValueError(f"classes_removed must be fractions in (0, 1), got {bad}")
        for name in ("pool_per_class", "target_per_class", "test_per_class", "steps", "width", "pretrain_batch",
                     "ft_max_epochs", "ft_patience", "ft_chunk", "ft_batch", "threads", "jobs", "encoder_epochs",
                     "adv_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.ft_val_fraction < 1.0:
            raise ValueError(f"ft_val_fraction must be in (0, 1), got {self.ft_val_fraction}")


def quick_config(work: Path, **kw) -> ExperimentConfig:
    """Two seeds, two methods, one budget, a small pool and a few steps: a smoke test in minutes."""
    base = dict(work=work, seeds=(0, 1), methods=("random", "clustering-avg"), budgets=(0.12,), classes_removed=(0.1,),
                variants=("supervised",), variant_methods=("random", "clustering-avg"),
                pool_per_class=40,
                pool_photos=6, pool_textures=6, target_per_class=30, test_per_class=6, encoder_epochs=2, steps=4,
                width=8, ft_max_epochs=4, ft_patience=2, ft_chunk=2, quick=True)
    return ExperimentConfig(**{**base, **kw})


# ---------------------------------------------------------------- statistics


def paired_stats(diffs: list[float]) -> dict:
    """Mean of paired differences, sample std, 95% CI (t, n - 1 dof) and two-sided paired t-test p.
    With one pair the spread is unknown: NaN std, CI and p."""
    from scipy import stats

    n = len(diffs)
    mean = float(np.mean(diffs))
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p": math.nan}
    std = float(np.std(diffs, ddof=1))
    se = std / math.sqrt(n)
    half = float(stats.t.ppf(0.975, n - 1)) * se
    if se > 0:
        p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    else:  # every pair differs by the same amount
        p = 1.0 if mean == 0 else 0.0
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "p": p}


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Work:
    root: Path
    source: Path
    target: Path
    encoder: Path
    target_train: Path  # manifest: the encoder's training split of the target
    test: Path  # dataset dir: target-style test images nobody trained on
    relevant: tuple[str, ...]  # pool classes that are the target's classes
    domain: tuple[str, ...]  # pool classes of the target's domain (all digits)
    seconds: float = 0.0


def prepare_work(cfg: ExperimentConfig) -> Work:
    """The pool, the target, the demo's encoder, the test set and the fine-tuning manifest, each
    made once in ``cfg.work`` and reused when there."""
    import torch

    from filterx.io import atomic
    from filterx.io.dataset import Dataset, is_dataset
    from filterx.io.manifest import make_header, write_manifest
    from filterx.io.sampledata import make_sample_data
    from filterx.stages.shard import ShardConfig, shard
    from filterx.train.encoder import EncoderConfig, train_encoder

    t0 = time.perf_counter()
    root = Path(cfg.work).expanduser()
    data = root / "data"
    size = dict(per_class=cfg.pool_per_class, target_per_class=cfg.target_per_class, photos=cfg.pool_photos,
                textures=cfg.pool_textures, seed=cfg.data_seed)
    if (data / "sample_data.json").is_file():
        made = json.loads((data / "sample_data.json").read_text()).get("experiment")
        if made != size:
            raise ValueError(f"{data} was made with {made}, not {size}: give another --work")
    else:
        with atomic.atomic_path(data) as tmp:
            make_sample_data(tmp, **size)
            meta = json.loads((tmp / "sample_data.json").read_text())
            (tmp / "sample_data.json").write_text(json.dumps({**meta, "experiment": size}))
    meta = json.loads((data / "sample_data.json").read_text())
    for part in ("source", "target"):
        if not is_dataset(root / part):
            shard(ShardConfig(data / part, root / part, shard_size=1000, workers=1, quiet=True))
    encoder = root / "encoder.pt"
    if not encoder.is_file():  # the demo's encoder (filterx.stages.demo)
        train_encoder(EncoderConfig(root / "target", encoder, resolution=64, epochs=cfg.encoder_epochs,
                                    batch_size=64, device=cfg.device, seed=cfg.data_seed, quiet=True))
    test = root / "test"
    if not is_dataset(test):
        raw = root / "data-test"
        if not (raw / "sample_data.json").is_file():
            with atomic.atomic_path(raw) as tmp:
                # the data's seed splits the handwriting bank the same way: these test digits come
                # from the target's half, drawn and rendered afresh (no pool glyph, no target image)
                make_sample_data(tmp, per_class=0, photos=0, textures=0, target_per_class=cfg.test_per_class,
                                 seed=int(meta["seed"]))
        shard(ShardConfig(raw / "target", test, shard_size=1000, workers=1, quiet=True))
    target = Dataset.open(root / "target")
    enc = torch.load(encoder, map_location="cpu", weights_only=False)
    if enc["target"]["fingerprint"] != target.fingerprint:
        raise ValueError(f"{encoder} was trained on another target than {target.root}")
    split = root / "experiment" / "target-train.jsonl"
    if not split.is_file():
        ids = np.sort(np.asarray(enc["train_ids"], dtype=np.int64))
        write_manifest(split, "jsonl", target, ids, np.zeros(len(ids), np.float32),
                       make_header(target, "encoder-train-split", {"count": len(ids)}, len(ids)))
    return Work(root, root / "source", root / "target", encoder, split, test, tuple(meta["relevant_classes"]),
                tuple(meta["domain_classes"]), time.perf_counter() - t0)


def score_name(method: str, seed: int) -> str:
    scorer, params = METHODS[method][1:]
    if scorer == "random":
        return f"random-seed{seed}"
    return "-".join([scorer, *(str(v) for v in params.values())])


def subset_manifest(work: Work, method: str, budget: float, seed: int, device: str = "auto") -> Path:
    """The manifest of ``method``'s top ``budget`` of the pool, scored by filterx's scorer when
    not yet stored; random's is drawn with ``seed``, the others' are the same for every seed."""
    from filterx.io.dataset import Dataset
    from filterx.stages.score import ScoreConfig, list_scores, score
    from filterx.stages.select import SelectConfig, select

    scorer, params = METHODS[method][1:]
    name = score_name(method, seed)
    if name not in list_scores(Dataset.open(work.source)):
        if scorer == "random":
            score(ScoreConfig("random", work.source, seed=seed, name=name, quiet=True))
        else:
            score(ScoreConfig(scorer, work.source, work.target, work.encoder, dict(params), 0, name=name,
                              device=device, workers=1, quiet=True))
    path = work.root / "experiment" / "manifests" / f"{name}-{budget:g}.jsonl"
    if not path.is_file():
        select(SelectConfig(work.source, name, path, fraction=budget, quiet=True))
    return path


def class_manifest(work: Work, method: str, fraction: float, seed: int, device: str = "auto") -> Path:
    """The pool less ``fraction`` of its classes (rounded, at least one): the hardest by filterx's
    ``hard-classes`` scorer (the same for every seed), or for ``random-classes`` its random
    control, as many classes drawn with ``seed``."""
    from filterx.io.dataset import Dataset
    from filterx.stages.score import ScoreConfig, list_scores, score
    from filterx.stages.select import SelectConfig, select

    if method not in CLASS_METHODS:
        raise ValueError(f"unknown class method {method!r}; valid: {', '.join(CLASS_METHODS)}")
    ds = Dataset.open(work.source)
    count = max(1, int(round(fraction * int((np.bincount(ds.labels) > 0).sum()))))
    control = method == "random-classes"
    name = f"random-classes-{count}-seed{seed}" if control else f"hard-classes-{count}"
    if name not in list_scores(ds):
        score(ScoreConfig("hard-classes", work.source, None, work.encoder, {"count": count, "random_control": control},
                          seed if control else 0, name=name, device=device, workers=1, quiet=True))
    path = work.root / "experiment" / "manifests" / f"{name}.jsonl"
    if not path.is_file():  # removed classes score lowest: threshold 0 keeps exactly the others
        select(SelectConfig(work.source, name, path, threshold=0.0, quiet=True))
    return path


def finetune_split(work: Work, fraction: float, seed: int) -> tuple[Path, Path]:
    """(train, validation) manifests: ``fraction`` of every class of the fine-tuning data held
    out for early stopping, drawn with ``seed``."""
    from filterx.io.dataset import Dataset
    from filterx.io.manifest import make_header, write_manifest
    from filterx.train.data import held_out_split, resolve_training_data

    folder = work.root / "experiment" / "finetune-splits"
    paths = folder / f"train-{fraction:g}-seed{seed}.jsonl", folder / f"val-{fraction:g}-seed{seed}.jsonl"
    if not all(p.is_file() for p in paths):
        target = Dataset.open(work.target)
        parts = held_out_split(resolve_training_data(work.target_train), fraction, seed, what="validation")
        for path, part, what in zip(paths, parts, ("train", "validation")):
            ids = np.sort(part.sample_ids)
            write_manifest(path, "jsonl", target, ids, np.zeros(len(ids), np.float32),
                           make_header(target, f"finetune-{what}", {"fraction": fraction, "seed": seed}, len(ids)))
    return paths


def composition(work: Work, data: Path) -> dict:
    """What a pre-training set holds: images, pool classes present, the share of the target's
    classes and of the target's domain, and the images per class."""
    from filterx.io.dataset import Dataset
    from filterx.train.data import resolve_training_data

    ds = Dataset.open(work.source)
    labels = resolve_training_data(data).labels
    names = np.array([c.name for c in ds.classes])
    counts = np.bincount(labels, minlength=len(names))
    return {"images": int(len(labels)), "classes": int((counts > 0).sum()),
            "target_classes": float(np.isin(names[labels], work.relevant).mean()),
            "digits": float(np.isin(names[labels], work.domain).mean()),
            "per_class": {str(n): int(c) for n, c in zip(names, counts)}}


# ---------------------------------------------------------------- runs


def epochs_for_steps(count: int, steps: int, batch_size: int, backend: str) -> tuple[int, int]:
    """(epochs, actual steps) closest to ``steps`` SGD steps over ``count`` images."""
    from filterx.train.data import batches_per_epoch

    per_epoch = batches_per_epoch(count, batch_size, 0, 1, backend)
    epochs = max(1, int(round(steps / per_epoch)))
    return epochs, epochs * per_epoch


def early_stop_epoch(val_top1: list[float], val_loss: list[float], patience: int, max_epochs: int) -> tuple[int, bool]:
    """(best epoch, stop now) after the epochs so far: the best has the highest validation top-1,
    ties broken by the lower validation loss (then the earlier epoch); stop once ``patience``
    epochs followed it or ``max_epochs`` ran."""
    best = min(range(len(val_top1)), key=lambda e: (-val_top1[e], val_loss[e], e))
    return best, len(val_top1) - 1 - best >= patience or len(val_top1) >= max_epochs


def _identity(path: Path | None) -> str | None:
    from filterx.train.data import resolve_training_data

    return None if path is None else json.dumps(resolve_training_data(path).identity(), sort_keys=True)


def run_key(cfg: ExperimentConfig, work: Work, data: Path | None, seed: int, variant: str = "supervised") -> str:
    """The hash a run is cached under: what it computes, not which other runs are done."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_RUN_KEY}
    key = {"settings": settings, "data": _identity(data), "seed": seed, "protocol": PROTOCOL, "variant": variant,
           "target": _identity(work.target_train), "test": _identity(work.test)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _test_top1(cfg: ExperimentConfig, checkpoint: Path, test: Path, class_names: tuple[str, ...]) -> dict:
    from filterx.decode.loader import resolve_backend
    from filterx.models.archs import build_model
    from filterx.train.checkpoints import load_checkpoint
    from filterx.train.data import resolve_training_data
    from filterx.train.evaluation import evaluate, loader_batches
    from filterx.train.runtime import setup_runtime, teardown_runtime

    ck = load_checkpoint(checkpoint)
    data = resolve_training_data(test)
    if tuple(data.class_names) != tuple(ck["class_names"]) or tuple(class_names) != tuple(ck["class_names"]):
        raise ValueError(f"test classes {data.class_names} differ from the fine-tuned model's {ck['class_names']}")
    net = build_model(ck["arch"], ck["num_classes"], **ck["model_kwargs"])
    net.load_state_dict(ck["model"])
    rt = setup_runtime(cfg.device)
    try:
        net = net.to(rt.device)
        batches = loader_batches(data, resolution=cfg.resolution, backend=resolve_backend(cfg.backend, subset=False),
                                 batch_size=250, workers=0, rt=rt)
        return evaluate(net, batches, rt, num_classes=data.num_classes, prefix="test")
    finally:
        teardown_runtime(rt)


class _NotEpochsChanged(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg.startswith("resuming") and record.args[1:2] == ("epochs",))


_EPOCHS_CHANGED = _NotEpochsChanged()


def finetune_early_stopped(cfg: ExperimentConfig, work: Work, init: Path | None, seed: int, out: Path) -> dict:
    """Fine-tune on the seed's training split, ``cfg.ft_chunk`` epochs at a time (resumed), until
    :func:`early_stop_epoch` says stop; then test the best validation epoch's weights once."""
    from filterx.train.finetune import FinetuneConfig, finetune
    from filterx.train.data import resolve_training_data

    train, val = finetune_split(work, cfg.ft_val_fraction, seed)
    # checkpoints warns that a resumed run with more epochs differs from an uninterrupted one: true of
    # schedules that depend on the epoch count, not of the constant lr used here (a test checks it)
    logging.getLogger("filterx.train.checkpoints").addFilter(_EPOCHS_CHANGED)
    epochs, seconds = 0, 0.0
    while True:
        epochs = min(epochs + cfg.ft_chunk, cfg.ft_max_epochs)
        # finetune's test slot holds the validation split: evaluated every epoch, it is what
        # stops the run; the real test set is evaluated once, below. The "step" schedule with a
        # step past the last epoch is a constant lr, so resuming to more epochs changes nothing before.
        ft = finetune(FinetuneConfig(target=train, out=out, init=init, arch=cfg.arch, test=val, val_fraction=0.0,
                                     resolution=cfg.resolution, epochs=epochs, batch_size=cfg.ft_batch, lr=cfg.ft_lr,
                                     schedule="step", lr_step_epochs=cfg.ft_max_epochs + 1, augment=cfg.augment,
                                     model_options={} if init is not None else {"width": cfg.width},
                                     backend=cfg.backend, device=cfg.device, workers=0, seed=seed,
                                     resume=epochs > cfg.ft_chunk, save_every=1, quiet=True))
        seconds += ft.seconds
        val_top1 = [r["test_top1"] for r in ft.history]
        val_loss = [r["test_loss"] for r in ft.history]
        best, stop = early_stop_epoch(val_top1, val_loss, cfg.ft_patience, cfg.ft_max_epochs)
        if stop:
            break
    t = time.perf_counter()
    test = _test_top1(cfg, out / f"epoch_{best + 1:04d}.pt", work.test, resolve_training_data(train).class_names)
    return {"test_top1": test["test_top1"], "test_count": test["test_count"], "ft_best_epoch": best + 1,
            "ft_epochs_run": len(val_top1), "ft_val_top1": val_top1[best], "ft_val_top1_by_epoch": val_top1,
            "ft_val_loss_by_epoch": val_loss,
            "ft_val_count": ft.history[best]["test_count"], "ft_train_top1": ft.history[best]["train_top1"],
            "finetune_seconds": seconds + time.perf_counter() - t}


def pretrain_config(cfg: ExperimentConfig, data: Path, out: Path, seed: int, epochs: int, variant: str):
    """The PretrainConfig of ``variant`` on ``data``: the same steps, batch, net and crops for all."""
    from filterx.train.moco_views import SMALL_IMAGE_VIEWS
    from filterx.train.pretrain import PretrainConfig

    common = dict(data=data, out=out, arch=cfg.arch, resolution=cfg.resolution, epochs=epochs,
                  batch_size=cfg.pretrain_batch, schedule="cosine", augment=cfg.augment,
                  model_options={"width": cfg.width}, backend=cfg.backend, device=cfg.device, workers=0, seed=seed,
                  quiet=True)
    if variant == "moco":
        return PretrainConfig(**common, objective="moco", lr=cfg.moco_lr, weight_decay=1e-4,
                              moco_views=dict(SMALL_IMAGE_VIEWS))
    robust = dict(adv_eps=cfg.adv_eps, adv_norm="l2", adv_steps=cfg.adv_steps) if variant == "robust" else {}
    return PretrainConfig(**common, lr=cfg.pretrain_lr, weight_decay=5e-4, **robust)


def run_one(cfg: ExperimentConfig, work: Work, data: Path | None, seed: int, variant: str = "supervised") -> dict:
    """Pre-train on ``data`` (None: no pre-training) for ``cfg.steps`` steps as ``variant``
    (VARIANTS), fine-tune on the target with early stopping, test. Returns the record; cached
    under ``WORK/experiment/runs``."""
    import torch

    from filterx.io import atomic
    from filterx.train.data import resolve_training_data
    from filterx.train.pretrain import pretrain

    torch.set_num_threads(cfg.threads)
    cache = work.root / "experiment" / "runs" / f"{run_key(cfg, work, data, seed, variant)}.json"
    if cache.is_file() and not cfg.fresh:
        return {**json.loads(cache.read_text()), "cached": True}
    shm = Path("/dev/shm")  # per-epoch checkpoints: keep them off the disk
    scratch = Path(tempfile.mkdtemp(prefix="filterx-exp-", dir=shm if os.access(shm, os.W_OK) else None))
    rec: dict = {"seed": seed, "data": str(data) if data else None, "variant": variant}
    try:
        init = None
        if data is not None:
            epochs, steps = epochs_for_steps(resolve_training_data(data).count, cfg.steps, cfg.pretrain_batch,
                                             cfg.backend)
            pre = pretrain(pretrain_config(cfg, data, scratch / "pre", seed, epochs, variant))
            init = pre.model
            rec.update(pretrain_epochs=epochs, pretrain_steps=steps, pretrain_seconds=pre.seconds,
                       pretrain_loss=pre.final["loss"])
            if "train_top1" in pre.final:  # moco has no labels: its own top-1 is of the positive key
                rec["pretrain_train_top1"] = pre.final["train_top1"]
        rec.update(finetune_early_stopped(cfg, work, init, seed, scratch / "ft"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rec["seconds"] = rec.get("pretrain_seconds", 0.0) + rec["finetune_seconds"]
    atomic.write_text(cache, json.dumps(rec))
    return {**rec, "cached": False}


# ---------------------------------------------------------------- the experiment


@dataclass(frozen=True)
class Arm:
    name: str
    method: str | None  # None: no pre-training, or the whole pool
    budget: float | None  # None: no pre-training; 1.0: the whole pool; classes: the share removed
    variant: str = "supervised"  # how it pre-trains (VARIANTS)


def arms(cfg: ExperimentConfig) -> list[Arm]:
    out = [Arm("no pre-training", None, None), Arm("whole pool", None, 1.0)]
    out += [Arm(METHODS[m][0], m, b) for b in cfg.budgets for m in cfg.methods]
    out += [Arm(label, m, f) for f in cfg.classes_removed for m, label in CLASS_METHODS.items()]
    return out + [Arm(f"{METHODS[m][0]} [{v}]", m, cfg.budgets[0], v)
                  for v in cfg.variants if v != "supervised" for m in cfg.variant_methods]


def arm_data(cfg: ExperimentConfig, work: Work, arm: Arm, seed: int) -> Path | None:
    """What ``arm`` pre-trains on at ``seed``: None, the pool, or a manifest."""
    if arm.budget is None:
        return None
    if arm.method is None:
        return work.source
    if arm.method in CLASS_METHODS:
        return class_manifest(work, arm.method, arm.budget, seed, cfg.device)
    return subset_manifest(work, arm.method, arm.budget, seed, cfg.device)


def run_experiment(cfg: ExperimentConfig, log=print) -> dict:
    """Every run of the experiment; returns {"rows", "runs", "subsets", ...}. Seeds outermost,
    so a partial run has every arm for its first seeds; ``cfg.jobs`` runs at a time."""
    import torch

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        work = prepare_work(cfg)
        log(f"data ready in {work.seconds:.0f}s: {work.root}")
        tasks, subsets = [], {}
        for seed in cfg.seeds:  # subsets and splits made here, before any run, so workers only read
            finetune_split(work, cfg.ft_val_fraction, seed)
            for arm in arms(cfg):
                data = arm_data(cfg, work, arm, seed)
                key = (arm.name, arm.budget, seed if arm.method in RANDOM_REFERENCES else None)
                if data is not None and key not in subsets:
                    subsets[key] = composition(work, data)  # a variant's subset is its method's
                tasks.append((arm, seed, data))
        runs: list[dict] = [{} for _ in tasks]

        def done(i: int, rec: dict) -> None:
            arm, seed, _ = tasks[i]
            runs[i] = {**rec, "arm": arm.name, "method": arm.method, "budget": arm.budget, "variant": arm.variant}
            n = sum(bool(r) for r in runs)
            log(f"  [{n}/{len(tasks)}] seed {seed} {arm.name} {'' if arm.budget is None else f'{arm.budget:.0%}'}: "
                f"test top-1 {rec['test_top1']:.1%}, best val epoch {rec['ft_best_epoch']}/{rec['ft_epochs_run']} "
                f"({rec['seconds']:.0f}s{', cached' if rec['cached'] else ''})")

        if cfg.jobs == 1:
            for i, (arm, seed, data) in enumerate(tasks):
                done(i, run_one(cfg, work, data, seed, arm.variant))
        else:
            ctx = multiprocessing.get_context("spawn")  # no forked torch state
            with concurrent.futures.ProcessPoolExecutor(cfg.jobs, mp_context=ctx) as pool:
                futures = {pool.submit(run_one, cfg, work, data, seed, arm.variant): i
                           for i, (arm, seed, data) in enumerate(tasks)}
                for fut in concurrent.futures.as_completed(futures):
                    done(futures[fut], fut.result())
        rows = summarize(runs, subsets, cfg)
    finally:
        torch.set_num_threads(threads)
    return {"rows": rows, "runs": runs, "prep_seconds": work.seconds, "seconds": time.perf_counter() - t0,
            "subsets": [{"arm": k[0], "budget": k[1], "seed": k[2], **v} for k, v in subsets.items()],
            "pool_images": subsets[("whole pool", 1.0, None)]["images"] if ("whole pool", 1.0, None) in subsets else 0,
            "test_images": runs[0]["test_count"], "target_train_images": len(_ids(work.target_train)),
            "val_images": runs[0]["ft_val_count"]}


def _ids(path: Path) -> np.ndarray:
    from filterx.train.data import resolve_training_data

    return resolve_training_data(path).sample_ids


def summarize(runs: list[dict], subsets: dict, cfg: ExperimentConfig) -> list[dict]:
    """One row per arm (and budget): composition, pre-training steps and final train top-1, the
    fine-tuning epoch early stopping chose, test top-1 mean ± std and values, and for the scored
    subsets the paired difference with random of the same budget and seed (mean, 95% CI, p);
    for the hardest classes removed, with as many random classes removed (the control)."""
    rows = []
    for arm, budget in dict.fromkeys((r["arm"], r["budget"]) for r in runs):
        group = sorted((r for r in runs if r["arm"] == arm and r["budget"] == budget), key=lambda r: r["seed"])
        comps = [v for k, v in subsets.items() if k[0] == arm and k[1] == budget]
        top1 = [100 * r["test_top1"] for r in group]
        method = group[0]["method"]
        row = {"pre-training": arm, "budget": "-" if budget is None else
               f"-{budget:.0%} classes" if method in CLASS_METHODS else f"{budget:.0%}",
               "images": int(np.mean([c["images"] for c in comps])) if comps else 0,
               "classes": float(np.mean([c["classes"] for c in comps])) if comps else 0,
               "target_cls_%": float(100 * np.mean([c["target_classes"] for c in comps])) if comps else None,
               "digits_%": float(100 * np.mean([c["digits"] for c in comps])) if comps else None,
               "epochs": group[0].get("pretrain_epochs", 0), "steps": group[0].get("pretrain_steps", 0),
               "pre_train_top1": (float(np.mean([100 * r["pretrain_train_top1"] for r in group]))
                                  if "pretrain_train_top1" in group[0] else None),
               "ft_epoch": float(np.mean([r["ft_best_epoch"] for r in group])),
               "n": len(group), "top1_mean": statistics.mean(top1),
               "top1_std": statistics.stdev(top1) if len(top1) > 1 else math.nan,
               "top1_values": " ".join(f"{v:.1f}" for v in top1)}
        ref_method = REFERENCE.get(method, "random")
        variant = group[0].get("variant", "supervised")
        ref = {r["seed"]: 100 * r["test_top1"] for r in runs if r["method"] == ref_method and r["budget"] == budget
               and r.get("variant", "supervised") == variant}
        if method is not None and method not in RANDOM_REFERENCES:
            diffs = [100 * r["test_top1"] - ref[r["seed"]] for r in group if r["seed"] in ref]
            if diffs:
                s = paired_stats(diffs)
                row.update(vs_random=s["mean"], ci95_low=s["ci_low"], ci95_high=s["ci_high"], p=s["p"],
                           diff_std=s["std"])
        row["seconds"] = float(np.mean([r["seconds"] for r in group]))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- command line


def write_results(out_dir: Path, result: dict, cfg: ExperimentConfig, machine: dict, command: str,
                  when: dt.datetime) -> tuple[Path, Path]:
    """``subsets[-quick]_<machine>_<N>c_<YYYYMMDD-HHMM>.json`` and ``.md``; never overwrites."""
    from filterx.io import atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = base = results_stem("subsets", machine, cfg.quick, when)
    k = 1
    while (out_dir / f"{stem}.json").exists():
        k += 1
        stem = f"{base}-{k}"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    doc = {"experiment": "subsets", "protocol": PROTOCOL, "command": command, "machine": machine, "settings": settings,
           **result}
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic.write_text(json_path, json.dumps(doc, indent=1, default=str) + "\n")
    atomic.write_text(md_path, render_markdown(json.loads(json_path.read_text())))
    return json_path, md_path


def variant_lines(c: dict) -> list[str]:
    """The markdown lines that say how the [robust] and [moco] rows pre-train (none without them)."""
    variants = c.get("variants", ["supervised"])
    out = []
    if "robust" in variants:
        out.append(f"- [robust] rows: the same supervised pre-training on adversarial examples: every batch replaced "
                   f"by its PGD attack in L2, eps {c['adv_eps']} (images in [0, 1]), {c['adv_steps']} steps of "
                   f"2.5 eps / steps; pre_train_top1 is on the attacked batches")
    if "moco" in variants:
        from filterx.train.moco_views import SMALL_IMAGE_VIEWS

        views = ", ".join(f"{k} {v}" for k, v in SMALL_IMAGE_VIEWS.items())
        out.append(f"- [moco] rows: MoCo v2 on the same images and steps, labels unread (lr {c['moco_lr']} at 256 "
                   f"scaled linearly, cosine, weight decay 1e-4, temperature 0.2, the queue filterx sizes for the "
                   f"subset), views for 32 px ({views}); then the same fine-tuning (a new head)")
    if len(variants) > 1:
        out.append(f"- variants run on the {c['budgets'][0]:.0%} subsets of {', '.join(c['variant_methods'])}; their "
                   f"vs_random is paired with random of the same variant")
    return out


def render_markdown(doc: dict) -> str:
    """The results document (as written to the JSON file) as a Markdown page."""
    m, c = doc["machine"], doc["settings"]
    crops = "random resized crops + flips" if c["augment"] else "center crops, no flips"
    cached = sum(r.get("cached", False) for r in doc["runs"])
    return "\n".join([
        "# Filtered vs random pre-training subsets (paired seeds, early-stopped fine-tuning)", "",
        f"- command: `{doc['command']}`",
        f"- date: {m['date']}; wall time {doc['seconds'] / 60:.1f} min (data preparation "
        f"{doc['prep_seconds']:.0f} s of it; {cached} of {len(doc['runs'])} runs taken from the run cache); "
        f"commit {m.get('git_commit')}",
        f"- machine: {m['cpu']}, {m['cores']} cores usable, {m['ram_gib']} GiB RAM, GPU "
        f"{m.get('gpu') or 'none'}; load average at start {m['load_avg_at_start']}; {c['threads']} torch "
        f"thread(s) per run, {c['jobs']} run(s) at a time",
        f"- versions: python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}",
        f"- pool: {doc['pool_images']} images made by make_sample_data (10 digit, {c['pool_photos']} photo, "
        f"{c['pool_textures']} texture classes x {c['pool_per_class']}, seed {c['data_seed']}); known relevant "
        f"part: the pool digits 0-4 (the target's classes)",
        f"- pre-training: {c['arch']} of width {c['width']} at {c['resolution']} px, {c['steps']} SGD steps of "
        f"{c['pretrain_batch']} images for every pre-trained row (epochs = steps / steps per epoch, rounded), lr "
        f"{c['pretrain_lr']} at 256 scaled linearly, cosine, weight decay 5e-4, {crops}; labels: the pool's "
        f"classes. pre_train_top1: training top-1 of the last epoch (near 100: the subset is memorised)",
        *variant_lines(c),
        f"- fine-tuning: the encoder's {doc['target_train_images']} target training images, per seed "
        f"{doc['val_images']} of them ({c['ft_val_fraction']:.0%} per class) held out for validation; batch "
        f"{c['ft_batch']}, constant lr {c['ft_lr']} (head x10), {crops}; validation top-1 after every epoch "
        f"(ties: the lower validation loss); checked every {c['ft_chunk']} epochs, stopped at the first check "
        f"{c['ft_patience']} or more epochs after the best, or at {c['ft_max_epochs']}; the best validation "
        f"epoch's weights (ft_epoch: its mean) are tested. The same for every row",
        "- fewer classes: the pool less the classes hard-classes finds hardest (a linear probe on the "
        "encoder's embeddings of the pool), against as many classes removed at random (drawn per seed); "
        "vs_random there is the paired difference with that random-class control",
        f"- test: {doc['test_images']} target-style images ({c['test_per_class']} per class) made for this "
        f"experiment by make_sample_data (the target's half of the handwriting, rendered afresh), seen by no "
        f"encoder, scorer or training run; evaluated once per run",
        f"- seeds {list(c['seeds'])}: they vary pre-training, fine-tuning, the validation split and the random "
        f"subset; the scored subsets are the same for every seed. top1_std: sample std over seeds. vs_random: "
        f"mean over seeds of the paired difference (points) with the random subset of the same budget and "
        f"seed; ci95: its 95% confidence interval (t, n - 1 dof); p: two-sided paired t-test; diff_std: the "
        f"sample std of the differences; seconds: per run",
        "- target_cls_%: share of the subset in the target's classes (16.7% of the pool); digits_%: in the "
        "target's domain (all pool digits, 33.3%); for random, means over the seeds' subsets", "",
        format_markdown_table(doc["rows"]), ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/experiment_subsets.py", description=__doc__.split("\n\n")[0],
                                 epilog="example: python bench/experiment_subsets.py --seeds 10 --jobs 2")
    ap.add_argument("--quick", action="store_true", help="2 seeds, 2 methods, 1 budget, a tiny pool (smoke test)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default 10; 2 with --quick)")
    ap.add_argument("--work", type=Path, default=None,
                    help="data and run cache (default ~/.cache/filterx-experiment[-quick])")
    ap.add_argument("--methods", default=None, help=f"comma-separated, of: {', '.join(METHODS)} "
                    f"(default {','.join(DEFAULT_METHODS)}; random is required)")
    ap.add_argument("--budgets", default=None, help="comma-separated fractions (default 0.06,0.12)")
    ap.add_argument("--classes-removed", default=None,
                    help="fewer-classes arms: comma-separated shares of the pool's classes, or none (default 0.1,0.2)")
    ap.add_argument("--variants", default=None, help=f"pre-training variants, comma-separated, of: {', '.join(VARIANTS)} "
                    f"(default all; supervised is required; with --quick supervised)")
    ap.add_argument("--variant-methods", default=None,
                    help="the methods robust / moco pre-train on, at the first budget (default random,knn-target)")
    ap.add_argument("--pool-per-class", type=int, default=None, help="pool images per class (default 1000)")
    ap.add_argument("--test-per-class", type=int, default=None, help="test images per target class (default 600)")
    ap.add_argument("--steps", type=int, default=None, help="pre-training steps (default 500)")
    ap.add_argument("--width", type=int, default=None, help="ResNet first-stage channels (default 16)")
    ap.add_argument("--ft-lr", type=float, default=None, help="fine-tuning lr of the backbone, the head 10x (default 0.001)")
    ap.add_argument("--ft-max-epochs", type=int, default=None, help="fine-tuning epoch limit (default 60)")
    ap.add_argument("--ft-patience", type=int, default=None, help="early-stopping patience in epochs (default 10)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default 1: see the module doc)")
    ap.add_argument("--jobs", type=int, default=None, help="runs at a time, each in its own process (default 1)")
    ap.add_argument("--augment", action="store_true", help="random resized crops + flips (default: center crops)")
    ap.add_argument("--fresh", action="store_true", help="redo runs found in the run cache")
    ap.add_argument("--out", type=Path, default=None, help="results dir (default bench/results; WORK/results with --quick)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--render", type=Path, default=None, metavar="RESULTS.json",
                    help="only rewrite the .md beside a results file from its JSON, and exit")
    args = ap.parse_args(argv)
    if args.render is not None:
        from filterx.io import atomic

        if not args.render.is_file():
            ap.error(f"--render {args.render}: no such results file")
        atomic.write_text(args.render.with_suffix(".md"), render_markdown(json.loads(args.render.read_text())))
        print(f"wrote {args.render.with_suffix('.md')}")
        return 0

    work = args.work or Path.home() / ".cache" / ("filterx-experiment-quick" if args.quick else "filterx-experiment")
    kw = {k: v for k, v in dict(
        seeds=tuple(range(args.seeds)) if args.seeds else None,
        methods=tuple(m.strip() for m in args.methods.split(",")) if args.methods else None,
        budgets=tuple(float(b) for b in args.budgets.split(",")) if args.budgets else None,
        classes_removed=(() if args.classes_removed == "none" else tuple(float(b) for b in args.classes_removed.split(",")))
        if args.classes_removed else None,
        variants=tuple(v.strip() for v in args.variants.split(",")) if args.variants else None,
        variant_methods=tuple(m.strip() for m in args.variant_methods.split(",")) if args.variant_methods else None,
        pool_per_class=args.pool_per_class, test_per_class=args.test_per_class, steps=args.steps, width=args.width,
        ft_lr=args.ft_lr, ft_max_epochs=args.ft_max_epochs, ft_patience=args.ft_patience, threads=args.threads, jobs=args.jobs,
        augment=args.augment or None, fresh=args.fresh or None).items() if v is not None}
    try:
        cfg = quick_config(work, **kw) if args.quick else ExperimentConfig(work=work, **kw)
    except ValueError as exc:
        ap.error(str(exc))
    command = shlex.join(["python", "bench/experiment_subsets.py", *(sys.argv[1:] if argv is None else argv)])
    machine = machine_description()
    when = dt.datetime.now()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load {machine['load_avg_at_start']}; "
          f"{len(cfg.seeds)} seed(s), methods {', '.join(cfg.methods)}, budgets {list(cfg.budgets)}", flush=True)
    result = run_experiment(cfg, log=lambda s: print(s, flush=True))
    print(format_table(result["rows"]))
    print(f"total {result['seconds'] / 60:.1f} min (data preparation {result['prep_seconds']:.0f}s)")
    if not args.no_write:
        out = args.out or (work / "results" if args.quick else DEFAULT_OUT)
        paths = write_results(out, result, cfg, machine, command, when)
        print("results:", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
