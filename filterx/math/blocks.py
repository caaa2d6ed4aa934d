"""Row blocks over large (N, D) arrays: what keeps a scorer's memory flat at any N.

A pool's embeddings (1.28M x 512 float16 = 1.25 GiB for ImageNet) arrive as one array in the
store's dtype. A scorer never makes a full-size copy of it (no float32 cast, no normalised
copy, no boolean-mask copy): it walks ``row_blocks`` and casts, normalises or filters one
block at a time, as faiss contrib walks a database iterator. Extra memory is then
O(block * D) at any N.

    for start, xb in row_blocks(x, normalize=True):   # (b, D) float32, unit rows
        out[start : start + len(xb)] = f(xb)
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

BLOCK = 65536  # rows per block: 128 MiB of float32 at D = 512
# What the embedding-space scorers subtract before L2-normalising (their ``center`` option):
# nothing, or the mean of the pool's (the scored images') embeddings (``pool_center``)
CENTERS = ("none", "pool")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (zero rows stay zero); float32. A full copy: for small arrays
    (a target) or one block; use ``row_blocks(..., normalize=True)`` for a pool."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def prepare_rows(x, center: np.ndarray | None = None, normalize: bool = False, dtype=np.float32) -> np.ndarray:
    """``x`` (rows of any float dtype) as a contiguous ``dtype`` array, minus ``center`` (D,)
    when given (a new array: never the caller's, which may be a view), then L2-normalised
    (float32) when ``normalize``: what every scorer does to a block, or to a target, before
    measuring distances."""
    x = np.ascontiguousarray(x, dtype=dtype)
    if center is not None:
        x = x - center
    return l2_normalize(x) if normalize else x


def check_center_choice(center: str) -> None:
    """``center`` is one of CENTERS."""
    if center not in CENTERS:
        raise ValueError(f"unknown center {center!r}; valid: {', '.join(CENTERS)}")


def row_blocks(x, block: int = BLOCK, *, rows: np.ndarray | None = None, normalize: bool = False,
               center: np.ndarray | None = None, dtype=np.float32,
               desc: str | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, xb)``: consecutive blocks of rows of ``x`` (N, D), any float dtype, any
    row-sliceable array (numpy, zarr), as contiguous ``dtype`` arrays, minus ``center`` (D,)
    when given, then L2-normalised when ``normalize``. With ``rows`` (sorted int64 row
    numbers) only those rows are read, and ``start`` counts positions in ``rows``, not rows of
    ``x``. With ``desc``, a pass of more than one block shows a progress bar (rows/s and ETA)
    under that name."""
    from filterx.core.progress import progress

    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    n = len(x) if rows is None else len(rows)
    bar = progress(total=n, desc=desc, unit="row", quiet=desc is None or n <= block)
    try:
        for start in range(0, n, block):
            xb = x[start : start + block] if rows is None else x[rows[start : start + block]]
            # prepare_rows' steps, each rebinding xb so that the block before it is freed first
            # (a pool block's float16 gather, float32 cast and shifted copy are never alive
            # together: the no-full-copy tests' traced peaks)
            xb = np.ascontiguousarray(xb, dtype=dtype)
            if center is not None:  # a new array: xb may be a view of the caller's x
                xb = xb - center
            yield start, (l2_normalize(xb) if normalize else xb)
            bar.update(len(xb))
    finally:
        bar.close()


def pool_center(x, center: str, *, block: int = BLOCK) -> np.ndarray | None:
    """What ``center`` subtracts from every embedding before the L2 normalisation: None for
    "none"; for "pool" the mean of the finite rows of ``x`` (N, D), the pool's embeddings, as a
    (D,) float32 accumulated in float64 one block at a time (one pass, O(block * D) memory).

    A ReLU network's pooled features are all >= 0, so their unit vectors share one large
    common direction and every cosine is high; centring the pool's mean out first (the
    "CL2N" of nearest-neighbour few-shot classification: Wang et al., SimpleShot, 2019)
    leaves the directions in which images differ. Euclidean distances themselves do not
    change under a shift: centring matters only where rows are normalised after it."""
    check_center_choice(center)
    if center == "none":
        return None
    total, count = None, 0
    for start in range(0, len(x), block):
        xb = np.asarray(x[start : start + block], dtype=np.float64)
        xb = xb[np.isfinite(xb).all(axis=1)]
        total = xb.sum(0) if total is None else total + xb.sum(0)
        count += len(xb)
    if not count:
        raise ValueError("center 'pool' needs at least one finite pool embedding, got none")
    return (total / count).astype(np.float32)


def finite_rows(x, block: int = BLOCK) -> np.ndarray:
    """(N,) bool: rows of ``x`` without NaN or inf (an image that could not be embedded),
    checked block by block (no full-size temporary)."""
    out = np.empty(len(x), dtype=bool)
    for start in range(0, len(x), block):
        out[start : start + block] = np.isfinite(x[start : start + block]).all(axis=1)
    return out


def compact_rows(x: np.ndarray, keep: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """``x[keep]`` (keep: (N,) bool) computed in place in ``x``'s own buffer, block by block;
    returns a view of the first ``keep.sum()`` rows. ``x`` is overwritten: for an array the
    caller owns (read from a store), where ``x[keep]`` would be a second full-size copy.

    Kept row j comes from row ids[j] >= j, and each block is gathered before it is written,
    so no row is overwritten before it has been read.
    """
    ids = np.flatnonzero(keep)
    for start in range(0, len(ids), block):
        part = ids[start : start + block]
        x[start : start + len(part)] = x[part]
    return x[: len(ids)]


def sample_rows(x, max_rows: int, rng: np.random.Generator, *, rows: np.ndarray | None = None,
                dtype=np.float32) -> np.ndarray:
    """(min(n, max_rows), D) ``dtype``, a new array: every row of ``x`` (or of its ``rows``), or
    ``max_rows`` of them drawn without replacement, in row order (a store reads sorted rows
    fastest)."""
    rows = np.arange(len(x)) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) > max_rows:
        rows = np.sort(rng.choice(rows, max_rows, replace=False))
    # always a copy the caller owns (it may normalise it in place)
    return np.array(x[:] if len(rows) == len(x) else x[rows], dtype=dtype, copy=True)
