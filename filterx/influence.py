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

Solvers (``SolverOptions.solver``): "exact" (dense float64 Hessian, Cholesky; refused above
``max_exact_params``), "cg" (conjugate gradient with exact full-batch Hessian-vector products)
and "lissa" (Agarwal et al.'s stochastic recursion on mini-batches, with a power-iteration
check of its scale and divergence detection). Each reports the relative residual
||(H + λI) s - v|| / ||v||, computed with one more full-batch Hessian-vector product.
For the last block the loss need not be convex: ``curvature="gauss-newton"`` replaces H by
its positive semi-definite Gauss-Newton part (identical for the head alone).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vjp, vmap

logger = logging.getLogger("filterx.influence")

SOLVERS = ("cg", "exact", "lissa")
CURVATURES = ("hessian", "gauss-newton")
MAX_EXACT_PARAMS = 20_000
# An automatic LiSSA scale sits this far above the power-iteration estimate of the largest
# eigenvalue of H + λI: power iteration approaches it from below and mini-batch Hessians
# have larger extreme eigenvalues than the full-batch one.
_SCALE_MARGIN = 1.5
# A convergent LiSSA estimate has norm <= ||v|| / λ_eff; ten times that is certainly divergence.
_DIVERGENCE_FACTOR = 10.0


class InfluenceDivergedError(ValueError):
    """LiSSA's recursion blew up; raised instead of returning numbers from a diverged run."""


@dataclass(frozen=True)
class SolverOptions:
    """How to compute s_test = (H + λI)^-1 v. See the module docstring for the conventions.

    damping:       λ, added to the Hessian by every solver.
    weight_decay:  wd of the training objective's (wd/2)||θ||² term (part of H, not damping).
    cg_tol:        stop CG when the recursive relative residual is below this.
    lissa_scale:   None: _SCALE_MARGIN × (λ_max + λ) from power iteration.
    lissa_depth:   maximal recursion steps per repeat; lissa_repeats estimates are averaged.
    lissa_batch_size: training samples per step (head; last-block uses the caller's batches).
    lissa_tol, lissa_window: stop a repeat once the mean ||estimate|| over the last
                   lissa_window steps differs from that of the window before by < lissa_tol.
    check_scale:   raise a scale below λ_max + λ to the automatic one (with a warning);
                   False uses the given scale as is (divergence is still detected).
    """

    solver: str = "cg"
    damping: float = 0.01
    weight_decay: float = 0.0
    cg_tol: float = 1e-6
    cg_max_iter: int = 1000
    lissa_scale: float | None = None
    lissa_depth: int = 5000
    lissa_repeats: int = 1
    lissa_batch_size: int = 256
    lissa_tol: float = 1e-4
    lissa_window: int = 100
    check_scale: bool = True
    power_iters: int = 100
    max_exact_params: int = MAX_EXACT_PARAMS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; valid: {', '.join(SOLVERS)}")
        if not (self.damping >= 0 and self.weight_decay >= 0):
            raise ValueError(
                f"damping ({self.damping}) and weight_decay ({self.weight_decay}) must be >= 0"
            )
        if self.solver == "lissa" and self.damping + self.weight_decay <= 0:
            raise ValueError("solver 'lissa' needs damping + weight_decay > 0 to converge")
        if self.lissa_scale is not None and not self.lissa_scale > 0:
            raise ValueError(f"lissa_scale must be > 0 or None, got {self.lissa_scale}")
        for name in ("cg_max_iter", "lissa_depth", "lissa_repeats", "lissa_batch_size",
                     "lissa_window", "power_iters", "max_exact_params"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class InverseHVPResult:
    """s_test and how it was obtained.

    s_test: float64 on the solve device; (C, D+1) for params="head" (column D is the bias),
            (P,) for params="last-block", ordered as nn.Sequential(block, head).parameters().
    residual: ||(H + λI) s_test - ∇L_val|| / ||∇L_val|| (full batch, exact HVP).
    curvature: "hessian" or "gauss-newton" (last-block only; the same matrix for the head).
    lambda_max: power-iteration estimate of H's largest eigenvalue (LiSSA only, else None);
            for an indefinite H (last-block "hessian") its largest magnitude.
    scale: the LiSSA scale actually used (else None).
    """

    s_test: torch.Tensor
    params: str
    curvature: str
    solver: str
    num_params: int
    damping: float
    weight_decay: float
    residual: float
    iterations: int
    lambda_max: float | None
    scale: float | None
    val_loss: float
    num_val: int
    val_grad_seconds: float
    lambda_max_seconds: float
    solve_seconds: float

    def summary(self) -> dict[str, Any]:
        """Every field except s_test, as plain Python values (for score attrs and logs)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "s_test"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    t0 = time.perf_counter()
    keep = _class_mask(vy, val_classes, num_classes)
    if not bool(keep.any()):
        raise ValueError(
            f"none of the {len(vy)} validation samples is in val_classes {tuple(val_classes)}"
        )
    v, val_loss = head_loss_gradient(vx[keep], vy[keep], W, b)
    _sync(dev)
    t_grad = time.perf_counter() - t0
    problem = _HeadHessian(tx, W, b, options.weight_decay)
    result = _solve(problem, v.reshape(-1), options, params="head", curvature="hessian",
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
    _sync(model.device)
    problem = _BlockHessian(model, train, options.weight_decay, curvature)
    return _solve(problem, g / count, options, params="last-block", curvature=curvature,
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


# --------------------------------------------------------------------------------- solvers


def _solve(problem, v, options: SolverOptions, *, params, curvature, val_loss, num_val,
           val_grad_seconds):
    lam, dev = options.damping, v.device

    def damped(u):
        return problem.hvp(u) + lam * u

    t0 = time.perf_counter()
    lambda_max = scale = None
    lambda_max_seconds = 0.0
    if options.solver == "exact":
        if problem.num_params > options.max_exact_params:
            raise ValueError(
                f"solver 'exact' forms a dense {problem.num_params}x{problem.num_params} "
                f"Hessian; the limit is max_exact_params={options.max_exact_params} "
                f"parameters: use solver 'cg'"
            )
        A = problem.dense()
        A.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            s = torch.cholesky_solve(v[:, None], L)[:, 0]
        else:  # the block's loss need not be convex; LU solves the damped system if regular
            eig = torch.linalg.eigvalsh(A).abs()
            if eig.min() <= 1e-12 * eig.max():
                raise ValueError(f"H + λI is singular at damping λ={lam}: use damping > 0")
            logger.warning("H + λI (λ=%g) is not positive definite; solving it with LU", lam)
            s = torch.linalg.solve(A, v)
        iterations = 1
    elif options.solver == "cg":
        s, iterations = _conjugate_gradient(damped, v, options.cg_tol, options.cg_max_iter, lam)
    else:
        gen = torch.Generator().manual_seed(options.seed)
        lambda_max = _largest_eigenvalue(problem.hvp, v, gen, options.power_iters)
        _sync(dev)
        lambda_max_seconds = time.perf_counter() - t0
        scale = _lissa_scale(options, lambda_max)
        s, iterations = _lissa(problem, v, options, scale, lambda_max, gen)
    residual = float((damped(s) - v).norm() / v.norm().clamp_min(1e-300))
    _sync(dev)
    solve_seconds = time.perf_counter() - t0 - lambda_max_seconds
    logger.info("%s s_test (%s, %d params): residual %.3g after %d iterations in %.2fs",
                options.solver, params, problem.num_params, residual, iterations, solve_seconds)
    return InverseHVPResult(
        s_test=s, params=params, curvature=curvature, solver=options.solver,
        num_params=problem.num_params, damping=lam, weight_decay=options.weight_decay,
        residual=residual, iterations=iterations, lambda_max=lambda_max, scale=scale,
        val_loss=val_loss, num_val=num_val, val_grad_seconds=val_grad_seconds,
        lambda_max_seconds=lambda_max_seconds, solve_seconds=solve_seconds,
    )


def _conjugate_gradient(op, v, tol, max_iter, lam):
    x, r = torch.zeros_like(v), v.clone()
    p, rs, target = r.clone(), r.dot(r), tol * v.norm()
    for it in range(1, max_iter + 1):
        Ap = op(p)
        curvature = p.dot(Ap)
        if curvature <= 0:
            raise ValueError(
                f"CG met non-positive curvature pᵀ(H + λI)p = {float(curvature):.3g} at "
                f"iteration {it}: the loss is not convex here; raise damping above {lam}, or use "
                f"curvature='gauss-newton' (last-block) or solver 'exact'"
            )
        alpha = rs / curvature
        x.add_(alpha * p)
        r.sub_(alpha * Ap)
        rs_new = r.dot(r)
        if rs_new.sqrt() <= target:
            return x, it
        p = r + (rs_new / rs) * p
        rs = rs_new
    logger.warning("CG stopped at cg_max_iter=%d with relative residual %.3g > cg_tol=%g",
                   max_iter, float(rs.sqrt() / v.norm()), tol)
    return x, max_iter


def _largest_eigenvalue(hvp, v, gen, iters, tol=1e-4):
    """Power iteration: H's eigenvalue of largest magnitude (the largest one where H is PSD)."""
    u = torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device)
    u /= u.norm()
    estimate = 0.0
    for _ in range(iters):
        w = hvp(u)
        new, norm = abs(float(u.dot(w))), float(w.norm())
        if norm == 0.0:
            return 0.0
        u = w / norm
        if abs(new - estimate) <= tol * abs(new):
            return new
        estimate = new
    return estimate


def _lissa_scale(options: SolverOptions, lambda_max: float) -> float:
    bound = lambda_max + options.damping
    auto = _SCALE_MARGIN * bound
    if options.lissa_scale is None:
        return auto
    if options.check_scale and options.lissa_scale < bound:
        logger.warning(
            "lissa_scale=%g is below λ_max + λ = %.4g (λ_max ≈ %.4g from power iteration), "
            "so LiSSA would diverge; raising it to %.4g",
            options.lissa_scale, bound, lambda_max, auto)
        return auto
    return options.lissa_scale


def _lissa(problem, v, options: SolverOptions, scale, lambda_max, gen):
    """h_j = v + (I - (H_batch + λI)/scale) h_{j-1}, h_0 = v; estimate h_J / scale, averaged."""
    lam, window = options.damping, options.lissa_window
    bound = _DIVERGENCE_FACTOR * float(v.norm()) / (lam + options.weight_decay)
    log_every = max(1, options.lissa_depth // 10)
    total, steps = torch.zeros_like(v), 0
    for rep in range(options.lissa_repeats):
        h, norms = v.clone(), []
        for j in range(1, options.lissa_depth + 1):
            h = v + h - (problem.batch_hvp(h, gen, options.lissa_batch_size) + lam * h) / scale
            norm = float(h.norm()) / scale
            if not math.isfinite(norm) or norm > bound:
                raise InfluenceDivergedError(
                    f"LiSSA diverged at step {j} (||estimate|| = {norm:.3g}, above {bound:.3g}) "
                    f"with scale={scale:.4g}, while λ_max ≈ {lambda_max:.4g} and damping "
                    f"λ={lam}: use a scale above λ_max + λ = {lambda_max + lam:.4g}, e.g. "
                    f"{_SCALE_MARGIN * (lambda_max + lam):.4g}, or leave check_scale on"
                )
            norms.append(norm)
            if j % log_every == 0:
                logger.info("lissa repeat %d step %d/%d: ||estimate|| = %.6g",
                            rep, j, options.lissa_depth, norm)
            # Compare means of two consecutive windows: single norms carry mini-batch noise.
            if j >= 2 * window and abs(sum(norms[-window:]) - sum(norms[-2 * window : -window])) \
                    <= options.lissa_tol * sum(norms[-window:]):
                logger.info("lissa repeat %d settled at step %d: ||estimate|| = %.6g", rep, j, norm)
                break
        total += h / scale
        steps += j
    return total / options.lissa_repeats, steps


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
