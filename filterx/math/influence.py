"""Koh & Liang influence of candidate samples on the target's validation loss.

The model is the target classifier: frozen embeddings x (the encoder's penultimate features)
and its linear head θ = [W, b], W (C, D), b (C,). Influence is taken over the head alone
(``head_*`` functions here: closed forms, fast) or over the encoder's last block plus the head
(``last_block_*`` functions in :mod:`filterx.math.influence_block`: torch.func, for a ResNet
split into trunk / block / head). Both follow the convention below.

Objective, damping and sign convention (one convention for the whole package)
----------------------------------------------------------------------------
The training objective is R(θ) = (1/n) Σ_j CE(z_j; θ) + (wd/2)·||θ||² over the n target
training samples (wd = ``weight_decay``, 0 unless the head was trained with L2 decay), so its
Hessian is H = mean_j ∇²CE(z_j) + wd·I. ``damping`` λ is added on top: every solver computes

    s_test = (H + λI)^-1 ∇θ L_val,      score(z) = ∇θ CE(z)ᵀ s_test,

with L_val the mean cross-entropy over the validation split (or over its samples of the
classes in ``val_classes``). In words: removing a training sample z moves the trained
parameters by about +(1/n) H⁻¹ ∇CE(z), which changes the validation loss by about
+score(z)/n. So **a positive score means removing z would raise the validation loss: z is
helpful**; a negative score marks a harmful sample. For a new sample z (a pool image),
adding it changes the validation loss by about -score(z)/n: positive is again helpful. Higher
= keep first, as for every filterx scorer. (Koh & Liang's I_up,loss(z) is -score(z).)

Candidate labels: given labels (target training set, "data dropout") or pseudo-labels, the
classifier's own argmax. A pseudo-label score is the influence the sample would have if its
label were the classifier's prediction; it says nothing about its true label.

Solvers (``SolverOptions.solver``: "exact", "cg", "lissa") live in ``filterx.math.ihvp``; each
reports the relative residual ||(H + λI) s - v|| / ||v||.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from filterx.math.ihvp import (
    MAX_EXACT_PARAMS, SOLVERS, InfluenceDivergedError, InverseHVPResult, SolverOptions, sync_cuda,
    solve_inverse_hvp,
)

logger = logging.getLogger("filterx.math.influence")


def _to(a: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=device, dtype=dtype)


def _class_mask(labels: torch.Tensor, val_classes: Sequence[int] | None, num_classes: int):
    """Boolean mask of the validation samples whose class is in val_classes (all if None)."""
    if val_classes is None:
        return torch.ones_like(labels, dtype=torch.bool)
    classes = [int(c) for c in val_classes]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise ValueError(
            f"val_classes {tuple(val_classes)}: need class indices in [0, {num_classes})"
        )
    return torch.isin(labels, torch.tensor(classes, device=labels.device))


def _check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{what} must lie in [0, {num_classes}) (the classifier's classes); "
            f"got values in [{int(labels.min())}, {int(labels.max())}]"
        )


# ----------------------------------------------------------------------------- head problem


class _HeadHessian:
    """H of R(θ) for θ = [W, b] flattened row-major from (C, D+1); float64 closed forms."""

    def __init__(self, x, weight, bias, weight_decay):
        self.x = x  # (M, D) float64
        self.p = torch.softmax(x @ weight.T + bias, dim=1)  # (M, C)
        self.num_classes, self.dim = weight.shape
        self.num_params = self.num_classes * (self.dim + 1)
        self.weight_decay = weight_decay

    def _hvp(self, v, x, p):
        # (diag(p) - p pᵀ)(V x̃) x̃ᵀ averaged over samples, without forming any Hessian block.
        V = v.view(self.num_classes, self.dim + 1)
        u = x @ V[:, :-1].T + V[:, -1]
        a = p * u - p * (p * u).sum(1, keepdim=True)
        out = torch.cat([a.T @ x, a.sum(0)[:, None]], dim=1) / x.shape[0]
        return out.reshape(-1) + self.weight_decay * v

    def hvp(self, v):
        return self._hvp(v, self.x, self.p)

    def batch_hvp(self, v, gen, batch_size):
        if batch_size >= self.x.shape[0]:
            return self.hvp(v)
        idx = torch.randperm(self.x.shape[0], generator=gen)[:batch_size].to(self.x.device)
        return self._hvp(v, self.x[idx], self.p[idx])

    def dense(self):
        C, D1, P = self.num_classes, self.dim + 1, self.num_params
        H = torch.zeros(P, P, dtype=self.x.dtype, device=self.x.device)
        chunk = max(1, 2**24 // P)  # bounds the (chunk, P) outer-product factor to 128 MiB
        for s in range(0, self.x.shape[0], chunk):
            xt = F.pad(self.x[s : s + chunk], (0, 1), value=1.0)  # x̃ = [x, 1]
            q = (self.p[s : s + chunk, :, None] * xt[:, None, :]).reshape(-1, P)  # p ⊗ x̃
            H -= q.T @ q
            diag = (q.T @ xt).view(C, D1, D1)  # x̃ᵀ diag(p_c) x̃ per class c
            torch.diagonal(H.view(C, D1, C, D1), dim1=0, dim2=2).add_(diag.permute(1, 2, 0))
        H /= self.x.shape[0]
        H.diagonal().add_(self.weight_decay)  # in place: H is up to 2 GiB at the 20k limit
        return H


def head_hessian(x, weight, bias, *, weight_decay: float = 0.0) -> torch.Tensor:
    """Dense Hessian (P, P) float64 of R(θ) at θ = [W, b], P = C(D+1), row-major from (C, D+1).

    x (M, D), weight (C, D), bias (C,): numpy or torch (computed on weight's device).
    H = mean_i (diag(p_i) - p_i p_iᵀ) ⊗ x̃_i x̃_iᵀ + wd·I with x̃ = [x, 1]; labels do not enter.
    """
    dev = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
    x, weight, bias = (_to(a, dev, torch.float64) for a in (x, weight, bias))
    return _HeadHessian(x, weight, bias, weight_decay).dense()


def head_loss_gradient(x, labels, weight, bias) -> tuple[torch.Tensor, float]:
    """∇θ of the mean cross-entropy over (x, labels): ((C, D+1) tensor, mean loss).

    x (V, D), labels (V,) int64, weight (C, D), bias (C,): tensors on one device, computed in
    their dtype. g = mean_i (p_i - onehot(y_i)) ⊗ [x_i, 1].
    """
    logits = x @ weight.T + bias
    r = torch.softmax(logits, dim=1)
    loss = F.cross_entropy(logits, labels).item()
    r[torch.arange(len(labels), device=r.device), labels] -= 1.0
    return torch.cat([r.T @ x, r.sum(0)[:, None]], dim=1) / len(labels), loss


def head_s_test(train_x, val_x, val_labels, weight, bias, *,
                val_classes: Sequence[int] | None = None,
                options: SolverOptions = SolverOptions(),
                device: str | torch.device = "cpu") -> InverseHVPResult:
    """s_test = (H + λI)^-1 ∇θ L_val for the linear head, in float64 on ``device``.

    train_x (M, D): the target training set (defines H; the cross-entropy Hessian does not
    depend on labels); val_x (V, D), val_labels (V,): the validation split (defines L_val,
    restricted to val_classes if given); weight (C, D), bias (C,). numpy or torch.
    Returns s_test shaped (C, D+1).
    """
    dev, f64 = torch.device(device), torch.float64
    W, b, tx, vx = (_to(a, dev, f64) for a in (weight, bias, train_x, val_x))
    vy, num_classes = _to(val_labels, dev, torch.int64), W.shape[0]
    _check_labels(vy, num_classes, "val_labels")
    if len(vy) == 0:
        raise ValueError("influence needs validation samples (the loss it is the influence on); got none")
    t0 = time.perf_counter()
    keep = _class_mask(vy, val_classes, num_classes)
    if not bool(keep.any()):
        raise ValueError(
            f"none of the {len(vy)} validation samples is in val_classes {tuple(val_classes or ())}"
        )
    v, val_loss = head_loss_gradient(vx[keep], vy[keep], W, b)
    sync_cuda(dev)
    t_grad = time.perf_counter() - t0
    problem = _HeadHessian(tx, W, b, options.weight_decay)
    result = solve_inverse_hvp(problem, v.reshape(-1), options, params="head", curvature="hessian",
                    val_loss=val_loss, num_val=int(keep.sum()), val_grad_seconds=t_grad)
    return replace(result, s_test=result.s_test.view(num_classes, -1))


KERNEL_CHOICES = ("auto", "triton", "torch", None)


def _head_kernel(kernel: str | None, device: torch.device, dtype: torch.dtype):
    """filterx.kernels.head_influence bound to an impl, or None for the plain-torch path here."""
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel={kernel!r}; valid: {KERNEL_CHOICES}")
    # The kernel takes float32/16 features; float64 scoring stays on the reference path.
    if kernel is None or (kernel == "auto" and (device.type != "cuda" or dtype == torch.float64)):
        return None
    try:
        from filterx.kernels import head_influence
    except ImportError:
        if kernel == "auto":
            return None
        raise ValueError(f"kernel={kernel!r} but filterx.kernels is not importable") from None
    return lambda x, r, s: head_influence(x, r, s, impl=kernel)


def _head_pass_inputs(candidates, weight, bias, vector, labels, what: str, dev: torch.device, dtype):
    """(W, b, vector, labels) of a streamed pass over the candidates, checked: the (C, D+1)
    vector it dots each candidate's gradient with, and labels as CPU int64 (or None)."""
    W, b, V = (_to(a, dev, dtype) for a in (weight, bias, vector))
    C, D = W.shape
    if V.shape != (C, D + 1):
        raise ValueError(f"{what} has shape {tuple(V.shape)}, expected (C, D+1) = {(C, D + 1)}")
    return W, b, V, _candidate_labels(labels, candidates.shape[0], C)


def _candidate_labels(labels, n: int, num_classes: int) -> torch.Tensor | None:
    """The (n,) candidate labels as CPU int64, checked to lie in [0, num_classes); None stays None."""
    if labels is None:
        return None
    labels = _to(labels, torch.device("cpu"), torch.int64)
    if labels.shape != (n,):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({n},)")
    _check_labels(labels, num_classes, "candidate labels")
    return labels


def head_influence_scores(candidates, weight, bias, s_test, *, labels=None,
                          batch_size: int = 65536, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32,
                          kernel: str | None = "auto") -> np.ndarray:
    """score_i = ∇θ CE(x_i, y_i)ᵀ s_test per candidate; (N,) float32 numpy, higher = helpful.

    candidates: (N, D) array sliceable by rows (numpy, zarr, torch; any float dtype), streamed
    ``batch_size`` rows at a time to ``device``; labels: None for pseudo-labels (argmax of the
    head) or (N,) int in [0, C); s_test: (C, D+1). With r = softmax(Wx + b) - onehot(y),
    score_i = Σ_c r_ic (x_i · S_c[:D] + S_c[D]): one GEMM per batch against [W; S[:, :D]].
    kernel: "auto" uses filterx.kernels.head_influence on CUDA when importable; "triton" or
    "torch" force that kernel impl; None keeps the plain-torch reference path of this module.
    """
    dev = torch.device(device)
    W, b, S, labels = _head_pass_inputs(candidates, weight, bias, s_test, labels, "s_test", dev, dtype)
    C, D = W.shape
    n = candidates.shape[0]
    fused = _head_kernel(kernel, dev, dtype)
    # Without the kernel, one GEMM against [W; S[:, :D]] gives logits | x·S_c + S_c[D].
    stacked_w, stacked_b = (W, b) if fused else (torch.cat([W, S[:, :D]]), torch.cat([b, S[:, D]]))
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, batch_size):
        xb = _to(candidates[start : start + batch_size], dev, dtype)
        z = torch.addmm(stacked_b, xb, stacked_w.T)
        r = torch.softmax(z[:, :C], dim=1)
        y = z[:, :C].argmax(1) if labels is None else labels[start : start + len(xb)].to(dev)
        r[torch.arange(len(xb), device=dev), y] -= 1.0
        s = fused(xb, r, S) if fused is not None else (r * z[:, C:]).sum(1)
        out[start : start + len(xb)] = s.float().cpu().numpy()
    return out


# ------------------------------------------------------------------ gradient alignment (unit)
#
# The pre-training variant (scorer ``grad-align``): the cosine between a candidate's head
# gradient and each validation sample's, averaged over the validation split, as LESS (Xia et
# al., 2024) and TracIn's cosine form select training data. Unit gradients remove the factor
# |p - onehot(y)| that puts every confidently classified candidate near 0 in Koh & Liang's
# score. For a linear head g = r ⊗ x~ (x~ = [x, 1]), so
#
#     mean_v cos(g_z, g_v) = ĝ_z · M,      M = mean_v ĝ_v,     ĝ = (r / |r|) ⊗ (x~ / |x~|),
#
# one (C, D+1) matrix formed once from the validation split and one GEMM pass over the pool.
# In words (first order): one SGD step of length η along -ĝ_z lowers Σ_v L_v / |g_v| (each
# validation sample's loss over its own gradient norm, so every sample counts alike) by
# η · V · score(z).


def unit_residuals(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(p - onehot(y)) / |p - onehot(y)| per row, computed without cancellation.

    r = p - onehot(y) is (1 - p_y) · u with u_c = q_c (c != y), u_y = -1 and q the softmax of
    the other classes' logits, so its direction u / |u| is exact even where float32 rounds p_y
    to 1 (a confident prediction, where p - onehot(y) itself would be 0). logits (B, C), labels (B,).
    """
    rows = torch.arange(len(labels), device=logits.device)
    others = logits.clone()
    others[rows, labels] = float("-inf")
    u = torch.softmax(others, dim=1)
    u[rows, labels] = -1.0
    return u / u.norm(dim=1, keepdim=True)


def _unit_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / |x~|, 1 / |x~|) with x~ = [x, 1]: the unit vector x~ / |x~| split into its parts."""
    inv = torch.rsqrt((x * x).sum(1, keepdim=True) + 1.0)
    return x * inv, inv


def head_val_alignment(val_x, val_labels, weight, bias, *, val_classes: Sequence[int] | None = None,
                       center=None, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """M = mean over the validation samples (of ``val_classes`` if given) of their unit head
    gradients ĝ_v = (r_v / |r_v|) ⊗ (x~_v / |x~_v|), with their true labels: (C, D+1).

    center (D,): the gradients of the same head written on shifted inputs x - center (weight
    W, bias b + W center; its logits, so its residuals r, are unchanged). The weight's gradient
    r ⊗ (x - center) then leaves out the part every input shares (for a ReLU network's
    features, a large one)."""
    dev = torch.device(device)
    W, b = (_to(a, dev, dtype) for a in (weight, bias))
    c = None if center is None else _to(center, dev, dtype)
    _, r, xs, inv = _unit_val_gradients(val_x, val_labels, W, b, val_classes, c)
    return _mean_unit_gradient(r, xs, inv)


def _mean_unit_gradient(r: torch.Tensor, xs: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """(C, D+1) mean of the unit gradients given in parts by :func:`_unit_val_gradients`."""
    return torch.cat([r.T @ xs, r.T @ inv], dim=1) / len(r)


def _unit_val_gradients(val_x, val_labels, W: torch.Tensor, b: torch.Tensor, val_classes, c):
    """The unit head gradients ĝ_v = (r_v / |r_v|) ⊗ (x~_v / |x~_v|) of the validation samples (of
    ``val_classes`` if given), true labels, in parts: (labels (V,), unit residuals (V, C),
    x_v / |x~_v| (V, D), 1 / |x~_v| (V, 1)); with center ``c`` (D,) or None, of the head on x - c."""
    vx = _to(val_x, W.device, W.dtype)
    if vx.ndim != 2 or vx.shape[1] != W.shape[1]:
        raise ValueError(f"val_x has shape {tuple(vx.shape)}, expected (V, {W.shape[1]})")
    if c is not None:
        vx, b = vx - c, b + W @ c
    vy, num_classes = _to(val_labels, W.device, torch.int64), W.shape[0]
    _check_labels(vy, num_classes, "val_labels")
    keep = _class_mask(vy, val_classes, num_classes)
    if not bool(keep.any()):
        raise ValueError(f"none of the {len(vy)} validation samples is in val_classes {tuple(val_classes or ())}"
                         if len(vy) else "gradient alignment needs validation samples; got none")
    vx, vy = vx[keep], vy[keep]
    return (vy, unit_residuals(torch.addmm(b, vx, W.T), vy), *_unit_inputs(vx))


def head_alignment_scores(candidates, weight, bias, alignment, *, labels=None, batch_size: int = 65536,
                          center=None, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> np.ndarray:
    """score_i = ĝ_i · M: the mean cosine between candidate i's head gradient (its label, or the
    head's argmax where ``labels`` is None) and the validation samples'; (N,) float32 in [-1, 1],
    higher = a step on it lowers the validation losses more.

    candidates (N, D), streamed ``batch_size`` rows at a time; alignment M (C, D+1) from
    :func:`head_val_alignment`. One GEMM per batch against [W; M[:, :D]], as head_influence_scores.
    center (D,): the gradient taken in the head's parametrisation on x - center (weight W, bias
    b + W center: the same logits), as head_val_alignment's ``center``.
    """
    dev = torch.device(device)
    W, b, M, labels = _head_pass_inputs(candidates, weight, bias, alignment, labels, "alignment", dev, dtype)
    c = None if center is None else _to(center, dev, dtype)
    if c is not None:
        b = b + W @ c
    C, D = W.shape
    n = candidates.shape[0]
    stacked_w, stacked_b = torch.cat([W, M[:, :D]]), torch.cat([b, M[:, D]])
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, batch_size):
        xb = _to(candidates[start : start + batch_size], dev, dtype)
        if c is not None:
            xb = xb - c
        z = torch.addmm(stacked_b, xb, stacked_w.T)
        y = z[:, :C].argmax(1) if labels is None else labels[start : start + len(xb)].to(dev)
        u = unit_residuals(z[:, :C], y)
        # (M[:, :D] x + M[:, D]) / |x~| is M applied to the unit x~
        s = (u * z[:, C:]).sum(1) * torch.rsqrt((xb * xb).sum(1) + 1.0)
        out[start : start + len(xb)] = s.float().cpu().numpy()
    return out


# head_class_alignment_scores: the memory its per-class alignment matrices may take (a class
# whose matrix does not fit is scored pairwise)
CLASS_MATRIX_BYTES = 1 << 30
CLASS_FORMS = ("auto", "pairwise", "matrix")


def head_class_alignment_scores(candidates, weight, bias, val_x, val_labels, *, labels=None,
                                val_classes: Sequence[int] | None = None, batch_size: int = 65536,
                                center=None, device: str | torch.device = "cpu",
                                dtype: torch.dtype = torch.float32, form: str = "auto") -> np.ndarray:
    """score_i = mean over the validation samples of candidate i's own class (its label, or the
    head's argmax where ``labels`` is None) of cos(g_i, g_v): :func:`head_alignment_scores` with
    the mean taken within the class, not over every class. (N,) float32 in [-1, 1]; NaN for a
    candidate whose class has no validation sample (in ``val_classes`` when given).

    Why within the class: for a linear head cos(g_i, g_v) = cos(r_i, r_v) · cos(x~_i, x~_v), and
    two different classes' residuals point apart (cos(r) < 0), so over every class an image
    scores lower the nearer it lies to the target samples of the classes it is not given, and
    (with centred embeddings, cos(x~) < 0) higher the farther it lies from them. Within its own
    class cos(r) >= 0 is the rule and the embeddings' cosine decides. First order: a step of
    length η along -ĝ_i lowers Σ_{v of class y_i} L_v / |g_v| by η · V_{y_i} · score_i.

    Two exact forms, chosen per class (``form="auto"``): pairwise, each candidate against the n_c
    samples of its class, (r_i · r_v)(x~_i · x~_v) / (|x~_i| |x~_v|) with unit residuals, O(n_c (C
    + D)) a candidate; or through the class's alignment matrix M_c (C, D+1), the mean of its
    samples' unit gradients (:func:`head_val_alignment` over class c), O(C (D + 1)) a candidate.
    "auto" takes the matrix where it is cheaper and the class's matrix fits in what is left of
    CLASS_MATRIX_BYTES (largest classes first; never the whole (C, C, D+1) tensor). ``form``
    "pairwise" or "matrix" forces one (tests). candidates (N, D) streamed ``batch_size`` rows at
    a time; center: as :func:`head_val_alignment`'s.
    """
    if form not in CLASS_FORMS:
        raise ValueError(f"unknown form {form!r}; valid: {', '.join(CLASS_FORMS)}")
    dev = torch.device(device)
    W, b = (_to(a, dev, dtype) for a in (weight, bias))
    c = None if center is None else _to(center, dev, dtype)
    vy, vr, vxs, vinv = _unit_val_gradients(val_x, val_labels, W, b, val_classes, c)
    per_class = {int(k): (vr[vy == k], vxs[vy == k], vinv[vy == k]) for k in torch.unique(vy).tolist()}
    C, D = W.shape
    matrices, room, size = {}, CLASS_MATRIX_BYTES, C * (D + 1) * W.element_size()
    for k, (kr, kxs, kinv) in sorted(per_class.items(), key=lambda item: -len(item[1][0])):
        cheaper = len(kr) * (C + D) > C * (D + 1)
        if form == "matrix" or (form == "auto" and cheaper and size <= room):
            matrices[k] = _mean_unit_gradient(kr, kxs, kinv)
            room -= size
    labels = _candidate_labels(labels, candidates.shape[0], C)
    if c is not None:
        b = b + W @ c  # the head on x - c: the same logits
    out = np.full(candidates.shape[0], np.nan, dtype=np.float32)
    for start in range(0, candidates.shape[0], batch_size):
        xb = _to(candidates[start : start + batch_size], dev, dtype)
        if c is not None:
            xb = xb - c
        z = torch.addmm(b, xb, W.T)
        y = z.argmax(1) if labels is None else labels[start : start + len(xb)].to(dev)
        u = unit_residuals(z, y)
        xs, inv = _unit_inputs(xb)
        s = torch.full((len(xb),), float("nan"), dtype=dtype, device=dev)
        for k in torch.unique(y).tolist():
            if k not in per_class:
                continue
            rows = torch.nonzero(y == k).squeeze(1)
            if k in matrices:  # ĝ_i · M_k = Σ_c u_ic (x_i · M_k[c, :D] + M_k[c, D]) / |x~_i|
                M = matrices[k]
                s[rows] = (u[rows] * (xs[rows] @ M[:, :D].T + inv[rows] * M[:, D])).sum(1)
                continue
            kr, kxs, kinv = per_class[k]
            cos_x = xs[rows] @ kxs.T + inv[rows] @ kinv.T  # (n, n_k): x~_i / |x~_i| · x~_v / |x~_v|
            s[rows] = ((u[rows] @ kr.T) * cos_x).mean(1)
        out[start : start + len(xb)] = s.float().cpu().numpy()
    return out


__all__ = [
    "SOLVERS",
    "KERNEL_CHOICES",
    "MAX_EXACT_PARAMS",
    "InfluenceDivergedError",
    "SolverOptions",
    "InverseHVPResult",
    "head_hessian",
    "head_loss_gradient",
    "head_s_test",
    "head_influence_scores",
    "unit_residuals",
    "head_val_alignment",
    "head_alignment_scores",
    "head_class_alignment_scores",
]
