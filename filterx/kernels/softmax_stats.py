"""Per-row softmax statistics from logits: entropy, max probability and top-2 margin.

The entropy scorer (and confidence-based selection) needs three numbers per row of an
(N, C) logit matrix. torch would materialise softmax, log-softmax and a top-k; the Triton
kernel reads each row once with an online (running max / running sum-exp) softmax.

With z = sum_j exp(l_j - m) and m = max_j l_j:
    entropy  = log z - sum_j exp(l_j - m) (l_j - m) / z      (nats)
    max_prob = 1 / z
    margin   = (1 - exp(l_(2) - m)) / z                       (l_(2): second largest logit)
so logits of magnitude 1e4 are fine. One class (C = 1): entropy 0, max_prob 1, margin 1
(the missing second class counts as probability 0). Two equal top logits give margin 0.
Logits of -inf (masked classes) are allowed; a row with no finite logit gives nan. +inf
or nan logits give unspecified results.
"""

from __future__ import annotations

import torch

from ._dispatch import as_tensor, check_float, check_ndim, resolve_impl, rows_per_block

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def softmax_stats(logits, *, impl: str = "auto"):
    """Entropy (nats), max softmax probability and top-1 minus top-2 probability per row.

    Args:
        logits: (N, C) float32, float16, bfloat16 or float64, C >= 1; any device. Computed
            in float32 (float64 input is rounded to float32 first).
        impl: ``"auto"`` (Triton on CUDA tensors, torch elsewhere), ``"triton"`` or
            ``"torch"``. ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``.

    Returns:
        ``(entropy, max_prob, margin)``, each (N,) float32 on the logits' device.
    """
    logits = _check(logits)
    if resolve_impl(impl, logits.device) == "triton":
        return softmax_stats_triton(logits)
    return softmax_stats_torch(logits)


def _check(logits):
    logits = as_tensor(logits, "logits")
    check_ndim(logits, "logits", 2, "(N, C)")
    check_float(logits, "logits", LOGIT_DTYPES)
    if logits.shape[1] == 0:
        raise ValueError(f"logits has shape {tuple(logits.shape)}; need C >= 1 classes")
    return logits


def _empty_outputs(n: int, device):
    return tuple(torch.empty(n, dtype=torch.float32, device=device) for _ in range(3))


def softmax_stats_torch(logits, *, out=None):
    """Plain-torch twin of :func:`softmax_stats`; ``out``: optional preallocated outputs."""
    logits = _check(logits)
    n, c = logits.shape
    ent_out, maxp_out, margin_out = out if out is not None else _empty_outputs(n, logits.device)
    # Per row: two float32 scratch rows (plus a float32 copy for other dtypes). Scratch is
    # allocated once and reused (fresh big tensors pay page faults on every block).
    rb = rows_per_block(12 * c, n)
    lz_buf = torch.empty(rb * c, device=logits.device)
    e_buf = torch.empty(rb * c, device=logits.device)
    lowest = torch.finfo(torch.float32).min
    for r0 in range(0, n, rb):
        r1 = min(n, r0 + rb)
        lb = logits[r0:r1].float()
        m, top = lb.max(1, keepdim=True)  # first index among equal maxima
        # Shift by 0 in rows that are all -inf so that no -inf - -inf = nan appears.
        shift = m.nan_to_num(neginf=0.0)
        lz = torch.sub(lb, shift, out=lz_buf[: (r1 - r0) * c].view(r1 - r0, c))
        # -inf -> lowest finite: exp still gives 0, and 0 * lz stays 0 instead of nan.
        lz.clamp_(min=lowest)
        e = torch.exp(lz, out=e_buf[: (r1 - r0) * c].view(r1 - r0, c))
        z = e.sum(1)
        a = lz.mul_(e).sum(1)  # sum exp(l - m) * (l - m)
        # The second-largest exp(l - m): knock out the (first) argmax only, so a tied top-2
        # gives margin 0; with C = 1 what is left is 0, so margin = 1 / z = 1.
        second = e.scatter_(1, top, 0.0).amax(1)
        z.masked_fill_(z == 0, float("nan"))  # no finite logit in the row
        ent_out[r0:r1] = (z.log() - a / z).clamp_(min=0.0)  # clamp keeps nan
        maxp_out[r0:r1] = z.reciprocal()
        margin_out[r0:r1] = (1.0 - second) / z
    return ent_out, maxp_out, margin_out


def softmax_stats_triton(logits, *, out=None):
    """Triton twin of :func:`softmax_stats` (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    logits = _check(logits)
    resolve_impl("triton", logits.device)
    out = out if out is not None else _empty_outputs(logits.shape[0], logits.device)
    if logits.shape[0] == 0:
        return out
    from . import _triton  # noqa: PLC0415 - triton is imported only on this path

    return _triton.softmax_stats(logits, out)
