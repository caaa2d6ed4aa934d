"""The Triton kernels and their launchers (imported only when a Triton path is taken).

Each launcher takes validated tensors on one device (CUDA, or CPU under
``TRITON_INTERPRET=1``), fills preallocated outputs and returns them. Every index that is
multiplied by a stride is int64 first: at ImageNet scale N * D passes 2**31.

Matrix products accumulate in float32. float32 operands use ``input_precision="ieee"`` (no
TF32) so results match the float32 torch twins to ~1e-6; half operands use the tensor cores
(their products are exact in float32). bfloat16 operands are upcast to
float32 before ``tl.dot`` in the interpreter only, whose numpy ``dot`` mishandles bfloat16;
a product of two bfloat16 numbers is exact in float32, so the result is the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import next_power_of_2, triton_interpreting


@triton.jit
def _nearest_centroid_kernel(
    x_ptr, c_ptr, c_sq_ptr, c_mean_ptr, c_spread_ptr,
    min_ptr, mean_ptr, arg_ptr,
    N, K, D,
    stride_xn, stride_xd, stride_ck, stride_cd,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)

    # ||x||^2 for the min, and ||x - c_mean||^2 for the mean distance (see nearest_centroid.py:
    # mean_k ||x - c_k||^2 = ||x - c_mean||^2 + mean_k ||c_k - c_mean||^2, no cancellation).
    x_sq = tl.zeros([BLOCK_N], tl.float32)
    x_dev = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        xt = tl.load(x_ptr + rows[:, None] * stride_xn + d[None, :] * stride_xd,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        cm = tl.load(c_mean_ptr + d, mask=d_ok, other=0.0)
        x_sq += tl.sum(xt * xt, axis=1)
        diff = tl.where(d_ok[None, :], xt - cm[None, :], 0.0)
        x_dev += tl.sum(diff * diff, axis=1)

    # Running min of ||c||^2 - 2 x.c over tiles of K; ||x||^2 is a per-row constant, added
    # at the end. Only a (BLOCK_N, BLOCK_K) tile of distances ever exists.
    run_min = tl.full([BLOCK_N], float("inf"), tl.float32)
    run_arg = tl.zeros([BLOCK_N], tl.int64)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_ok = d < D
            xt = tl.load(x_ptr + rows[:, None] * stride_xn + d[None, :] * stride_xd,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            ct = tl.load(c_ptr + ks[None, :].to(tl.int64) * stride_ck + d[:, None] * stride_cd,
                         mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            if UPCAST:
                xt = xt.to(tl.float32)
                ct = ct.to(tl.float32)
            acc = tl.dot(xt, ct, acc, input_precision=DOT_PRECISION)
        # Padding columns get +inf, so they never win the min.
        c_sq = tl.load(c_sq_ptr + ks, mask=k_ok, other=float("inf"))
        t = c_sq[None, :] - 2.0 * acc
        tile_min, tile_arg = tl.min(t, axis=1, return_indices=True,
                                    return_indices_tie_break_left=True)
        # Strict < keeps the earlier tile on ties: lowest index wins overall.
        better = tile_min < run_min
        run_min = tl.where(better, tile_min, run_min)
        run_arg = tl.where(better, tile_arg.to(tl.int64) + k0, run_arg)

    spread = tl.load(c_spread_ptr)
    tl.store(min_ptr + rows, tl.maximum(x_sq + run_min, 0.0), mask=row_ok)
    tl.store(mean_ptr + rows, x_dev + spread, mask=row_ok)
    tl.store(arg_ptr + rows, run_arg, mask=row_ok)


def nearest_centroid(x, c, c_sq, c_mean, c_spread, block_k, out):
    """Launch over row blocks; ``c_sq`` (K,), ``c_mean`` (D,), ``c_spread`` (1,) float32."""
    n, d = x.shape
    k = c.shape[0]
    min_out, mean_out, arg_out = out
    block_n = 64
    block_d = 32 if d <= 32 else 64
    grid = (triton.cdiv(n, block_n),)
    _nearest_centroid_kernel[grid](
        x, c, c_sq, c_mean, c_spread, min_out, mean_out, arg_out,
        n, k, d, x.stride(0), x.stride(1), c.stride(0), c.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
        UPCAST=x.dtype == torch.bfloat16 and triton_interpreting(),
        # input_precision only matters for float32 operands; "tf32" is the default for others.
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out


@triton.jit
def _softmax_stats_kernel(
    l_ptr, ent_ptr, maxp_ptr, margin_ptr,
    N, C, stride_n, stride_c,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    offs_c = tl.arange(0, BLOCK_C)
    neg_inf = float("-inf")

    # Online softmax over chunks of C: m is the running max (the shift), z = sum exp(l - m),
    # a = sum exp(l - m) * (l - m); entropy = log z - a / z. v1 >= v2 are the top-2 logits.
    m = tl.full([BLOCK_R], neg_inf, tl.float32)
    z = tl.zeros([BLOCK_R], tl.float32)
    a = tl.zeros([BLOCK_R], tl.float32)
    v1 = tl.full([BLOCK_R], neg_inf, tl.float32)
    v2 = tl.full([BLOCK_R], neg_inf, tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs_c
        ok = row_ok[:, None] & (cols[None, :] < C)
        lt = tl.load(l_ptr + rows[:, None] * stride_n + cols[None, :] * stride_c,
                     mask=ok, other=neg_inf).to(tl.float32)

        c1, i1 = tl.max(lt, axis=1, return_indices=True, return_indices_tie_break_left=True)
        c2 = tl.max(tl.where(offs_c[None, :] == i1[:, None], neg_inf, lt), axis=1)
        v2 = tl.maximum(tl.maximum(v2, c2), tl.minimum(v1, c1))
        v1 = tl.maximum(v1, c1)

        m_new = tl.maximum(m, c1)
        # While every logit so far is -inf keep a shift of 0 so no -inf - -inf = nan appears.
        shift = tl.where(m_new > neg_inf, m_new, 0.0)
        alpha = tl.exp(m - shift)
        # a's old terms move by (m - shift) each; nothing to move while z == 0 (and m may
        # still be -inf there, so substitute shift to stay finite).
        rescaled = alpha * (tl.where(z > 0.0, m, shift) - shift) * z
        lz = lt - shift[:, None]
        e = tl.exp(lz)
        # exp underflows to 0 for logits far below the max (or -inf); 0 * (-huge) must be 0.
        ez = e * tl.where(e > 0.0, lz, 0.0)
        a = alpha * a + rescaled + tl.sum(ez, axis=1)
        z = alpha * z + tl.sum(e, axis=1)
        m = m_new

    shift = tl.where(m > neg_inf, m, 0.0)
    # A row with no finite logit has z == 0: report nan for all three, like the torch twin.
    z = tl.where(z > 0.0, z, float("nan"))
    entropy = tl.log(z) - a / z
    entropy = tl.where(entropy < 0.0, 0.0, entropy)  # rounding; keeps nan
    tl.store(ent_ptr + rows, entropy, mask=row_ok)
    tl.store(maxp_ptr + rows, 1.0 / z, mask=row_ok)
    tl.store(margin_ptr + rows, (1.0 - tl.exp(v2 - shift)) / z, mask=row_ok)


def softmax_stats(logits, out):
    n, c = logits.shape
    block_c = min(max(next_power_of_2(c), 16), 1024)
    # Several rows per program when C is small, so a program still has ~4K elements.
    block_r = min(max(4096 // block_c, 1), 64)
    grid = (triton.cdiv(n, block_r),)
    _softmax_stats_kernel[grid](
        logits, *out, n, c, logits.stride(0), logits.stride(1),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return out


@triton.jit
def _head_influence_kernel(
    x_ptr, r_ptr, s_ptr, out_ptr,
    N, C, D,
    stride_xn, stride_xd, stride_rn, stride_rc, stride_sc, stride_sd,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    total = tl.zeros([BLOCK_N], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + offs_c
        c_ok = cs < C
        # acc[i, c] = x_i . S_c[:D] for this tile of classes; it never leaves registers.
        acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_ok = d < D
            xt = tl.load(x_ptr + rows[:, None] * stride_xn + d[None, :] * stride_xd,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            st = tl.load(s_ptr + cs[None, :].to(tl.int64) * stride_sc + d[:, None] * stride_sd,
                         mask=c_ok[None, :] & d_ok[:, None], other=0.0).to(tl.float32)
            acc = tl.dot(xt, st, acc, input_precision="ieee")
        bias = tl.load(s_ptr + cs.to(tl.int64) * stride_sc + D * stride_sd,
                       mask=c_ok, other=0.0).to(tl.float32)
        rt = tl.load(r_ptr + rows[:, None] * stride_rn + cs[None, :] * stride_rc,
                     mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        total += tl.sum((acc + bias[None, :]) * rt, axis=1)
    tl.store(out_ptr + rows, total, mask=row_ok)


def head_influence(x, r, s_test, out):
    n, d = x.shape
    c = r.shape[1]
    block_n = 64
    block_c = min(max(next_power_of_2(c), 16), 64)
    block_d = 32 if d <= 32 else 64
    grid = (triton.cdiv(n, block_n),)
    _head_influence_kernel[grid](
        x, r, s_test, out, n, c, d,
        x.stride(0), x.stride(1), r.stride(0), r.stride(1), s_test.stride(0), s_test.stride(1),
        BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=4,
    )
    return out
