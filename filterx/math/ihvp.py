"""Inverse Hessian-vector products for influence: s = (H + λI)^-1 v, with its residual.

``solve_inverse_hvp`` takes a *problem* (what ``filterx.math.influence`` builds for the head or
the last block) with ``hvp(u)`` (full-batch H u), ``batch_hvp(u, gen, batch_size)`` (on a
random mini-batch, for LiSSA), ``dense()`` (H as a matrix, for "exact") and ``num_params``.

Solvers (``SolverOptions.solver``): "exact" (dense float64 Hessian, Cholesky; refused above
``max_exact_params``), "cg" (conjugate gradient with exact full-batch Hessian-vector products)
and "lissa" (Agarwal et al.'s stochastic recursion on mini-batches, with a power-iteration
check of its scale and divergence detection). Each reports the relative residual
||(H + λI) s - v|| / ||v||, computed with one more full-batch Hessian-vector product.
The damping λ is added to the Hessian by every solver (see ``filterx.math.influence`` for the
whole convention).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields
from typing import Any

import torch

logger = logging.getLogger("filterx.math.influence")

SOLVERS = ("cg", "exact", "lissa")
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


def sync_cuda(device: torch.device) -> None:
    """Wait for the device (timings of CUDA work are otherwise of the launch only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)





def solve_inverse_hvp(problem, v, options: SolverOptions, *, params: str, curvature: str, val_loss: float,
                      num_val: int, val_grad_seconds: float) -> InverseHVPResult:
    """s_test = (H + λI)^-1 v for ``problem`` (see the module docstring) with ``options``; the
    other arguments are recorded in the result."""
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
        sync_cuda(dev)
        lambda_max_seconds = time.perf_counter() - t0
        scale = _lissa_scale(options, lambda_max)
        s, iterations = _lissa(problem, v, options, scale, lambda_max, gen)
    residual = float((damped(s) - v).norm() / v.norm().clamp_min(1e-300))
    sync_cuda(dev)
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
