"""Pool-level scorers, as DataComp and k-NN retrieval select: ``knn-target`` and ``pool-clusters``.

knn-target: a pool image scores minus its mean Euclidean distance to its ``k`` nearest target
embeddings (exact: a FAISS flat index over the target, the pool searched in row blocks, so
memory stays O(block * k + M * D) at any pool size N).

pool-clusters (DataComp's image-based filter): k-means over the *pool's* embeddings with many
clusters; each target embedding picks its nearest pool centroid; the clusters picked by at least
one target embedding are kept. Score of a pool image in cluster c at distance d from its nearest
target embedding::

    votes[c] + 0.5 / (1 + d)        votes[c] = number of target embeddings that picked c

so kept-cluster samples score >= 1 and all others lie in (0, 0.5]: ``select --threshold 1``
keeps exactly the chosen clusters (DataComp), and a fraction or count budget takes the clusters
most target embeddings chose first, nearer-to-the-target samples first within one vote count.
The fractional part never reaches the next integer (it is at most 0.5), so the vote order is
exact; within one vote count float32 resolution (~votes * 6e-8) may tie very close distances,
and select breaks those by the lower id.

Both L2-normalise first by default (``normalize=True``), as ``clustering`` does; with
``center="pool"`` the pool's mean embedding is subtracted from pool and target first
(``filterx.math.blocks.pool_center``).
"""

from __future__ import annotations

import logging

import numpy as np

from filterx.math.blocks import finite_rows, pool_center, prepare_rows, row_blocks, sample_rows
from filterx.scorers import Option, ScoreInputs, ScoreResult, register_scorer
from filterx.scorers.clustering import CENTER_OPTION, KMEANS, _faiss_has_gpu, check_center, fit_centroids

log = logging.getLogger(__name__)
BLOCK = 65536  # pool rows per search: bounds the (block, k) result buffers
# k-means trains on at most this many pool rows per centroid (FAISS's own default), and at
# most TRAIN_MAX_ROWS rows in all: the float32 training copy is bounded (1 GiB at D = 512)
TRAIN_POINTS_PER_CENTROID = 256
TRAIN_MAX_ROWS = 500_000


def flat_index(xb: np.ndarray, *, gpu: bool | None = None):
    """An exact FAISS L2 index holding the rows of ``xb`` (M, D); ``gpu=None`` uses FAISS's GPU
    index when faiss was built with one and a device is visible."""
    import faiss

    xb = np.ascontiguousarray(xb, dtype=np.float32)
    index = faiss.IndexFlatL2(xb.shape[1])
    if _faiss_has_gpu() if gpu is None else gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(xb)
    return index


def knn_search(xq: np.ndarray, xb: np.ndarray, k: int, *, block: int = BLOCK, gpu: bool | None = None):
    """Exact k nearest rows of ``xb`` (M, D) for every row of ``xq`` (N, D), squared L2.

    Returns ``(d2, idx)``: (N, k) float32 squared distances (clamped at 0) ascending, and (N, k)
    int64 row indexes into ``xb``. ``xq`` is searched ``block`` rows at a time (it may be a
    memory-mapped or otherwise lazily read array); the index holds ``xb`` only.
    """
    if not 1 <= k <= len(xb):
        raise ValueError(f"k must be in [1, {len(xb)}] (the rows searched), got {k}")
    index = flat_index(xb, gpu=gpu)
    d2 = np.empty((len(xq), k), dtype=np.float32)
    idx = np.empty((len(xq), k), dtype=np.int64)
    for i in range(0, len(xq), block):
        q = np.ascontiguousarray(xq[i : i + block], dtype=np.float32)
        d2[i : i + len(q)], idx[i : i + len(q)] = index.search(q, k)
    np.maximum(d2, 0, out=d2)  # ||x||^2 + ||y||^2 - 2 x.y rounds slightly below 0 for near-duplicates
    return d2, idx


def nearest_rows(q, base, k: int, *, base_sq=None, budget_bytes: int = 1 << 26):
    """Exact k nearest rows of ``base`` (M, D) for each row of ``q`` (b, D), both float32 torch
    tensors: ((b, k) squared L2 distances ascending, clamped at 0; (b, k) int64 indexes).

    ||q||^2 - 2 q.base^T + ||base||^2 in sub-blocks of at most ``budget_bytes`` of distances,
    then a top-k: one GEMM per sub-block. On a 2-core CPU this ran several times faster than a
    FAISS flat index's search for the same result (FAISS's heap pass is per query row).
    """
    import torch

    base_sq = (base * base).sum(1) if base_sq is None else base_sq
    step = max(1, budget_bytes // (4 * max(1, len(base))))
    d2, idx = [], []
    for i in range(0, len(q), step):
        qb = q[i : i + step]
        d = torch.addmm(base_sq[None, :], qb, base.T, alpha=-2.0).add_((qb * qb).sum(1, keepdim=True))
        v, j = torch.topk(d, k, dim=1, largest=False, sorted=True)
        d2.append(v.clamp_min_(0))
        idx.append(j)
    if not d2:
        return torch.zeros((0, k)), torch.zeros((0, k), dtype=torch.int64)
    return torch.cat(d2), torch.cat(idx)


def mean_knn_distance(source: np.ndarray, target: np.ndarray, k: int, *, normalize: bool = True,
                      center: np.ndarray | None = None, block: int = BLOCK, gpu: bool | None = None) -> np.ndarray:
    """(N,) float32 mean Euclidean distance of each row of ``source`` (any float dtype) to its
    ``k`` nearest rows of ``target`` (M, D), both minus ``center`` (D,) when given, then
    L2-normalised when ``normalize``; NaN for a row that is not finite.

    The pool is read, cast, normalised and searched ``block`` rows at a time, so beyond its
    inputs this holds the target and one block: O(M * D + block * (D + k)) floats at any N,
    O(N * M * D) time. On a GPU build of FAISS (``gpu``, default: when present) its flat
    index searches; elsewhere ``nearest_rows`` (torch GEMM + top-k).
    """
    import torch

    if not 1 <= k <= len(target):
        raise ValueError(f"k must be in [1, {len(target)}] (the target rows), got {k}")
    base = prepare_rows(target, center, normalize)
    use_faiss = _faiss_has_gpu() if gpu is None else gpu
    index = flat_index(base, gpu=True) if use_faiss else None
    base_t = torch.from_numpy(base)
    base_sq = (base_t * base_t).sum(1)
    out = np.full(len(source), np.nan, dtype=np.float32)
    for i, q in row_blocks(source, block, desc="knn-target: search"):
        ok = _finite_rows(q)
        q = prepare_rows(q[ok], center, normalize)
        if not len(q):
            continue
        if index is not None:
            d2, _ = index.search(q, k)
        else:
            d2 = nearest_rows(torch.from_numpy(q), base_t, k, base_sq=base_sq)[0].numpy()
        out[i : i + len(ok)][ok] = np.sqrt(np.maximum(d2, 0)).mean(axis=1)  # a view: writes through
    return out


def _finite_rows(x: np.ndarray) -> np.ndarray:
    """(N,) bool: rows without NaN or inf (an image that could not be embedded)."""
    return finite_rows(x)


def _check_target(target: np.ndarray, name: str) -> np.ndarray:
    target = target[_finite_rows(target)]
    if len(target) == 0:
        raise ValueError(f"method {name!r} needs at least one target embedding, got none (finite)")
    return target


@register_scorer("knn-target", needs=("source_emb", "target_emb"), options={
    "k": Option("nearest target embeddings", min=1), "center": CENTER_OPTION})
def knn_target_scores(inputs: ScoreInputs, *, seed: int, k: int = 10, normalize: bool = True,
                      center: str = "none") -> ScoreResult:
    """Minus the mean Euclidean distance of each pool image to its k nearest target embeddings."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    check_center(center, normalize)
    target = _check_target(inputs.target_emb, "knn-target")
    k_used = min(k, len(target))
    if k_used < k:
        log.warning("k=%d is more than the %d target images; using k=%d", k, len(target), k_used)
    mean = pool_center(inputs.source_emb, center)
    scores = -mean_knn_distance(inputs.source_emb, target, k_used, normalize=normalize, center=mean)
    return ScoreResult(scores, attrs={"k_used": k_used, "unscored": int(np.isnan(scores).sum()), "center": center})


# the default k's ceiling: k-means costs N x k x D per pass, so an uncapped k = N / 50 grows as
# N^2 (25,600 clusters at 1.28M: ~1e16 multiply-adds per pass, hours on a CPU). With k capped
# the scorer is linear in N; DataComp's ratio (100k clusters for 12.8M images) is a GPU job
# asked for with --k.
MAX_DEFAULT_CLUSTERS = 1000


def default_pool_clusters(num_pool: int) -> int:
    """The default number of pool clusters: one per 50 pool images, at least 1 and at most
    ``MAX_DEFAULT_CLUSTERS`` (1,000), so that the default stays linear in the pool's size."""
    return max(1, min(num_pool // 50, MAX_DEFAULT_CLUSTERS))


def nearest_cluster(x: np.ndarray, centroids: np.ndarray, *, block: int = BLOCK):
    """((N,) int64 nearest centroid of each row of ``x``, (N,) float32 squared distance)."""
    d2, idx = knn_search(x, centroids, 1, block=block)
    return idx[:, 0], d2[:, 0]


def pool_assignments(source, rows: np.ndarray, centroids: np.ndarray, target: np.ndarray, *,
                     normalize: bool, center: np.ndarray | None = None,
                     block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """One pass over ``source[rows]`` in row blocks: ((n,) int64 nearest centroid, (n,) float32
    Euclidean distance to the nearest ``target`` row), n = len(rows); each block is cast,
    shifted by ``-center`` (when given) and (with ``normalize``) normalised on its own.
    O(n·(K + M)·D) time, O(block·D) extra memory."""
    import torch

    from filterx.kernels import nearest_centroid

    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    t = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))
    cluster = np.empty(len(rows), dtype=np.int64)
    near = np.empty(len(rows), dtype=np.float32)
    for start, xb in row_blocks(source, block, rows=rows, normalize=normalize, center=center,
                               desc="pool-clusters: assign"):
        xb = torch.from_numpy(xb)
        _, _, idx = nearest_centroid(xb, c)  # blocked GEMM + running argmin: no N x K matrix
        d2, _, _ = nearest_centroid(xb, t)
        cluster[start : start + len(xb)] = idx.numpy()
        near[start : start + len(xb)] = d2.clamp_min(0).sqrt().numpy()
    return cluster, near


@register_scorer("pool-clusters", needs=("source_emb", "target_emb"), options={
    "k": Option("k-means clusters over the pool (default: one per 50 images, at most 1,000)", min=1),
    "center": CENTER_OPTION})
def pool_cluster_scores(inputs: ScoreInputs, *, seed: int, k: int | None = None, niter: int = 20,
                        normalize: bool = True, kmeans: str = "auto", center: str = "none") -> ScoreResult:
    """Pool k-means clusters nearest to some target embedding first (DataComp's image-based filter)."""
    if kmeans not in KMEANS:
        raise ValueError(f"unknown kmeans {kmeans!r}; valid: {', '.join(KMEANS)}")
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")
    check_center(center, normalize)
    source, target = inputs.source_emb, _check_target(inputs.target_emb, "pool-clusters")
    mean = pool_center(source, center)
    target = prepare_rows(target, mean, normalize)  # the pool is shifted and normalised block by block below
    ok = _finite_rows(source)
    pool_ids = np.flatnonzero(ok)
    if len(pool_ids) == 0:
        raise ValueError("method 'pool-clusters' needs at least one finite pool embedding, got none")
    k_used = min(default_pool_clusters(len(pool_ids)) if k is None else k, len(pool_ids))
    if k is not None and k_used < k:
        log.warning("k=%d is more than the %d pool images; using k=%d", k, len(pool_ids), k_used)
    train_rows = min(len(pool_ids), TRAIN_POINTS_PER_CENTROID * k_used, max(TRAIN_MAX_ROWS, k_used))
    train = sample_rows(source, train_rows, np.random.default_rng(seed), rows=pool_ids)
    if mean is not None:  # in place: the training copy is the largest buffer here
        train -= mean
    if normalize:
        train /= np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    centroids, objective, kmeans = fit_centroids(train, k_used,
                                                 niter=niter, seed=seed, kmeans=kmeans, device=inputs.device)
    del train
    cluster, near = pool_assignments(source, pool_ids, centroids, target, normalize=normalize, center=mean)
    chosen, _ = nearest_cluster(target, centroids)
    votes = np.bincount(chosen, minlength=k_used)
    scores = np.full(len(source), np.nan, dtype=np.float32)
    scores[pool_ids] = votes[cluster] + 0.5 / (1.0 + near.astype(np.float64))
    kept = votes[cluster] > 0
    return ScoreResult(scores, attrs={
        "k_used": k_used, "kmeans": kmeans, "kmeans_objective": objective, "center": center,
        "clusters_kept": int((votes > 0).sum()), "kept_samples": int(kept.sum()),
        "kept_share": float(kept.mean()), "keep_threshold": 1.0, "unscored": int((~ok).sum()), "train_rows": int(train_rows),
    })
