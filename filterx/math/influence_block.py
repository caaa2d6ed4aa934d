"""Koh & Liang influence over the encoder's last block plus the head (``--params last-block``).

The parameters taken over are those of the last block (for a ResNet: layer4, pooling) and the
linear head, on the frozen trunk's features; objective, damping, sign and labels follow the
convention of :mod:`filterx.math.influence` (score(z) = ∇θ CE(z)ᵀ s_test, positive = helpful).
Per-sample gradients and Hessian-vector products come from torch.func (``vmap`` / ``jvp`` /
``vjp``) on one flat parameter vector. The loss over these parameters need not be convex:
``curvature="gauss-newton"`` replaces H by its positive semi-definite Gauss-Newton part
(identical to H for the head alone), and a negative curvature the solver meets is refused.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vjp, vmap

from filterx.math.ihvp import InverseHVPResult, SolverOptions, solve_inverse_hvp, sync_cuda
from filterx.math.influence import _check_labels, _class_mask

CURVATURES = ("hessian", "gauss-newton")


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


__all__ = ["CURVATURES", "last_block_s_test", "last_block_influence_scores", "last_block_batch_scorer"]
