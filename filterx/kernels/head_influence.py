"""Influence dot products for a linear head, without forming per-sample gradients.

For a linear head (W (C, D), b (C,)) under cross-entropy, sample i's gradient is the outer
product g_i = r_i (x) [x_i, 1] with r_i = softmax(W x_i + b) - onehot(y_i): a (C, D + 1)
matrix. The influence scorer needs g_i . s_test for every i and one fixed s_test (C, D + 1):
    g_i . s_test = sum_c r_ic (x_i . S_c[:D] + S_c[D]),
an (N, D) x (D, C) product followed by a row-wise dot with r. Forming g_i would cost
N * C * (D + 1) memory traffic; this reads x and r once. The Triton kernel keeps the
(rows, C-tile) product in registers and reduces it against r at once.
"""

from __future__ import annotations

import torch

from ._dispatch import (
    FLOAT_DTYPES,
    as_tensor,
    check_float,
    check_ndim,
    check_same_device,
    resolve_impl,
    rows_per_block,
)

FACTOR_DTYPES = FLOAT_DTYPES + (torch.float64,)


def head_influence(x, probs_minus_onehot, s_test, *, impl: str = "auto"):
    """``g_i . s_test`` for each row, with g_i the linear head's cross-entropy gradient.

    Args:
        x: (N, D) features fed to the head; float32, float16 or bfloat16.
        probs_minus_onehot: (N, C) r = softmax probabilities minus one-hot labels; float16,
            bfloat16, float32 or float64.
        s_test: (C, D + 1) a vector in the head's parameter space laid out as [W | b]
            (column D is the bias); float16, bfloat16, float32 or float64.
        impl: ``"auto"`` (Triton on CUDA tensors, torch elsewhere), ``"triton"`` or
            ``"torch"``. ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``.
        All on one device.

    Returns:
        (N,) float32 on the inputs' device; accumulated in float32.
    """
    x, r, s = _check(x, probs_minus_onehot, s_test)
    if resolve_impl(impl, x.device) == "triton":
        return head_influence_triton(x, r, s)
    return head_influence_torch(x, r, s)


def _check(x, r, s):
    x = as_tensor(x, "x")
    r = as_tensor(r, "probs_minus_onehot")
    s = as_tensor(s, "s_test")
    check_ndim(x, "x", 2, "(N, D)")
    check_ndim(r, "probs_minus_onehot", 2, "(N, C)")
    check_ndim(s, "s_test", 2, "(C, D + 1)")
    check_float(x, "x")
    check_float(r, "probs_minus_onehot", FACTOR_DTYPES)
    check_float(s, "s_test", FACTOR_DTYPES)
    check_same_device(x=x, probs_minus_onehot=r, s_test=s)
    (n, d), c = x.shape, r.shape[1]
    if r.shape[0] != n:
        raise ValueError(f"x is (N, D) = {(n, d)} but probs_minus_onehot is {tuple(r.shape)}")
    if tuple(s.shape) != (c, d + 1):
        raise ValueError(
            f"s_test must be (C, D + 1) = {(c, d + 1)} for x {(n, d)} and "
            f"probs_minus_onehot {tuple(r.shape)}, got {tuple(s.shape)}"
        )
    return x, r, s


def head_influence_torch(x, probs_minus_onehot, s_test, *, out=None):
    """Plain-torch twin of :func:`head_influence`; ``out``: optional preallocated (N,)."""
    x, r, s = _check(x, probs_minus_onehot, s_test)
    n, d = x.shape
    c = r.shape[1]
    out = out if out is not None else torch.empty(n, dtype=torch.float32, device=x.device)
    s32 = s.float()
    w_t, b = s32[:, :d].T, s32[:, d]
    # Per row: a float32 copy of x, the (C,) product and a float32 copy of r.
    rb = rows_per_block(4 * (d + 3 * c), n)
    for r0 in range(0, n, rb):
        proj = torch.addmm(b, x[r0 : r0 + rb].float(), w_t)  # (rows, C): x_i . S_c[:D] + S_c[D]
        out[r0 : r0 + rb] = (proj * r[r0 : r0 + rb].float()).sum(1)
    return out


def head_influence_triton(x, probs_minus_onehot, s_test, *, out=None):
    """Triton twin of :func:`head_influence` (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    x, r, s = _check(x, probs_minus_onehot, s_test)
    resolve_impl("triton", x.device)
    out = out if out is not None else torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0] == 0:
        return out
    from . import _triton  # noqa: PLC0415 - triton is imported only on this path

    return _triton.head_influence(x, r, s, out)
