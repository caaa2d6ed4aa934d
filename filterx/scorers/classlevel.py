"""Class-level filters: remove whole source classes, by name or by how hard a probe finds them.

Scores are two-valued: ``MASKED_SCORE`` (-1.0) for every image of a removed class and
``KEPT_SCORE`` (0.0) for every other image, including images with unknown label (-1). So a
``select`` that keeps the top ``kept`` images (or thresholds at > -1) drops exactly the removed
classes; ties among kept images are the selector's to break.

- ``class-mask``: the classes a spec names (``filterx.io.classes.resolve_classes``), e.g. the
  ImageNet classes overlapping the target, to measure how much pre-training leaks it.
  Classes the pool lacks (a target class with no counterpart in a partial pool): the entries
  of a preset such as ``@office31`` are skipped and reported (logged, "-> not in the pool" in
  ``match_report``, ``absent_entries`` in the attrs), and so are written names with
  ``absent="report"``; by default written names are an error, as a name that silently masks
  nothing is an experiment that silently measures nothing. Named classes with no image are
  reported too. If no named class is in the pool, error.
- ``hard-classes``: the ``count`` classes with the lowest held-out accuracy of a linear probe
  on the pool's embeddings.

Random control (``random_control=True``, both scorers): as many classes as the treatment
actually removes (named/hard classes with at least one image; a named class without images
removes nothing, and every hard class has held-out images) are drawn, seeded by ``seed``,
from the pool's classes that are NOT in the named/hard set and have at least one image, and
those are removed instead. Drawing from the complement (rather than from all classes) keeps
the control free of the treatment: a draw from all classes would on average remove a few of
the very classes under study (about 47*47/1000 ~ 2.2 for the Office-31 preset), mixing the
effect being measured into its own baseline. Requiring an image, and not counting named
classes without one, keeps the control from removing less or more than the treatment.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from filterx.io.classes import (
    ABSENT_MODES, MATCH_MODES, AbsentClassesError, absent_entries, describe_matches, match_classes,
)
from filterx.math.splits import stratified_split
from filterx.scorers import ClassInfo, Option, ScoreInputs, ScoreResult, register_scorer

log = logging.getLogger(__name__)

MASKED_SCORE = -1.0
KEPT_SCORE = 0.0


def class_mask_scores(labels: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """(N,) float32: MASKED_SCORE where ``labels`` (N,) int is in ``masked``, else KEPT_SCORE.

    Label -1 (unknown) is never masked.
    """
    labels = np.asarray(labels)
    hit = np.isin(labels, np.asarray(masked, dtype=np.int64)) & (labels >= 0)
    return np.where(hit, MASKED_SCORE, KEPT_SCORE).astype(np.float32)


def class_image_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) int64 images per class; labels must lie in [-1, C), -1 (unknown) is not counted."""
    labels = np.asarray(labels, dtype=np.int64)
    bad = labels[(labels < -1) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(
            f"source labels must lie in [-1, {num_classes}) for {num_classes} classes; "
            f"got e.g. {sorted(set(bad[:5].tolist()))}"
        )
    return np.bincount(labels[labels >= 0], minlength=num_classes)


def random_control_classes(
    counts: np.ndarray, exclude: np.ndarray, count: int, *, seed: int
) -> np.ndarray:
    """(count,) int64 class indices, sorted, drawn without replacement, seeded by ``seed``,
    from the classes not in ``exclude`` whose image count ``counts`` (C,) is > 0."""
    candidates = np.setdiff1d(np.flatnonzero(np.asarray(counts) > 0), exclude)
    if count > candidates.size:
        raise ValueError(
            f"random control needs {count} classes with at least one image outside the "
            f"{len(exclude)} named or hard ones; only {candidates.size} exist"
        )
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=count, replace=False)).astype(np.int64)


def per_class_accuracy(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) float64 fraction of samples of each class predicted right; NaN for a class with none.

    labels, preds: (V,) int, true and predicted class of each held-out sample; labels -1 skip.
    """
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    if labels.shape != preds.shape:
        raise ValueError(f"labels {labels.shape} and preds {preds.shape} must have one shape")
    keep = labels >= 0
    labels, preds = labels[keep], preds[keep]
    total = class_image_counts(labels, num_classes)
    right = np.bincount(labels[labels == preds], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, right / total, np.nan)


def hardest_classes(acc: np.ndarray, count: int) -> np.ndarray:
    """(count,) int64: the ``count`` classes of lowest accuracy ``acc`` (C,), hardest first.

    Ties go to the lower class index. NaN (no held-out sample) is never picked: it says
    nothing about hardness; asking for more classes than have a finite accuracy is an error.
    """
    acc = np.asarray(acc, dtype=np.float64)
    rankable = np.flatnonzero(np.isfinite(acc))
    if not 0 < count <= rankable.size:
        raise ValueError(
            f"count must lie in [1, {rankable.size}] (classes with a held-out accuracy); "
            f"got {count}"
        )
    order = rankable[np.argsort(acc[rankable], kind="stable")]  # stable: ties by index
    return order[:count].astype(np.int64)


def stratified_holdout(
    labels: np.ndarray, num_classes: int, holdout: float, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): sorted int64 row numbers, the package's one seeded per-class split
    (:func:`filterx.math.splits.stratified_split`) of labels checked against ``num_classes``.

    A class of n images gives round(holdout * n) to validation, at least 1 and at most n - 1
    when n >= 2, so every class with two images is evaluated and trained on; a class of one
    image only trains. Rows labelled -1 are in neither.
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must lie in (0, 1); got {holdout}")
    labels = np.asarray(labels, dtype=np.int64)
    class_image_counts(labels, num_classes)  # validates the range
    return stratified_split(labels, holdout, seed)


def _feature_stats(x: torch.Tensor, rows: torch.Tensor, chunk: int = 65536):
    """Mean and std (D,) float32 of ``x[rows]``, accumulated in float64 chunk by chunk."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    sq = torch.zeros_like(total)
    for i in range(0, len(rows), chunk):
        xb = x[rows[i : i + chunk]].double()
        total += xb.sum(0)
        sq += (xb * xb).sum(0)
    mean = total / len(rows)
    var = (sq / len(rows) - mean * mean).clamp_min(0)
    return mean.float(), var.sqrt().float().clamp_min(1e-6)


def fit_linear_probe(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    seed: int,
    rows: np.ndarray | None = None,
    epochs: int = 10,
    min_steps: int = 300,
    batch_size: int = 1024,
    lr: float = 1e-2,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on ``x`` (N, D) float16 or float32, ``y`` (N,) int64 in [0, C).

    Trains on ``rows`` (int64 row numbers; all rows when None) without copying them out of
    ``x``: batches are gathered and moved to ``device`` one at a time, so the host keeps the
    only full copy of the embeddings. Adam on standardised features from zero weights,
    batches shuffled by ``seed``, for ``epochs`` passes and at least ``min_steps`` steps (so
    small pools converge too), learning rate decayed linearly to zero. Returns
    (weight (C, D), bias (C,)) float32 on the host, acting on raw rows:
    logits = x @ weight.T + bias.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}")
    # float16 rows (the pool as stored) stay float16: each batch is cast on its own, so the
    # probe holds no float32 copy of the pool (2.5 GiB at 1.28M x 512)
    x = np.asarray(x)
    xt = torch.from_numpy(x if x.dtype in (np.float16, np.float32) else x.astype(np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    rows_t = torch.arange(len(xt)) if rows is None else torch.from_numpy(np.asarray(rows, np.int64))
    if len(rows_t) == 0:
        raise ValueError("the linear probe has no training rows")
    n, d = len(rows_t), xt.shape[1]
    mean, std = (t.to(device) for t in _feature_stats(xt, rows_t))
    lin = torch.nn.Linear(d, num_classes).to(device)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    batch = min(batch_size, n)
    steps = max(epochs * (n // batch), min_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    while step < steps:
        perm = rows_t[torch.randperm(n, generator=gen)]
        for i in range(0, n - batch + 1, batch):  # full batches only: equal-weight steps
            idx = perm[i : i + batch]
            xb = (xt[idx].to(device, torch.float32, non_blocking=True) - mean) / std
            loss = torch.nn.functional.cross_entropy(lin(xb), yt[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step == steps:
                break
    with torch.no_grad():
        weight = lin.weight / std
        bias = lin.bias - lin.weight @ (mean / std)
    return weight.cpu().numpy(), bias.cpu().numpy()


def predict_linear(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, *, device: str = "cpu", chunk: int = 65536
) -> np.ndarray:
    """(N,) int64 argmax of x @ weight.T + bias, for x (N, D), weight (C, D), bias (C,)."""
    w = torch.from_numpy(np.asarray(weight, np.float32)).to(device)
    b = torch.from_numpy(np.asarray(bias, np.float32)).to(device)
    out = []
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            xb = torch.from_numpy(np.asarray(x[i : i + chunk], np.float32)).to(device)
            out.append((xb @ w.T + b).argmax(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def _class_rows(classes, indices, counts, **extra) -> list[dict]:
    return [
        {"class_index": int(i), "wnid": classes[i].wnid or "", "name": classes[i].name,
         "n_images": int(counts[i]), **{k: v[j] for k, v in extra.items()}}
        for j, i in enumerate(indices)
    ]


def _mask_attrs(classes, masked, counts, labels) -> dict:
    return {
        "masked_indices": [int(i) for i in masked],
        "masked_wnids": [classes[i].wnid or "" for i in masked],
        "masked_names": [classes[i].name for i in masked],
        "num_masked_classes": len(masked),
        "num_masked_images": int(counts[masked].sum()),
        "num_kept_images": int(len(labels) - counts[masked].sum()),
    }


@register_scorer("class-mask", needs=("source_labels", "source_classes"), options={
    "classes": Option("classes to remove: names or wnids, comma-separated, @file or @office31", metavar="SPEC"),
    "match": Option("how names match", choices=MATCH_MODES),
    "random_control": Option("remove as many random classes instead")})
def class_mask(
    inputs: ScoreInputs,
    *,
    seed: int,
    classes: str | list[str] = "",
    match: str = "exact",
    random_control: bool = False,
    absent: str = "preset",
) -> ScoreResult:
    """Remove the source classes a spec names (names, wnids, @file, @office31); -1 removed.

    Scores: MASKED_SCORE for images of the named classes (or, with ``random_control``, of as
    many classes drawn from the rest; see the module docstring), KEPT_SCORE otherwise.
    ``match``: "exact" or "substring" (``filterx.io.classes.match_classes``). ``absent``: for
    named ImageNet classes the pool lacks, "preset" (skip and report a preset's, refuse
    written names), "report" (skip and report all) or "error" (refuse all).
    """
    if not classes or (not isinstance(classes, str) and not any(c.strip() for c in classes)):
        raise ValueError(
            "class-mask needs classes: names or wnids, comma-separated (e.g. "
            "'coffee mug,n03793489'), '@FILE' (one per line) or '@office31'"
        )
    if match not in MATCH_MODES:
        raise ValueError(f"unknown match mode {match!r}; valid: {', '.join(MATCH_MODES)}")
    if absent not in ABSENT_MODES:
        raise ValueError(f"unknown absent mode {absent!r}; valid: {', '.join(ABSENT_MODES)}")
    pool = tuple(inputs.source_classes)
    labels = np.asarray(inputs.source_labels)
    counts = class_image_counts(labels, len(pool))
    try:
        matches = match_classes(classes, pool, match=match, absent=absent)
    except AbsentClassesError as exc:
        raise ValueError(f"{exc}; to mask those that are and skip these, pass absent='report' "
                         "(filterx score -p absent=report)") from None
    entry_of: dict[int, str] = {}
    for m in matches:
        for c in m.classes:
            entry_of.setdefault(c.index, m.entry)
    named = np.array(sorted(entry_of), dtype=np.int64)
    missing = absent_entries(matches)
    empty = [int(i) for i in named if counts[i] == 0]
    report = describe_matches(matches)
    if missing:
        more = f" and {len(missing) - 10} more (see the match report)" if len(missing) > 10 else ""
        log.warning("class-mask: %d of %d named classes are not in the pool, skipped: %s%s",
                    len(missing), len(matches), ", ".join(missing[:10]), more)
    if empty:
        report += "\nno images in the pool (nothing to remove): " + ", ".join(pool[i].name for i in empty)
        log.warning("class-mask: %d named class(es) have no image in the pool: %s",
                    len(empty), ", ".join(pool[i].name for i in empty))
    if random_control:
        # as many as the treatment removes: a named class without images removes nothing
        removed = int((counts[named] > 0).sum())
        masked = random_control_classes(counts, named, removed, seed=seed)
        entries = ["random control"] * len(masked)
    else:
        masked, entries = named, [entry_of[i] for i in named]
    attrs = {
        **_mask_attrs(pool, masked, counts, labels),
        "random_control": bool(random_control),
        "named_wnids": [pool[i].wnid or "" for i in named],
        "named_names": [pool[i].name for i in named],
        "num_named_images": int(counts[named].sum()),
        "num_absent_entries": len(missing),
        "num_named_without_images": len(empty),
        "absent_entries": missing,
        "named_without_images": [pool[i].name for i in empty],
        "matches": [{"entry": m.entry, "indices": [c.index for c in m.classes]} for m in matches],
        "match_report": report,
    }
    table = _class_rows(pool, masked, counts, entry=entries)
    return ScoreResult(class_mask_scores(labels, masked), attrs, {"masked_classes": table})


@register_scorer("hard-classes", needs=("source_emb", "source_labels", "source_classes"), options={
    "count": Option("how many classes to remove", min=1),
    "random_control": Option("remove as many random classes instead")})
def hard_classes(
    inputs: ScoreInputs,
    *,
    seed: int,
    count: int = 0,
    holdout: float = 0.1,
    random_control: bool = False,
    epochs: int = 10,
) -> ScoreResult:
    """Remove the `count` source classes a linear probe on the embeddings gets most wrong.

    A linear probe (``fit_linear_probe``, ``epochs`` passes) is trained on a seeded
    stratified split of the labelled pool, ``holdout`` of each class held out; the ``count``
    classes of lowest held-out accuracy (``hardest_classes``) score MASKED_SCORE, or with
    ``random_control`` as many classes drawn from the rest. Table "per_class_accuracy" has
    every class's n_val, accuracy (None where n_val is 0) and whether it was removed.
    """
    pool: tuple[ClassInfo, ...] = tuple(inputs.source_classes)
    num_classes = len(pool)
    labels = np.asarray(inputs.source_labels, dtype=np.int64)
    counts = class_image_counts(labels, num_classes)
    # Classes with no image cannot be removed: removing every class that has images would
    # leave nothing to keep, so the bound is on those.
    with_images = int((counts > 0).sum())
    if not 0 < count < with_images:
        raise ValueError(
            f"count must lie in [1, {with_images - 1}]: the pool has {with_images} classes with "
            f"images (of {num_classes}); got {count}"
        )
    train_idx, val_idx = stratified_holdout(labels, num_classes, holdout, seed=seed)
    emb = inputs.source_emb
    weight, bias = fit_linear_probe(
        emb, labels, num_classes, seed=seed, rows=train_idx, epochs=epochs, device=inputs.device
    )
    preds = predict_linear(emb[val_idx], weight, bias, device=inputs.device)
    acc = per_class_accuracy(labels[val_idx], preds, num_classes)
    hard = hardest_classes(acc, count)
    # every hard class has images (a finite held-out accuracy needs a held-out image), so
    # the treatment removes `count` classes and the control draws as many
    masked = (
        random_control_classes(counts, hard, count, seed=seed) if random_control else np.sort(hard)
    )
    removed = np.zeros(num_classes, bool)
    removed[masked] = True
    n_val = np.bincount(labels[val_idx], minlength=num_classes)
    table = _class_rows(
        pool, range(num_classes), counts,
        n_val=[int(v) for v in n_val],
        accuracy=[None if math.isnan(a) else float(a) for a in acc],
        removed=[bool(r) for r in removed],
    )
    attrs = {
        **_mask_attrs(pool, masked, counts, labels),
        "random_control": bool(random_control),
        "hard_indices": [int(i) for i in hard],
        "hard_wnids": [pool[i].wnid or "" for i in hard],
        "hard_accuracy": [float(acc[i]) for i in hard],
        "val_accuracy": float((preds == labels[val_idx]).mean()) if len(val_idx) else None,
        "num_train": int(len(train_idx)),
        "num_val": int(len(val_idx)),
    }
    return ScoreResult(
        class_mask_scores(labels, masked), attrs, {"per_class_accuracy": table}
    )
