"""k-means in torch: the GPU path where FAISS has no GPU build (e.g. faiss-cpu on a CUDA box).

Lloyd's algorithm: each iteration assigns every point to its nearest centroid with
``filterx.kernels.nearest_centroid`` (a Triton kernel on CUDA that never forms the N x K
distance matrix; blocked matmuls elsewhere), then moves each centroid to the mean of its
points with one ``index_add_``. Initialisation is k-means++ on a seeded sample of at most
``256 * k`` points, as FAISS subsamples too. A centroid that loses all its points is re-seeded
on the point farthest from its current centroid, so exactly ``k`` centroids come out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray  # (k, D) float32
    objective: float  # mean squared distance of the (sampled) points to their nearest centroid
    iterations: int


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: (k, D) centroids drawn from the rows of ``x``."""
    from filterx.kernels import nearest_centroid

    n = x.shape[0]
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one matrix-vector product per new centroid
    # instead of an (n, D) difference tensor.
    sq = (x * x).sum(1)

    def dist2(i: int) -> torch.Tensor:
        return (sq - 2 * (x @ x[i]) + sq[i]).clamp_min_(0)

    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [x[first]]
    d2 = dist2(first)
    for _ in range(1, k):
        probs = d2.double().cpu()
        total = float(probs.sum())
        idx = int(torch.multinomial(probs / total, 1, generator=gen)) if total > 0 else int(torch.randint(n, (1,), generator=gen))
        centroids.append(x[idx])
        d2 = torch.minimum(d2, dist2(idx))
    c = torch.stack(centroids)
    nearest_centroid(x[:1], c)  # fail early on a dtype/shape the kernel rejects
    return c


def torch_kmeans(x, k: int, *, niter: int = 25, seed: int = 0, device: str = "cpu",
                 max_points_per_centroid: int = 256, tol: float = 1e-6) -> KMeansResult:
    """k-means of (N, D) ``x`` (numpy or tensor) with ``k`` clusters on ``device``.

    Stops after ``niter`` iterations or when the objective improves by less than ``tol``
    (relative). Deterministic for a seed on a given device.
    """
    from filterx.kernels import nearest_centroid

    x = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32) if isinstance(x, np.ndarray) else x)
    x = x.to(device=device, dtype=torch.float32)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of points), got {k}")
    gen = torch.Generator().manual_seed(seed)
    sample = x
    if n > max_points_per_centroid * k:
        sample = x[torch.randperm(n, generator=gen)[: max_points_per_centroid * k].to(device)]
    c = _kmeans_pp(sample, k, gen)
    prev = float("inf")
    objective, it = prev, 0
    for it in range(1, niter + 1):
        d2, _, assign = nearest_centroid(sample, c)
        objective = float(d2.clamp_min(0).mean())
        sums = torch.zeros_like(c).index_add_(0, assign, sample)
        counts = torch.bincount(assign, minlength=k).to(c.dtype)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if bool(empty.any()):
            # re-seed empty clusters on the points worst served by their centroid
            far = torch.argsort(d2, descending=True)[: int(empty.sum())]
            c[empty] = sample[far]
        if prev - objective <= tol * max(prev, 1e-30) and not bool(empty.any()):
            break
        prev = objective
    # the objective of the centroids returned, not of the assignment before their last move
    objective = float(nearest_centroid(sample, c)[0].clamp_min(0).mean())
    return KMeansResult(c.cpu().numpy(), objective, it)
