"""train-encoder --backbone SPEC --probe-only: a linear probe on a frozen pretrained backbone.

The target is embedded with the backbone (``filterx.stages.embed``; the embeddings are stored with
the target, so that ``score`` reuses exactly the features the probe was fitted on), split
with train-encoder's seeded stratified split (``filterx.math.splits.stratified_split``, with its
held-out checks), and a multinomial logistic regression is fitted on the training part
(``filterx.math.probe.fit_linear_probe``: mean cross-entropy + (wd / 2) ||theta||², L-BFGS to
convergence from zero, the objective whose Hessian influence uses; the file records wd for it).

The encoder file holds the backbone spec (and its weights file's hash), the probe as
``state_dict`` ``fc.weight`` (C, D) / ``fc.bias`` (C,), the split and the metrics, in the same
format as a trained ResNet's, so ``embed`` and ``score`` take it as ``--encoder`` unchanged.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import filterx
from filterx.io import atomic
from filterx.models import backbones
from filterx.io.dataset import Dataset
from filterx.stages.embed import ensure_embeddings, read_embeddings
from filterx.models.encoder import ENCODER_FORMAT
from filterx.train.encoder import check_held_out, empty_classes
from filterx.math.probe import fit_linear_probe
from filterx.math.splits import stratified_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeConfig:
    target: Path
    out: Path
    backbone: str  # a spec, filterx.models.backbones
    weight_decay: float = 5e-4
    val_fraction: float = 0.1
    seed: int = 0
    max_iter: int = 1000
    tol: float = 1e-6
    backend: str = "auto"
    device: str = "auto"
    batch_size: int = 128
    workers: int = 2
    quiet: bool = False


@dataclass(frozen=True)
class ProbeSummary:
    out: Path
    tag: str
    train_count: int
    val_count: int
    val_acc: float
    train_acc: float
    feature_dim: int
    weight_decay: float
    grad_norm: float
    iterations: int
    seconds: float

    def line(self) -> str:
        held = (f"held-out accuracy {self.val_acc:.1%} on {self.val_count} images" if self.val_count
                else "no held-out split (accuracy not measured; influence cannot use this encoder)")
        return (f"trained a linear probe on the frozen {self.tag} features ({self.feature_dim}-d) of "
                f"{self.train_count} target images in {self.seconds:.1f}s (weight decay {self.weight_decay:g}, "
                f"{self.iterations} L-BFGS iterations, gradient norm {self.grad_norm:.1e}): {held} "
                f"(train {self.train_acc:.1%}); saved to {self.out}")


def _accuracy(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
    return float(((x @ w.T + b).argmax(1) == y).mean()) if len(y) else float("nan")


def train_probe(cfg: ProbeConfig) -> ProbeSummary:
    """Fit the probe of ``cfg.backbone`` on the target ``cfg.target``; save it to ``cfg.out``."""
    t0 = time.perf_counter()
    spec = backbones.parse_spec(cfg.backbone)
    _, tag = backbones.describe(spec)  # a bad spec fails here, before anything is embedded
    ds = Dataset.open(cfg.target)
    present = np.unique(ds.labels[ds.labels >= 0])
    if ds.num_classes < 2 or len(present) < 2:
        raise ValueError(f"target {ds.root} has {len(present)} class(es) with images; a probe (a classifier) "
                         "needs at least 2")
    check_held_out(ds, cfg.val_fraction)
    empty = empty_classes(ds)
    if empty:
        log.warning("target %s: %d of %d classes have no image (the probe keeps their outputs): %s",
                    ds.root, len(empty), ds.num_classes, ", ".join(empty))
    out = Path(cfg.out)
    with atomic.run_lock(out.parent, f"train-encoder-{out.name}"):
        ensure_embeddings(ds.root, spec.text, tag, device=cfg.device, backend=cfg.backend,
                          batch_size=cfg.batch_size, workers=cfg.workers, quiet=cfg.quiet)
        emb = read_embeddings(ds, tag)
        train_ids, val_ids = stratified_split(ds.labels, cfg.val_fraction, cfg.seed)
        ok = np.isfinite(emb).all(axis=1)  # images embed could not decode are NaN rows: left out
        if not ok.all():
            log.warning("%d target images could not be decoded and are left out of the probe", int((~ok).sum()))
        tr, va = train_ids[ok[train_ids]], val_ids[ok[val_ids]]
        w, b, stats = fit_linear_probe(emb[tr], ds.labels[tr], ds.num_classes, cfg.weight_decay,
                                       max_iter=cfg.max_iter, tol=cfg.tol)
        if stats["grad_norm"] > 100 * cfg.tol:
            log.warning("the probe stopped after %d iterations at gradient norm %.1e (asked %.0e)",
                        stats["iterations"], stats["grad_norm"], cfg.tol)
        val_acc, train_acc = _accuracy(emb[va], ds.labels[va], w, b), _accuracy(emb[tr], ds.labels[tr], w, b)
        info = backbones.describe_info(spec, emb.shape[1])
        payload = {
            "filterx_encoder": ENCODER_FORMAT,
            "filterx_version": filterx.__version__,
            **info,
            "num_classes": ds.num_classes,
            "class_names": [c.name for c in ds.classes],
            "empty_classes": empty,
            "head": "linear probe",
            "state_dict": {"fc.weight": torch.from_numpy(w), "fc.bias": torch.from_numpy(b)},
            "target": {"root": str(ds.root), "fingerprint": ds.fingerprint},
            "train_ids": train_ids.tolist(),
            "val_ids": val_ids.tolist(),
            "metrics": {"val_acc": val_acc, "train_acc": train_acc, **stats},
            "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()},
                       "backbone": spec.text, "label_smoothing": 0.0, "probe_only": True},
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic.write_bytes(out, buf.getvalue())
    return ProbeSummary(out, tag, len(tr), len(va), val_acc, train_acc, int(emb.shape[1]), cfg.weight_decay,
                        stats["grad_norm"], stats["iterations"], time.perf_counter() - t0)

