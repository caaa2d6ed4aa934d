"""Koh & Liang influence of candidate samples on the target's validation loss.

The model is the target classifier: frozen embeddings x (the encoder's penultimate features)
and its linear head θ = [W, b], W (C, D), b (C,). Influence is taken over the head alone
(``head_*`` functions: closed forms, fast) or over the encoder's last block plus the head
(``last_block_*`` functions: torch.func, for a ResNet split into trunk / block / head).

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
reports the relative residual ||(H + λI) s - v|| / ||v||. For the last block the loss need not be convex: ``curvature="gauss-newton"`` replaces H by
its positive semi-definite Gauss-Newton part (identical for the head alone).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vjp, vmap

from filterx.math.ihvp import (
    MAX_EXACT_PARAMS, SOLVERS, InfluenceDivergedError, InverseHVPResult, SolverOptions, sync_cuda,
    solve_inverse_hvp,
)

logger = logging.getLogger("filterx.math.influence")

CURVATURES = ("hessian", "gauss-newton")


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
    W, b, S = (_to(a, dev, dtype) for a in (weight, bias, s_test))
    C, D = W.shape
    if S.shape != (C, D + 1):
        raise ValueError(f"s_test has shape {tuple(S.shape)}, expected (C, D+1) = {(C, D + 1)}")
    n = candidates.shape[0]
    if labels is not None:
        labels = _to(labels, torch.device("cpu"), torch.int64)
        if labels.shape != (n,):
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({n},)")
        _check_labels(labels, C, "candidate labels")
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


# ------------------------------------------------------------------- last block + head problem


class _FlatModel:
    """nn.Sequential(block, head) in eval mode (BatchNorm uses running statistics), evaluated
    functionally on one flat parameter vector, so torch.func transforms see a single tensor."""

    def __init__(self, block: nn.Module, head: nn.Linear, device, dtype):
        module = copy.deepcopy(nn.Sequential(block, head))
        self.module = module.to(device=device, dtype=dtype).eval()
        named = [(n, p.detach()) for n, p in self.module.named_parameters()]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.theta = torch.cat([p.reshape(-1) for _, p in named])
        self.buffers = dict(self.module.named_buffers())
        self.num_classes = head.out_features
        self.device, self.dtype = torch.device(device), dtype

    def logits(self, flat, x):
        params = {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes)}
        return functional_call(self.module, (params, self.buffers), (x,))

    def batch(self, x, y=None):
        x = x.to(device=self.device, dtype=self.dtype)
        return x, (None if y is None else torch.as_tensor(y).to(self.device, torch.int64))


class _BlockHessian:
    """H of R(θ) over block + head parameters (or its Gauss-Newton part), by torch.func."""

    def __init__(self, model: _FlatModel, train: Sequence, weight_decay: float, curvature: str):
        self.model, self.train, self.weight_decay = model, train, weight_decay
        self.curvature = curvature
        self.num_params = model.theta.numel()
        self.num_train = sum(len(y) for _, y in train)

    def _hvp(self, v, x, y, weight):
        theta = self.model.theta
        if self.curvature == "hessian":  # forward-over-reverse
            def loss(p):
                return F.cross_entropy(self.model.logits(p, x), y, reduction="sum") * weight

            return jvp(grad(loss), (theta,), (v,))[1]

        # Gauss-Newton Jᵀ (diag(p) - p pᵀ) J v: drops the block's second derivatives, so it is
        # positive semi-definite even where the loss is not convex in the block.
        def logits(p):
            return self.model.logits(p, x)

        z, jv = jvp(logits, (theta,), (v,))
        prob = torch.softmax(z, dim=1)
        u = (prob * jv - prob * (prob * jv).sum(1, keepdim=True)) * weight
        return vjp(logits, theta)[1](u)[0]

    def hvp(self, v):
        out = self.weight_decay * v
        for x, y in self.train:
            x, y = self.model.batch(x, y)
            out = out + self._hvp(v, x, y, 1.0 / self.num_train)
        return out

    def batch_hvp(self, v, gen, batch_size):
        pick = int(torch.randint(len(self.train), (1,), generator=gen))
        x, y = self.model.batch(*self.train[pick])
        return self._hvp(v, x, y, 1.0 / len(y)) + self.weight_decay * v

    def dense(self):
        eye = torch.eye(self.num_params, dtype=self.model.dtype, device=self.model.device)
        return torch.cat([vmap(self.hvp)(eye[s : s + 64]) for s in range(0, self.num_params, 64)])


def _batches(feats, labels, batch_size):
    return [(feats[s : s + batch_size], None if labels is None else labels[s : s + batch_size])
            for s in range(0, len(feats), batch_size)]


def last_block_s_test(block: nn.Module, head: nn.Linear, train: Sequence, val: Iterable, *,
                      val_classes: Sequence[int] | None = None,
                      options: SolverOptions = SolverOptions(),
                      curvature: str = "hessian",
                      device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> InverseHVPResult:
    """s_test over block + head parameters, flat (P,) in nn.Sequential(block, head) order.

    block: e.g. a ResNet's layer4 + avgpool + flatten; head: the linear classifier on its output.
    train: a re-iterable, indexable sequence of (trunk_feats (B, ...), labels (B,)) batches of
    the target training set (LiSSA samples whole batches from it); val: iterable of such
    batches of the validation split. Trunk features are the trunk's outputs (e.g. layer3),
    computed by the caller; put them on ``device`` for speed. Modules are copied, cast to
    ``dtype`` and evaluated in eval mode (BatchNorm with running statistics).
    curvature: "hessian" (exact; the block's loss need not be convex, so CG may meet negative
    curvature and ask for more damping) or "gauss-newton" (positive semi-definite; the usual
    choice for networks, equal to the Hessian for the head alone). CG stops on its recursive
    residual; the reported ``residual`` is recomputed, and in float32 it levels off near 1e-6.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; valid: {', '.join(CURVATURES)}")
    model = _FlatModel(block, head, device, dtype)
    t0 = time.perf_counter()
    total, count, g = 0.0, 0, torch.zeros_like(model.theta)
    for x, y in val:
        x, y = model.batch(x, y)
        _check_labels(y, model.num_classes, "val labels")
        keep = _class_mask(y, val_classes, model.num_classes)
        if bool(keep.any()):
            def loss(p):
                return F.cross_entropy(model.logits(p, x[keep]), y[keep], reduction="sum")

            batch_grad, batch_loss = grad_and_value(loss)(model.theta)
            g, total, count = g + batch_grad, total + float(batch_loss), count + int(keep.sum())
    if count == 0:
        raise ValueError(
            f"none of the validation samples is in val_classes {tuple(val_classes or ())}"
        )
    sync_cuda(model.device)
    problem = _BlockHessian(model, train, options.weight_decay, curvature)
    return solve_inverse_hvp(problem, g / count, options, params="last-block", curvature=curvature,
                             val_loss=total / count, num_val=count, val_grad_seconds=time.perf_counter() - t0)


def last_block_influence_scores(block: nn.Module, head: nn.Linear, s_test: torch.Tensor,
                                candidates, *, labels=None, batch_size: int = 256,
                                device: str | torch.device = "cpu",
                                dtype: torch.dtype = torch.float32,
                                method: str = "jvp") -> np.ndarray:
    """score_i = ∇θ CE(z_i)ᵀ s_test over block + head parameters; (N,) float32 numpy.

    candidates: a tensor (N, ...) of trunk features (batched by ``batch_size``, with labels
    None for pseudo-labels or (N,) ints), or an iterable of feature batches or of
    (feats, labels) batches. method="jvp" (fast: one forward-mode pass gives every sample's
    directional derivative along s_test) or "per-sample-grad" (reference: vmap(grad)).
    """
    score_batch = last_block_batch_scorer(block, head, s_test, device=device, dtype=dtype, method=method)
    if isinstance(candidates, torch.Tensor):
        candidates = _batches(candidates, labels, batch_size)
    elif labels is not None:
        raise ValueError("labels= goes with a candidates tensor; batches carry their own labels")
    out = [score_batch(*item) if isinstance(item, (tuple, list)) else score_batch(item) for item in candidates]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def last_block_batch_scorer(block: nn.Module, head: nn.Linear, s_test: torch.Tensor, *,
                            device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                            method: str = "jvp") -> Callable[..., np.ndarray]:
    """``score(feats, labels=None) -> (B,) float32`` for one batch of trunk features, the block +
    head copied to ``device`` once (a pool pass calls it per batch; see
    ``last_block_influence_scores`` for the score and the methods)."""
    if method not in ("jvp", "per-sample-grad"):
        raise ValueError(f"unknown method {method!r}; valid: jvp, per-sample-grad")
    model = _FlatModel(block, head, device, dtype)
    s = s_test.to(model.device, dtype).reshape(-1)
    if s.numel() != model.theta.numel():
        raise ValueError(f"s_test has {s.numel()} entries, the block + head {model.theta.numel()}")

    def score(feats, labels=None) -> np.ndarray:
        x, y = model.batch(feats, labels)
        if y is None:
            with torch.no_grad():
                y = model.logits(model.theta, x).argmax(1)
        _check_labels(y, model.num_classes, "candidate labels")
        if method == "jvp":
            def losses(p):
                return F.cross_entropy(model.logits(p, x), y, reduction="none")

            scores = jvp(losses, (model.theta,), (s,))[1]
        else:
            def one(p, xi, yi):
                return F.cross_entropy(model.logits(p, xi[None]), yi[None])

            scores = vmap(grad(one), in_dims=(None, 0, 0))(model.theta, x, y) @ s
        return scores.detach().float().cpu().numpy()

    return score


__all__ = [
    "SOLVERS",
    "CURVATURES",
    "KERNEL_CHOICES",
    "MAX_EXACT_PARAMS",
    "InfluenceDivergedError",
    "SolverOptions",
    "InverseHVPResult",
    "head_hessian",
    "head_loss_gradient",
    "head_s_test",
    "head_influence_scores",
    "last_block_s_test",
    "last_block_influence_scores",
]
