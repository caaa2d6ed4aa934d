"""The target probe's fit: multinomial logistic regression on frozen embeddings, solved to
convergence (``train-encoder --probe-only``, the MoCo encoder's probe):

    minimise  R(W, b) = mean_j CE(W x_j + b, y_j) + (wd / 2) (||W||² + ||b||²)

in float64 with L-BFGS from zero to a gradient norm of ``tol`` (strictly convex for wd > 0: the
result does not depend on a seed). This is the objective whose Hessian influence
(``filterx.math.influence``) uses.
"""

from __future__ import annotations

import numpy as np
import torch


def fit_linear_probe(x: np.ndarray, y: np.ndarray, num_classes: int, weight_decay: float, *,
                     max_iter: int = 1000, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, dict]:
    """(W (C, D) float32, b (C,) float32, stats) minimising the module docstring's R on
    (N, D) ``x`` and int labels ``y`` in [0, C); stats: loss, grad_norm, iterations."""
    if weight_decay <= 0:
        raise ValueError(f"the probe needs a weight decay > 0 (without one a separable target has no "
                         f"minimum), got {weight_decay}")
    X = torch.from_numpy(np.asarray(x, dtype=np.float64))
    Y = torch.from_numpy(np.asarray(y, dtype=np.int64))
    theta = torch.zeros(num_classes, X.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0,
                            history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        logits = X @ theta[:, :-1].T + theta[:, -1]
        return torch.nn.functional.cross_entropy(logits, Y) + 0.5 * weight_decay * theta.pow(2).sum()

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
    w = theta.detach()
    return w[:, :-1].float().numpy(), w[:, -1].float().numpy(), stats
