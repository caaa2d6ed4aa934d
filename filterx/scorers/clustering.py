"""clustering: distance of each source image to k-means centroids of the target.

K-means runs over the target's embeddings: FAISS (its GPU index when faiss-gpu and a GPU are
present), or filterx's torch k-means on CUDA when FAISS has no GPU build (``kmeans="auto"``); a source image scores minus its distance to the nearest centroid
(``distance="min"``) or minus its mean Euclidean distance to all centroids (``"avg"``).
Embeddings are L2-normalised first by default (``normalize=True``): features from a ReLU
network differ mostly in scale along a few directions, and cosine geometry ranks images by
what they show rather than by contrast. With ``center="pool"`` the pool's mean embedding is
subtracted from pool and target before that (``filterx.math.blocks.pool_center``).
"""

from __future__ import annotations

import logging

import numpy as np

from filterx.math.blocks import BLOCK, CENTERS, check_center_choice, pool_center, prepare_rows, row_blocks
from filterx.scorers import Option, ScoreInputs, ScoreResult, register_scorer

log = logging.getLogger(__name__)
DISTANCES = ("min", "avg")
KMEANS = ("auto", "faiss", "torch")
CENTER_OPTION = Option("subtract the pool's mean embedding from pool and target before the L2 normalisation "
                       "(none: normalise them as they are)", choices=CENTERS)


def check_center(center: str, normalize: bool) -> None:
    """``center`` is one of CENTERS, and only asked for where rows are normalised after it."""
    check_center_choice(center)
    if center != "none" and not normalize:
        raise ValueError(f"center {center!r} needs normalize=True: Euclidean distances do not change under a shift")


def _faiss_has_gpu() -> bool:
    import faiss

    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def faiss_kmeans(x: np.ndarray, k: int, *, niter: int = 25, seed: int = 0, gpu: bool | None = None):
    """(centroids (k, D) float32, objective): FAISS k-means with ``k`` clusters over (M, D) ``x``.

    ``gpu=None`` uses a GPU when faiss was built with one and a device is visible.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if gpu is None:
        gpu = _faiss_has_gpu()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, gpu=bool(gpu), verbose=False,
                      max_points_per_centroid=100_000)
    km.train(x)
    return km.centroids.copy(), float(km.obj[-1]) if len(km.obj) else float("nan")


def fit_centroids(x: np.ndarray, k: int, *, niter: int, seed: int, kmeans: str = "auto",
                  device: str = "cpu") -> tuple[np.ndarray, float, str]:
    """k-means centroids (k, D) of ``x`` (N, D), the objective, and the implementation used:
    "auto" is FAISS, or filterx's torch k-means on CUDA when FAISS has no GPU build."""
    if kmeans == "auto":
        kmeans = "torch" if device.startswith("cuda") and not _faiss_has_gpu() else "faiss"
    if kmeans == "faiss":
        centroids, objective = faiss_kmeans(x, k, niter=niter, seed=seed)
        return centroids, objective, kmeans
    from filterx.math.kmeans import torch_kmeans

    km = torch_kmeans(x, k, niter=niter, seed=seed, device=device)
    return km.centroids, km.objective, kmeans


def centroid_distances(x: np.ndarray, centroids: np.ndarray, *, distance: str, device: str = "cpu",
                       block: int = BLOCK, normalize: bool = False, center: np.ndarray | None = None) -> np.ndarray:
    """(N,) float32 min or mean Euclidean distance from each row of ``x`` (N, D), any float
    dtype, to the (K, D) centroids; rows shifted by ``-center`` (D,) when given, then
    L2-normalised when ``normalize``.

    min: the nearest-centroid kernel (Triton on CUDA, blocked torch elsewhere) on squared
    distances, then a square root. avg: mean of Euclidean (not squared) distances; the mean of
    *squared* distances would rank by distance to the centroids' mean. Both run over row
    blocks (cast and normalised one at a time): O(N·K·D) time, O(block·(K + D)) extra memory.
    """
    import torch

    from filterx.kernels import nearest_centroid

    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)
    out = np.empty(len(x), dtype=np.float32)
    for i, xb in row_blocks(x, block, normalize=normalize, center=center, desc="clustering: assign"):
        xb = torch.from_numpy(xb).to(device)
        if distance == "min":
            d2, _, _ = nearest_centroid(xb, c)
            out[i : i + len(xb)] = d2.clamp_min(0).sqrt().cpu().numpy()
        else:
            out[i : i + len(xb)] = torch.cdist(xb, c).mean(dim=1).cpu().numpy()
    return out


@register_scorer("clustering", needs=("source_emb", "target_emb"), options={
    "k": Option("k-means clusters over the target", min=1),
    "distance": Option("distance to the nearest centroid, or mean distance to all", choices=DISTANCES),
    "center": CENTER_OPTION,
})
def clustering_scores(inputs: ScoreInputs, *, seed: int, k: int = 200, distance: str = "min",
                      niter: int = 25, normalize: bool = True, kmeans: str = "auto",
                      center: str = "none") -> ScoreResult:
    """Minus the distance of each source image to k-means centroids of the target embeddings."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
    if kmeans not in KMEANS:
        raise ValueError(f"unknown kmeans {kmeans!r}; valid: {', '.join(KMEANS)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    check_center(center, normalize)
    target = inputs.target_emb
    source = inputs.source_emb
    mean = pool_center(source, center)
    target = prepare_rows(target, mean, normalize)  # the pool is shifted and normalised block by block below
    k_used = min(k, len(target))
    if k_used < k:
        log.warning("k=%d is more than the %d target images; using k=%d", k, len(target), k_used)
    centroids, objective, kmeans = fit_centroids(target, k_used, niter=niter, seed=seed, kmeans=kmeans,
                                                 device=inputs.device)
    dist = centroid_distances(source, centroids, distance=distance, device=inputs.device, normalize=normalize,
                              center=mean)
    return ScoreResult(-dist, attrs={"k_used": k_used, "kmeans": kmeans, "kmeans_objective": objective,
                                     "center": center})
