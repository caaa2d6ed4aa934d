"""The target probe's fit: multinomial logistic regression on frozen embeddings, solved to
convergence (``train-encoder --probe-only``, the MoCo encoder's probe):

    minimise  R(W, b) = mean_j CE(W x_j + b, y_j) + (wd / 2) (||W||² + ||b||²)

in float64 with L-BFGS from zero to a gradient norm of ``tol`` (strictly convex for wd > 0: the
result does not depend on a seed). This is the objective whose Hessian influence
(``filterx.math.influence``) uses.

With ``outliers`` (rows the head should not be sure of), outlier exposure (Hendrycks, Mazeika
and Dietterich, 2019) adds, with weight λ, the mean cross-entropy from the uniform distribution
over the C classes to the head's prediction on them:

    R(W, b) + λ mean_i [ logsumexp(z_i) - mean_c z_ic ],   z_i = W o_i + b

(each term is -1/C Σ_c log p_ic; convex, so the sum stays strictly convex). The head then
learns to be unsure away from the target's classes, where a head fitted on the target alone
is often surest.
"""

from __future__ import annotations

import numpy as np
import torch


def fit_linear_probe(x: np.ndarray, y: np.ndarray, num_classes: int, weight_decay: float, *,
                     outliers: np.ndarray | None = None, outlier_weight: float = 0.0,
                     max_iter: int = 1000, tol: float = 1e-6,
                     device: str = "cpu") -> tuple[np.ndarray, np.ndarray, dict]:
    """(W (C, D) float32, b (C,) float32, stats) minimising the module docstring's R on
    (N, D) ``x`` and int labels ``y`` in [0, C), plus its outlier term on (No, D) ``outliers``
    with weight ``outlier_weight`` when they are given (> 0: the 0.0 default is refused with outliers,
    so the caller chooses the weight); stats: loss, grad_norm, iterations."""
    if weight_decay <= 0:
        raise ValueError(f"the probe needs a weight decay > 0 (without one a separable target has no "
                         f"minimum), got {weight_decay}")
    if outliers is not None and (outlier_weight <= 0 or len(outliers) == 0):
        raise ValueError(f"outlier exposure needs outlier rows and a weight > 0; got {len(outliers)} rows, "
                         f"weight {outlier_weight}")
    dev = torch.device(device)
    X = torch.from_numpy(np.asarray(x, dtype=np.float64)).to(dev)
    Y = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(dev)
    O = None if outliers is None else torch.from_numpy(np.asarray(outliers, dtype=np.float64)).to(dev)
    theta = torch.zeros(num_classes, X.shape[1] + 1, dtype=torch.float64, device=dev, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0,
                            history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        logits = X @ theta[:, :-1].T + theta[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, Y) + 0.5 * weight_decay * theta.pow(2).sum()
        if O is not None:
            z = O @ theta[:, :-1].T + theta[:, -1]
            loss = loss + outlier_weight * (torch.logsumexp(z, 1) - z.mean(1)).mean()
        return loss

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    loss = closure().detach()
    # the largest absolute component, what L-BFGS's tolerance_grad bounds
    stats = {"loss": float(loss), "grad_norm": float(theta.grad.abs().max()),
             "iterations": int(opt.state[opt._params[0]].get("n_iter", 0))}
    w = theta.detach().cpu()
    return w[:, :-1].float().numpy(), w[:, -1].float().numpy(), stats
