"""Seeded, stratified splits of labelled rows (labels -1 are in neither part)."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, val ids), sorted int64: ``fraction`` of each class held out (round half to
    even), at least one and at most n - 1 where the class has n >= 2 samples, none where it
    has one. Deterministic for a seed: each class, in label order, draws one permutation of
    its ids. O(N log N): the classes are grouped by one stable sort, not found one by one."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(labels >= 0)
    rows = rows[np.argsort(labels[rows], kind="stable")]  # grouped by class, ids ascending within
    bounds = np.flatnonzero(np.diff(labels[rows])) + 1
    val = []
    for ids in np.split(rows, bounds) if len(rows) else []:
        k = int(round(len(ids) * fraction)) if len(ids) >= 2 else 0
        if fraction > 0 and len(ids) >= 2:
            k = min(max(k, 1), len(ids) - 1)
        val.append(rng.permutation(ids)[:k])
    val = np.sort(np.concatenate(val)).astype(np.int64) if val else np.zeros(0, np.int64)
    train = np.setdiff1d(rows, val).astype(np.int64)
    return train, val
