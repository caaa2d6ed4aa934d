"""grad-align: gradient alignment with the target's validation samples, for choosing pre-training data.

A pool image scores by the mean cosine between its gradient of the target classifier's loss
(the linear head on frozen embeddings, the image labelled with the head's own prediction) and
each target validation sample's (its true label), as LESS (Xia et al., 2024) and TracIn's
cosine form choose training data (filterx.math.influence, ``head_alignment_scores``). By
default the mean is over the target samples of the image's own class (``over``), and on a pool
over the whole target rather than its held-out split (``align_with``; both below). Higher = a
step on the image moves the head the way those target samples ask for.

It is the variant of ``influence`` meant for choosing data to add. Koh & Liang's score (the
``influence`` scorer) is a raw inner product with ∇L_val: it carries the factor
|p - onehot(y)|, so every image the head classifies confidently scores near 0, however target-like;
on the selection benchmark's pools it keeps fewer relevant images than random. The cosine
drops that factor and weights every validation sample alike; it has no inverse Hessian (a
first-order, one-step quantity, not a leave-one-out estimate). For a linear head the score
factors into the residuals' cosine times the embeddings' cosine, so it ranks an image by how
near it lies, in embedding angle, to the validation samples of the class the head gives it;
where an encoder's embeddings all point almost the same way (a random-init backbone: a pool
image's mean cosine to the validation samples 0.98-0.99, relevant or not) the residuals'
factor decides, and the ranking is the head's rather than the target's (README: Influence,
Selection quality). ``center="pool"`` takes the gradients of the same head written on the
embeddings minus the pool's mean (weight W, bias b + W mean: the same logits and residuals),
so the embeddings' factor compares what sets images apart rather than the direction a ReLU
encoder's features all share (``filterx.math.blocks.pool_center``).

``align_with="target"`` aligns with every target image the encoder embeds (its training split
and its held-out split, true labels), not the held-out split alone. A small target's held-out
split is a handful of images per class (10 % of 200: about 2 a class), so the mean it aligns
with is that handful's; the whole target's is ten times as many. The head was fitted on the
training split, so those images' residuals are small, but the cosine keeps only their direction
(``unit_residuals``: exact however confident the head is). A pool run only: with
``--candidates target-train`` each candidate would be aligned with itself. ``align_with="auto"``
(the default) is the whole target where the candidates are the pool and the target's training
split is given, the held-out split otherwise (:func:`aligned_with`).

``over="class"`` (the default) takes the mean within the candidate's own class: the cosine with
the target samples of the class the head gives it (its given label with ``--labels given``), not
with every class's (``over="all"``, the LESS / TracIn mean over the whole validation set). For a
linear head cos(g_i, g_v) = cos(r_i, r_v) · cos(x~_i, x~_v), and two classes' residuals point
apart, so over every class an image near the target samples of a class it is not given loses
score for it, and with centred embeddings an image far from them gains (anti-aligned inputs times
anti-aligned residuals): the mean over classes measures the head's cross-class trade-offs more
than nearness to the target. Within the class that term is gone
(``filterx.math.influence.head_class_alignment_scores``). A candidate whose class has no target
sample to align with (``val_classes``, or a class absent from a small held-out split) is not
scored (NaN; ``attrs["unaligned"]`` counts them). Measured in the README, "grad-align within the
candidate's class".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from filterx.math.blocks import CENTERS, pool_center
from filterx.math.influence import head_alignment_scores, head_class_alignment_scores, head_val_alignment
from filterx.scorers import AUTO, Option, ScoreInputs, ScoreResult, register_scorer
from filterx.scorers.influence import LABEL_MODES, check_label_mode

# What the candidates' gradients are aligned with: the encoder's held-out split of the target, or
# the whole target (its training split and its held-out split); "auto" (the default) is
# :func:`aligned_with`'s choice.
ALIGN_WITH = (AUTO, "validation", "target")
# Which of those target samples each candidate's cosine is averaged over: those of the class the
# candidate is given (the default), or all of them.
OVER = ("class", "all")

RANKS = ("the mean cosine between the candidate's head gradient (labelled with the head's prediction, or its "
         "own label with --labels given) and the target samples' gradients (the whole target's or its held-out "
         "split's, as attrs align_with says; those of the candidate's class, or of every class with --over all): "
         "how closely one step on it follows their gradients, confidence left out")


def aligned_with(align_with: str, inputs: ScoreInputs) -> str:
    """What ``align_with`` aligns with: "auto" is the whole target ("target") where the candidates
    are the pool and the target's training split is given, the held-out split ("validation")
    otherwise (the target's training split as candidates, or no training split passed)."""
    if align_with != AUTO:
        return align_with
    whole = inputs.candidates != "target-train" and inputs.target_emb is not None and inputs.target_labels is not None
    return "target" if whole else "validation"


def check_grad_align(params, candidates: str) -> None:
    """--labels given needs the target as candidates; --align-with target needs the pool as candidates."""
    check_label_mode(params, candidates)  # an unknown align_with is refused before, by check_params
    if params.get("align_with") == "target" and candidates == "target-train":
        raise ValueError("--align-with target with --candidates target-train would align each candidate with its "
                         "own gradient; use --align-with validation to score the target's training split")


@register_scorer(
    "grad-align",
    needs=("source_emb", "target_val_emb", "target_val_labels", "head_weight", "head_bias"),
    check=check_grad_align,
    options={
        "labels": Option("candidate labels, the classifier's prediction or the candidates' own (target-train only)",
                         choices=LABEL_MODES),
        "val_classes": Option("target class indexes whose validation samples it aligns with", metavar="I,J,..."),
        "center": Option("the gradients of the head written on embeddings minus the pool's mean (the same "
                         "classifier; the weight's gradient leaves out what every embedding shares), or as they are",
                         choices=CENTERS),
        "align_with": Option("the target images whose gradients it aligns with: the encoder's held-out split, or "
                             "the whole target (training and held-out splits; more images a class); auto: "
                             "the whole target for the pool, the held-out split for --candidates target-train",
                             choices=ALIGN_WITH),
        "over": Option("the target samples the cosine is averaged over: those of the class the candidate is given "
                       "(a candidate of a class without one is not scored), or every class's", choices=OVER),
    },
)
def grad_align_scores(inputs: ScoreInputs, *, seed: int, labels: str = "pseudo",
                      val_classes: Sequence[int] | None = None, center: str = "none",
                      align_with: str = AUTO, over: str = "class",
                      batch_size: int = 65536) -> ScoreResult:
    """Mean cosine between each candidate's head gradient and the target samples' (in [-1, 1]).

    labels: "pseudo" (the head's argmax) or "given" (inputs.source_labels, target class
    indices: the target's own training set as candidates). val_classes: align with these
    target classes' samples only. align_with: "validation" (the held-out split), "target" (the
    training split and the held-out split together) or "auto" (:func:`aligned_with`). over:
    "class" (the target samples of the candidate's class) or "all". seed: unused (deterministic).
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"unknown labels mode {labels!r}; valid: {', '.join(LABEL_MODES)}")
    # an unknown align_with or over is refused by run_scorer's check_params (the options' choices)
    align_with = aligned_with(align_with, inputs)
    val_x, val_y = inputs.target_val_emb, inputs.target_val_labels
    if align_with == "target":
        if inputs.target_emb is None or inputs.target_labels is None:
            raise ValueError("align_with='target' needs inputs.target_emb and target_labels, which were not given")
        val_x, val_y = np.concatenate([inputs.target_emb, val_x]), np.concatenate([inputs.target_labels, val_y])
    elif val_y is None or len(val_y) == 0:
        raise ValueError(
            "grad-align needs the encoder's held-out split of the target (the gradients it aligns with); this "
            "encoder has none for this target: retrain it with filterx train-encoder TARGET OUT --val-fraction 0.1, "
            "or align with the whole target (--align-with target)")
    num_classes = inputs.head_weight.shape[0]
    if num_classes < 2:
        raise ValueError(f"grad-align needs a classifier of 2 or more classes; this head has {num_classes}")
    given = None
    if labels == "given":
        given = inputs.source_labels
        if given is None:
            raise ValueError("labels='given' needs inputs.source_labels, which were not given")
    mean = pool_center(inputs.source_emb, center)
    device = torch.device(inputs.device)
    classes = None if val_classes is None else tuple(int(c) for c in val_classes)
    W, b = np.asarray(inputs.head_weight, np.float32), np.asarray(inputs.head_bias, np.float32)
    extra = {}
    if over == "class":
        scores = head_class_alignment_scores(inputs.source_emb, W, b, val_x, val_y, labels=given,
                                             val_classes=classes, batch_size=batch_size, center=mean, device=device)
        extra["unaligned"] = int(np.isnan(scores).sum())
    else:
        alignment = head_val_alignment(val_x, val_y, W, b, val_classes=classes, center=mean, device=device)
        scores = head_alignment_scores(inputs.source_emb, W, b, alignment.float(), labels=given,
                                       batch_size=batch_size, center=mean, device=device)
        extra["alignment_norm"] = float(alignment.norm())
    num_val = int(len(val_y) if classes is None else np.isin(val_y, classes).sum())
    return ScoreResult(scores, attrs={"num_val": num_val, "align_with": align_with, "over": over,
                                      "center": center, **extra, "ranks": RANKS})
