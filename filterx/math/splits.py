"""Seeded, stratified splits of labelled rows (labels -1 are in neither part)."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, val ids): ``fraction`` of each class held out, at least one where the class
    has two or more samples, none where it has one. Deterministic for a seed."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels[labels >= 0]):
        ids = np.flatnonzero(labels == c)
        k = int(round(len(ids) * fraction))
        if fraction > 0 and len(ids) >= 2:
            k = min(max(k, 1), len(ids) - 1)
        val.extend(rng.permutation(ids)[:k].tolist())
    val = np.sort(np.array(val, dtype=np.int64))
    train = np.setdiff1d(np.flatnonzero(labels >= 0), val).astype(np.int64)
    return train, val
