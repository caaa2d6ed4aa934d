"""Influence scorer: Koh & Liang influence of each candidate on the target validation loss.

Computed over the target classifier's linear head on frozen embeddings (filterx.math.influence,
params="head"): one s_test = (H + λI)^-1 ∇L_val, then one streamed GEMM pass over the
candidates. score(z) = ∇θ CE(z)ᵀ s_test; positive = removing z from (or not adding it to)
the training set would raise the validation loss, i.e. z is helpful; higher = keep first.

The Hessian is that of the objective train-encoder trained the head with: mean cross-entropy
plus its weight decay, ``weight_decay``: ``filterx.stages.score`` passes the decay recorded in the
encoder file, 5e-4 (train-encoder's) where none is recorded. Its label smoothing (0.1) is left out of
the gradients, on purpose: for a softmax head the Hessian of the smoothed loss is the same
(diag(p) - ppᵀ in the logits does not depend on the target), so s_test is exact either way;
the validation loss is the plain cross-entropy, the quantity the target is judged on; and a
candidate's gradient is that of its plain cross-entropy with its (pseudo-)label, the same in
the head and last-block paths (smoothing ε would add ε·(onehot(y) - 1/C) to its residual
p - onehot(y), a pull of every candidate towards its own label).

The solve's diagnostics (residual, iterations, λ_max, timings: InverseHVPResult.summary())
are returned as the ScoreResult's attrs, with the objective's weight_decay and label_smoothing
(0.0: none), and logged on "filterx.math.influence".
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from filterx.math.influence import SOLVERS, SolverOptions, head_influence_scores, head_s_test
from filterx.scorers import Option, ScoreInputs, ScoreResult, register_scorer

logger = logging.getLogger("filterx.math.influence")

LABEL_MODES = ("pseudo", "given")
# The L2 decay train-encoder trains the head with (filterx.train.encoder.EncoderConfig.weight_decay;
# not imported: scorers sit below the training code; tests/test_influence.py checks they agree).
ENCODER_WEIGHT_DECAY = 5e-4
# What a score means, stored with every influence score (attrs["result"]["ranks"]).
RANKS = {
    "pseudo": ("the help each candidate, labelled with the head's own prediction, would give the target "
               "classifier's validation loss; an image the head classifies confidently scores near 0 however "
               "target-like it is: a measure of help to the classifier, not of relevance to the target"),
    "given": "the help each candidate, with its own label, gives the target classifier's validation loss",
}
INFLUENCE_OPTIONS = {  # the head and the last-block scorers share them
    "params": Option("parameters taken over"),
    "solver": Option("inverse-HVP solver", choices=SOLVERS),
    "damping": Option("lambda added to the Hessian", min=0.0),
    "labels": Option("candidate labels, the classifier's or the true ones (pseudo ranks the pool by help to the "
                     "classifier, near 0 for images it already classifies confidently: not by relevance)",
                     choices=LABEL_MODES),
    "val_classes": Option("target class indexes the validation loss covers", metavar="I,J,..."),
}


def check_label_mode(params, candidates: str) -> None:
    """The pool's labels index the pool's classes, not the target's: never use them as target labels."""
    if params.get("labels") == "given" and candidates != "target-train":
        raise ValueError("--labels given uses the candidates' own labels as target classes, so it needs "
                         "--candidates target-train; to score the pool use --labels pseudo")


@register_scorer(
    "influence",
    needs=("source_emb", "target_emb", "target_labels", "target_val_emb", "target_val_labels",
           "head_weight", "head_bias"),
    choose_by=("params", "head"),  # "last-block": the streaming variant in filterx.scorers.lastblock
    check=check_label_mode,
    options=INFLUENCE_OPTIONS,
)
def influence_scores(
    inputs: ScoreInputs,
    *,
    seed: int,
    solver: str = "cg",
    damping: float = 0.01,
    weight_decay: float = ENCODER_WEIGHT_DECAY,
    labels: str = "pseudo",
    val_classes: Sequence[int] | None = None,
    cg_tol: float = 1e-6,
    cg_max_iter: int = 1000,
    lissa_scale: float | None = None,
    lissa_depth: int = 5000,
    lissa_repeats: int = 1,
    lissa_batch_size: int = 256,
    batch_size: int = 65536,
) -> ScoreResult:
    """Influence of each source sample on the target validation loss (higher = more helpful).

    solver: "cg" by default: for the head its Hessian-vector products are exact and cost one
    pass over the target training embeddings, and it is deterministic and reaches cg_tol in
    about sqrt((λ_max + λ) / λ) · log(1/cg_tol) passes (tens to hundreds); "exact" forms the dense C(D+1)-square Hessian
    (refused above 20k parameters, 2 GiB at C=31, D=512) and "lissa" is stochastic and needs
    its scale and depth tuned. damping: λ added to H. weight_decay: the head's L2 training
    decay (part of H; default train-encoder's 5e-4, 0 for a head trained without). labels:
    "pseudo" (the head's argmax: the influence the sample would have with the label the
    classifier gives it) or "given" (inputs.source_labels, which must be target class
    indices, e.g. when the candidates are the target training set).
    val_classes: restrict the validation loss to these target classes. batch_size: candidates
    per streamed batch. (target_labels are needed for completeness only: the cross-entropy
    Hessian of the head does not depend on labels.) Returns the scores with the solve's
    InverseHVPResult.summary() as attrs (residual, iterations, λ_max, scale, timings).
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"unknown labels mode {labels!r}; valid: {', '.join(LABEL_MODES)}")
    if inputs.target_val_labels is None or len(inputs.target_val_labels) == 0:
        raise ValueError(
            "influence needs the encoder's held-out split of the target (its validation loss); this "
            "encoder has none for this target (trained with val_fraction 0, on a target with no class of "
            "2 or more images, or on another target): retrain it with filterx train-encoder TARGET OUT "
            "--val-fraction 0.1 on this target")
    options = SolverOptions(
        solver=solver, damping=damping, weight_decay=weight_decay, cg_tol=cg_tol,
        cg_max_iter=cg_max_iter, lissa_scale=lissa_scale, lissa_depth=lissa_depth,
        lissa_repeats=lissa_repeats, lissa_batch_size=lissa_batch_size, seed=seed,
    )
    num_classes = inputs.head_weight.shape[0]
    given = None
    if labels == "given":
        given = inputs.source_labels
        if given is None:
            raise ValueError("labels='given' needs inputs.source_labels, which were not given")
        if given.size and (given.min() < 0 or given.max() >= num_classes):
            raise ValueError(
                f"labels='given' needs source_labels in the target's classes [0, {num_classes}); "
                f"got values in [{given.min()}, {given.max()}]: use labels='pseudo'"
            )
    device = torch.device(inputs.device)
    weight = torch.from_numpy(np.asarray(inputs.head_weight, np.float32))
    bias = torch.from_numpy(np.asarray(inputs.head_bias, np.float32))
    result = head_s_test(
        inputs.target_emb, inputs.target_val_emb, inputs.target_val_labels, weight, bias,
        val_classes=None if val_classes is None else tuple(int(c) for c in val_classes),
        options=options, device=device,
    )
    attrs = {**result.summary(), "weight_decay": float(weight_decay), "label_smoothing": 0.0, "ranks": RANKS[labels]}
    logger.info("influence solve: %s", attrs)
    scores = head_influence_scores(
        inputs.source_emb, weight, bias, result.s_test, labels=given,
        batch_size=batch_size, device=device,
    )
    return ScoreResult(scores, attrs=attrs)
