"""entropy: the target classifier's uncertainty on each source image.

``order="high"`` keeps the images the target classifier is least sure of (active learning);
``order="low"`` keeps the ones it is most sure of (inverse active learning).

"Most sure" is not "most like the target": a classifier that has seen only the target's
classes is often surest of images far from all of them (a linear head's logits grow along
directions the target never constrained). On the selection benchmark's pools (bench
``selection``) ``low`` with the encoder's head kept fewer relevant images than random with
every encoder, and ``high`` more.

``head="outlier-exposure"`` (the variant ``entropy/outlier-exposure``) scores with a head
refitted to be unsure of the pool: the probe's objective on the target's training split plus
outlier exposure on pool rows (``filterx.math.probe``), cross-fitted so that no pool image is
scored by a head that was fitted on it (folds of the pool, as domain-cls's; each fold's head
sees a seeded sample of at most ``max_outliers`` rows of the other folds). Relevant images are
a small part of a pool: the head learns to be unsure of what the pool mostly is, and stays sure
of images like the target's, so ``order="low"`` keeps target-like images. It needs features in
which a linear head can tell the target from the pool (on the benchmark's random-init backbone,
whose embeddings all point almost the same way, it does not: README, Selection quality).

``head="auto"``, the default, is that head for ``order="low"`` over the pool and the encoder's
head otherwise (``head="given"`` asks for the encoder's head with ``order="low"`` too).
"""

from __future__ import annotations

import logging

import numpy as np

from filterx.math.blocks import row_blocks, sample_rows
from filterx.scorers import Option, ScoreInputs, ScoreResult, register_scorer

log = logging.getLogger(__name__)

ORDERS = ("high", "low")
MAX_OUTLIERS = 20_000  # pool rows each fold's outlier-exposure head is fitted on (at most)
# The outlier term's weight λ. Hendrycks et al. publish 0.5 for fine-tuning a network; for this
# linear head refitted on frozen embeddings 0.1 kept more relevant images on the selection
# benchmark (bench selection --quick, three pools, seeds 0-3 on moco, 0-2 on the others) with every
# trained encoder (moco, target, moco-ft: 28 of 30 pool x seed cells at 6% as high or higher), less
# with the random-init backbone, where neither weight reaches twice random (README, Selection
# quality).
OUTLIER_WEIGHT = 0.1
# a fit warned about as unconverged: 100x its L-BFGS tolerance (1e-6), as train-encoder --probe-only warns
UNCONVERGED_GRAD_NORM = 1e-4
ORDER_OPTION = Option("keep high (active learning) or low entropy first; with the encoder's head low keeps what it "
                      "is surest of, which is not the same as target-like (README: selection quality)", choices=ORDERS)


def check_pool_candidates(params, candidates: str) -> None:
    """The outlier-exposure head is fitted against the pool: it scores the pool only."""
    if candidates != "source":
        raise ValueError(f"entropy --head outlier-exposure scores the pool (--candidates source), not {candidates!r}: "
                         "its head is fitted to be unsure of the pool's images")


def auto_head(params, candidates: str) -> str:
    """``--head auto``: the outlier-exposure head where it is the one that keeps target-like
    images (``order="low"`` over the pool), the encoder's head otherwise (``order="high"``,
    and the target's training split, which the outlier-exposure head does not score)."""
    return "outlier-exposure" if params.get("order") == "low" and candidates == "source" else "given"


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; valid: {', '.join(ORDERS)}")


def head_entropy(emb: np.ndarray, weight: np.ndarray, bias: np.ndarray, *, device: str = "cpu",
                 rows: np.ndarray | None = None) -> np.ndarray:
    """(N,) float32 prediction entropy (nats) of the linear head on the rows of ``emb`` (any
    float dtype; only ``emb[rows]``, in that order, when ``rows`` is given), in row blocks."""
    import torch

    from filterx.kernels import softmax_stats

    w = torch.from_numpy(np.asarray(weight, dtype=np.float32)).to(device)
    b = torch.from_numpy(np.asarray(bias, dtype=np.float32)).to(device)
    out = np.empty(len(emb) if rows is None else len(rows), dtype=np.float32)
    for i, xb in row_blocks(emb, rows=rows):
        ent, _, _ = softmax_stats(torch.addmm(b, torch.from_numpy(xb).to(device), w.T))
        out[i : i + len(xb)] = ent.cpu().numpy()
    return out


@register_scorer("entropy", needs=("source_emb", "head_weight", "head_bias"), choose_by=("head", "given"),
                 choose_auto=auto_head, options={
    "order": ORDER_OPTION,
    "head": Option("the classifier whose entropy ranks: the encoder's head (given), or one refitted with outlier "
                   "exposure on the pool, unsure of what the pool mostly is (with --order low: target-like images "
                   "first); auto: outlier-exposure for --order low on the pool, given otherwise")})
def entropy_scores(inputs: ScoreInputs, *, seed: int, order: str = "high") -> np.ndarray:
    """Prediction entropy (nats) of the target classifier; negated for order="low"."""
    _check_order(order)
    out = head_entropy(inputs.source_emb, inputs.head_weight, inputs.head_bias, device=inputs.device)
    return out if order == "high" else -out


@register_scorer(
    "entropy/outlier-exposure", variant_of="entropy", choose_by=("head", "outlier-exposure"),
    check=check_pool_candidates,
    needs=("source_emb", "target_emb", "target_labels", "target_val_emb", "target_val_labels", "head_weight"),
    options={
        "order": ORDER_OPTION,
        "outlier_weight": Option("with --head outlier-exposure, the weight of the outlier term (0.5 as published "
                                 "for fine-tuning a network; 0.1 kept more target-like images with a linear head "
                                 "on trained encoders' embeddings: README, Selection quality)", min=0.0),
        "folds": Option("cross-fitting folds", min=1),
        "max_outliers": Option("with --head outlier-exposure, pool rows each fold's head is fitted on (at most)",
                               min=1)})
def outlier_exposure_entropy(inputs: ScoreInputs, *, seed: int, order: str = "high",
                             outlier_weight: float = OUTLIER_WEIGHT, folds: int = 2, max_outliers: int = MAX_OUTLIERS,
                             weight_decay: float = 5e-4) -> ScoreResult:
    """Prediction entropy (nats) of a head refitted on the target with outlier exposure on the
    pool, cross-fitted over ``folds`` folds of the pool; negated for order="low". weight_decay:
    the probe's (the encoder's recorded decay, where it records one)."""
    from filterx.math.probe import fit_linear_probe

    _check_order(order)
    if folds < 2:
        raise ValueError(f"outlier exposure scores each pool image with a head fitted on other folds: folds must be "
                         f">= 2, got {folds}")
    source, n = inputs.source_emb, inputs.num_source
    if n < folds:
        raise ValueError(f"outlier exposure needs at least {folds} pool images (one per fold), got {n}")
    num_classes = int(np.asarray(inputs.head_weight).shape[0])
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(np.arange(n) % folds)  # every fold non-empty
    out = np.empty(n, dtype=np.float32)
    val_acc, val_entropy, iterations, grad_norms, fitted_on = [], [], [], [], []
    for f in range(folds):
        outliers = sample_rows(source, max_outliers, rng, rows=np.flatnonzero(fold_of != f))
        w, b, stats = fit_linear_probe(inputs.target_emb, inputs.target_labels, num_classes, weight_decay,
                                       outliers=outliers, outlier_weight=outlier_weight, device=inputs.device)
        fitted_on.append(len(outliers))
        del outliers
        rows = np.flatnonzero(fold_of == f)
        out[rows] = head_entropy(source, w, b, device=inputs.device, rows=rows)
        iterations.append(stats["iterations"])
        grad_norms.append(stats["grad_norm"])
        if stats["grad_norm"] > UNCONVERGED_GRAD_NORM:
            log.warning("entropy --head outlier-exposure: fold %d's head stopped after %d L-BFGS iterations at "
                        "gradient norm %.1e (a larger --weight-decay converges sooner)", f, stats["iterations"],
                        stats["grad_norm"])
        if len(inputs.target_val_labels):
            logits = np.asarray(inputs.target_val_emb, np.float32) @ w.T + b
            val_acc.append(float((logits.argmax(1) == inputs.target_val_labels).mean()))
            val_entropy.append(float(head_entropy(inputs.target_val_emb, w, b, device=inputs.device).mean()))
    attrs = {"folds": folds, "outliers_per_fold": fitted_on,
             "lbfgs_iterations": iterations, "lbfgs_grad_norm": grad_norms, "mean_pool_entropy": float(out.mean()),
             # the refitted heads on the target's held-out split: still the target's classifier?
             "val_acc": val_acc or None, "mean_val_entropy": val_entropy or None}
    return ScoreResult(out if order == "high" else -out, attrs=attrs)
