"""The numbers of a report, as free functions on arrays: the overlap of selections, the
classes' shares of the pool and of a selection, which classes to show, the precision on the
relevant classes (the plots of :mod:`filterx.report.plots` only draw them)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

MAX_CLASS_BARS = 30


def selection_overlap(selections: Sequence[np.ndarray]) -> np.ndarray:
    """(M, M) float64 Jaccard overlap |A ∩ B| / |A ∪ B| of M selections (arrays of sample ids).

    Two empty selections count as identical (1.0).
    """
    sets = [np.unique(np.asarray(s, dtype=np.int64)) for s in selections]
    m = len(sets)
    out = np.ones((m, m), dtype=np.float64)
    for i in range(m):
        for j in range(i + 1, m):
            inter = len(np.intersect1d(sets[i], sets[j], assume_unique=True))
            union = len(sets[i]) + len(sets[j]) - inter
            out[i, j] = out[j, i] = inter / union if union else 1.0
    return out


def class_shares(pool_labels: np.ndarray, selected_labels: np.ndarray,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """((C,), (C,)) float64: each class's share of the pool and of the selection.

    ``pool_labels`` are the labels of the scored samples, ``selected_labels`` those of the
    selected ones (int, -1 = unlabelled, left out of both). Shares sum to 1 (0 when empty).
    """
    def share(labels):
        labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.float64)
        return counts / max(counts.sum(), 1.0)

    return share(pool_labels), share(selected_labels)


def representation_extremes(pool_share: np.ndarray, selected_share: np.ndarray,
                            top: int = MAX_CLASS_BARS) -> np.ndarray:
    """Class indices to plot, most over-represented first: all classes when there are at most
    ``top``, else the ``top // 2`` most over- and ``top - top // 2`` most under-represented
    (by selected share minus pool share; ties by class index). Classes absent from both the
    pool and the selection are never shown."""
    diff = np.asarray(selected_share, dtype=np.float64) - np.asarray(pool_share, dtype=np.float64)
    present = np.flatnonzero((np.asarray(pool_share) > 0) | (np.asarray(selected_share) > 0))
    order = present[np.lexsort((present, -diff[present]))]  # over-represented first
    if len(order) <= top:
        return order
    over, under = top // 2, top - top // 2
    return np.concatenate([order[:over], order[len(order) - under:]])


def selection_precision(selected: np.ndarray, relevant: np.ndarray) -> float:
    """Share of the selected ids whose sample is relevant (``relevant``: (N,) bool); NaN if none."""
    selected = np.asarray(selected, dtype=np.int64)
    return float(np.asarray(relevant, dtype=bool)[selected].mean()) if len(selected) else float("nan")
