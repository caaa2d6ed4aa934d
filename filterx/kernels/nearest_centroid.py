"""Nearest centroid: min and mean squared Euclidean distance from each row to K centroids.

The clustering scorer needs, for every pool embedding, its distance to the closest of K
target centroids and its mean distance to all of them. Neither path ever holds the N x K
distance matrix: the Triton kernel keeps a running min/argmin over tiles of K in
registers; the torch twin walks row blocks and column blocks sized by a memory budget.

The mean needs no N x K work at all:
    mean_k ||x - c_k||^2 = ||x - c_mean||^2 + mean_k ||c_k - c_mean||^2,
which both paths use; it is also free of the cancellation in ||x||^2 - 2 x.c + ||c||^2.
The min uses that expansion (one matmul per block), in float32, clamped at 0.
"""

from __future__ import annotations

import torch

from ._dispatch import (
    TORCH_BLOCK_BYTES,
    as_tensor,
    check_float,
    check_ndim,
    check_same_device,
    resolve_impl,
    rows_per_block,
)

TRITON_BLOCK_K = 64


def nearest_centroid(x, c, *, block_k: int | None = None, impl: str = "auto"):
    """Min and mean squared Euclidean distance from each row of ``x`` to the rows of ``c``.

    Args:
        x: (N, D) float32, float16 or bfloat16; any device.
        c: (K, D) centroids, same dtype and device as ``x``, K >= 1.
        block_k: centroids per tile (Triton: a power of two >= 16, default 64; torch twin:
            any positive int, default all K up to the memory budget). Affects speed only.
        impl: ``"auto"`` (Triton on CUDA tensors, torch elsewhere), ``"triton"`` or
            ``"torch"``. ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``.

    Returns:
        ``(min_dist, mean_dist, argmin)``: (N,) float32, (N,) float32, (N,) int64, on the
        inputs' device. Distances are computed in float32; on ties (exactly equal
        distances) the lowest centroid index wins. Inputs are assumed finite.
    """
    x, c = _check(x, c, block_k)
    if resolve_impl(impl, x.device) == "triton":
        return nearest_centroid_triton(x, c, block_k=block_k)
    return nearest_centroid_torch(x, c, block_k=block_k)


def _check(x, c, block_k):
    x, c = as_tensor(x, "x"), as_tensor(c, "c")
    check_ndim(x, "x", 2, "(N, D)")
    check_ndim(c, "c", 2, "(K, D)")
    check_float(x, "x")
    check_float(c, "c")
    check_same_device(x=x, c=c)
    if x.dtype != c.dtype:
        raise ValueError(f"x and c must share a dtype, got x {x.dtype} and c {c.dtype}")
    if c.shape[1] != x.shape[1]:
        raise ValueError(f"x is (N, D) = {tuple(x.shape)} but c is (K, D) = {tuple(c.shape)}")
    if c.shape[0] == 0:
        raise ValueError("c has no centroids (K = 0); need K >= 1")
    if block_k is not None and (not isinstance(block_k, int) or block_k < 1):
        raise ValueError(f"block_k={block_k!r}; valid values are None or a positive int")
    return x, c


def _empty_outputs(n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.empty(n, dtype=torch.float32, device=device),
        torch.empty(n, dtype=torch.float32, device=device),
        torch.empty(n, dtype=torch.int64, device=device),
    )


def _centroid_stats(c: torch.Tensor, block: int):
    """||c_k||^2 (K,), the centroid mean (D,) and mean_k ||c_k - c_mean||^2 (1,), float32.

    Walks ``c`` in blocks of rows so a float16 c with huge K is never copied whole.
    """
    k = c.shape[0]
    c_sq = torch.empty(k, dtype=torch.float32, device=c.device)
    c_sum = torch.zeros(c.shape[1], dtype=torch.float64, device=c.device)
    for k0 in range(0, k, block):
        cb = c[k0 : k0 + block].float()
        c_sq[k0 : k0 + block] = (cb * cb).sum(1)
        c_sum += cb.sum(0, dtype=torch.float64)
    c_mean = (c_sum / k).float()
    spread = torch.zeros((), dtype=torch.float64, device=c.device)
    for k0 in range(0, k, block):
        dev = c[k0 : k0 + block].float() - c_mean
        spread += (dev * dev).sum(dtype=torch.float64)
    return c_sq, c_mean, (spread / k).float().reshape(1)


def nearest_centroid_torch(x, c, *, block_k: int | None = None, out=None):
    """Plain-torch twin of :func:`nearest_centroid` (same arguments, results and ties).

    ``out``: optional preallocated ``(min_dist, mean_dist, argmin)`` to write into.
    Scratch memory is bounded by ``TORCH_BLOCK_BYTES`` whatever N and K are.
    """
    x, c = _check(x, c, block_k)
    n, d = x.shape
    k = c.shape[0]
    min_out, mean_out, arg_out = out if out is not None else _empty_outputs(n, x.device)
    if n == 0:
        return min_out, mean_out, arg_out
    # Default column block: all of K, unless its float32 copy would pass a quarter of the
    # budget (huge K); the rest of the budget goes to rows.
    bk = min(k, block_k or max(16, TORCH_BLOCK_BYTES // (16 * max(d, 1))))
    c_sq, c_mean, spread = _centroid_stats(c, bk)
    # Per row: a float32 copy of x (half inputs), x - c_mean, and one row of distances. The
    # scratch is allocated once and reused: fresh multi-MB tensors each block would pay
    # page faults on every touch (glibc hands big blocks back to the OS on free).
    rb = rows_per_block(4 * (2 * d + bk), n)
    x_buf = None if x.dtype == torch.float32 else torch.empty(rb, d, device=x.device)
    dev_buf = torch.empty(rb, d, device=x.device)
    t_buf = torch.empty(rb * bk, device=x.device)
    for r0 in range(0, n, rb):
        r1 = min(n, r0 + rb)
        xb = x[r0:r1] if x_buf is None else x_buf[: r1 - r0].copy_(x[r0:r1])
        dev = torch.sub(xb, c_mean, out=dev_buf[: r1 - r0])
        mean_out[r0:r1] = dev.square_().sum(1) + spread
        # Plain sums of squares (vector_norm(x)**2 is faster but its sqrt round trip would
        # turn an exact 0 distance into ~1e-6).
        x_sq = torch.mul(xb, xb, out=dev).sum(1)
        best = arg = None
        for k0 in range(0, k, bk):
            cb = c[k0 : k0 + bk].float()
            t = t_buf[: (r1 - r0) * cb.shape[0]].view(r1 - r0, cb.shape[0])
            # ||c||^2 - 2 x.c; adding ||x||^2 per row does not move the argmin.
            torch.addmm(c_sq[k0 : k0 + bk], xb, cb.T, alpha=-2.0, out=t)
            tile_min, tile_arg = t.min(dim=1)  # first index among equal values
            if best is None:
                best, arg = tile_min, tile_arg
            else:
                better = tile_min < best  # strict: earlier blocks win ties
                best = torch.where(better, tile_min, best)
                arg = torch.where(better, tile_arg + k0, arg)
        min_out[r0:r1] = (x_sq + best).clamp_(min=0.0)
        arg_out[r0:r1] = arg
    return min_out, mean_out, arg_out


def nearest_centroid_triton(x, c, *, block_k: int | None = None, out=None):
    """Triton twin of :func:`nearest_centroid` (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    ``block_k`` must be a power of two >= 16 (default 64). ``out`` as in the torch twin.
    """
    x, c = _check(x, c, block_k)
    bk = TRITON_BLOCK_K if block_k is None else block_k
    if bk < 16 or bk & (bk - 1):
        raise ValueError(f"block_k={bk} for impl='triton'; valid values are powers of two >= 16")
    resolve_impl("triton", x.device)
    n = x.shape[0]
    out = out if out is not None else _empty_outputs(n, x.device)
    if n == 0:
        return out
    from . import _triton  # noqa: PLC0415 - triton is imported only on this path

    c_sq, c_mean, spread = _centroid_stats(c, max(1, TORCH_BLOCK_BYTES // (4 * x.shape[1] + 4)))
    return _triton.nearest_centroid(x, c, c_sq, c_mean, spread, bk, out)
