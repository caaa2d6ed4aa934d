import numpy as np
import pytest

from filterx.math.kmeans import torch_kmeans
from filterx.scorers import ScoreInputs, run_scorer


def blobs(n=3000, k=8, d=24, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 6, (k, d))
    which = rng.integers(0, k, n)
    return (centers[which] + rng.normal(0, 1, (n, d))).astype(np.float32), which, centers


def test_recovers_separated_blobs_and_matches_faiss_objective():
    import faiss

    x, which, centers = blobs()
    km = torch_kmeans(x, 8, niter=25, seed=0)
    # every true centre has a centroid within the noise level
    dist = np.sqrt(((centers[:, None] - km.centroids[None]) ** 2).sum(-1)).min(1)
    assert (dist < 0.5).all()
    f = faiss.Kmeans(x.shape[1], 8, niter=25, seed=0)
    f.train(x)
    d2 = ((x[:, None] - f.centroids[None]) ** 2).sum(-1).min(1).mean()
    assert km.objective <= d2 * 1.02  # no worse than FAISS on the same data (k-means++ seeding)


def test_objective_is_the_mean_squared_distance_and_seeded():
    x, _, _ = blobs(n=800, k=5, seed=1)
    a = torch_kmeans(x, 5, seed=3)
    b = torch_kmeans(x, 5, seed=3)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    ref = ((x[:, None] - a.centroids[None]) ** 2).sum(-1).min(1).mean()
    np.testing.assert_allclose(a.objective, ref, rtol=1e-3)  # objective of the last assignment


def test_k_equals_n_and_duplicates_give_k_centroids():
    x = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)  # 12 points, 4 distinct
    km = torch_kmeans(x, 6, seed=0)
    assert km.centroids.shape == (6, 4) and np.isfinite(km.centroids).all()
    assert torch_kmeans(x, 12, seed=0).centroids.shape == (12, 4)
    with pytest.raises(ValueError, match=r"k must be in \[1, 12\]"):
        torch_kmeans(x, 13)


def test_clustering_scorer_with_torch_kmeans_agrees_with_faiss():
    from scipy.stats import spearmanr

    x, which, _ = blobs(n=2000, k=4, seed=2)
    target = x[which == 0][:300]
    inputs = ScoreInputs(num_source=len(x), source_emb=x, target_emb=target)
    a = run_scorer("clustering", inputs, k=4, distance="avg", kmeans="torch", normalize=False)
    b = run_scorer("clustering", inputs, k=4, distance="avg", kmeans="faiss", normalize=False)
    assert a.attrs["kmeans"] == "torch" and b.attrs["kmeans"] == "faiss"
    assert spearmanr(a.scores, b.scores).statistic > 0.95
