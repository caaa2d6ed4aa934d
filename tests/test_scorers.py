"""The spine scorers on synthetic arrays, checked against brute force."""

import numpy as np
import pytest

from filterx.scorers import ScoreInputs, get_scorer, list_scorers, run_scorer


def blobs(seed=0, n_source=600, n_target=120, d=16):
    """Source: 3 Gaussian blobs; target: drawn near blob 0 only. Returns (S, T, source blob ids)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (3, d))
    which = rng.integers(0, 3, n_source)
    S = centers[which] + rng.normal(0, 1, (n_source, d))
    T = centers[0] + 0.3 + rng.normal(0, 1, (n_target, d))
    return S.astype(np.float32), T.astype(np.float32), which


def auc(scores, positive):
    """Probability that a random positive outscores a random negative."""
    from scipy.stats import rankdata

    r = rankdata(scores)
    n1, n0 = positive.sum(), (~positive).sum()
    return (r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


def test_registry_lists_and_rejects():
    names = list_scorers()
    # the seven methods of the design, each its own registered scorer
    assert {"random", "clustering", "domain-cls", "entropy", "influence", "class-mask", "hard-classes"} <= set(names)
    with pytest.raises(ValueError, match="valid methods: .*clustering"):
        get_scorer("clusterin")
    with pytest.raises(ValueError, match="takes no parameter"):
        run_scorer("clustering", ScoreInputs(num_source=1), kk=3)
    with pytest.raises(ValueError, match="needs inputs"):
        run_scorer("clustering", ScoreInputs(num_source=1))


def test_random_is_seeded():
    a = run_scorer("random", ScoreInputs(num_source=1000), seed=1).scores
    b = run_scorer("random", ScoreInputs(num_source=1000), seed=1).scores
    c = run_scorer("random", ScoreInputs(num_source=1000), seed=2).scores
    assert a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert 0.45 < a.mean() < 0.55


@pytest.mark.parametrize("distance", ["min", "avg"])
def test_clustering_matches_brute_force(distance):
    import faiss

    S, T, which = blobs()
    res = run_scorer("clustering", ScoreInputs(num_source=len(S), source_emb=S, target_emb=T), seed=0,
                     k=8, distance=distance, normalize=False)
    km = faiss.Kmeans(S.shape[1], 8, niter=25, seed=0, max_points_per_centroid=100_000)
    km.train(T)
    d = np.sqrt(((S[:, None, :] - km.centroids[None]) ** 2).sum(-1))
    ref = -(d.min(1) if distance == "min" else d.mean(1))
    np.testing.assert_allclose(res.scores, ref, rtol=1e-4, atol=1e-4)
    assert auc(res.scores, which == 0) > 0.95
    assert res.attrs["k_used"] == 8


def test_clustering_caps_k_at_the_target_size():
    S, T, _ = blobs(n_target=5)
    res = run_scorer("clustering", ScoreInputs(num_source=len(S), source_emb=S, target_emb=T), k=200)
    assert res.attrs["k_used"] == 5 and np.isfinite(res.scores).all()


@pytest.mark.parametrize("params", [{"model": "linear", "steps": 200}, {"model": "mlp", "hidden": 64, "steps": 150, "folds": 2}])
def test_domain_classifier_finds_target_like_source(params):
    S, T, which = blobs(seed=1)
    res = run_scorer("domain-cls", ScoreInputs(num_source=len(S), source_emb=S, target_emb=T), seed=0, **params)
    assert auc(res.scores, which == 0) > 0.9
    assert res.attrs["mean_target_logit"] > res.attrs["mean_source_logit"]


def test_domain_classifier_standardises_on_a_random_sample_of_rows():
    from filterx.scorers.domain import standardisation

    # a pool stored class by class: its first rows are all of one blob
    S, T, which = blobs(seed=2, n_source=3000)
    S = S[np.argsort(which, kind="stable")]
    mean, std = standardisation(S, T, seed=0, max_rows=300)
    # the union weighs 300 pool rows and the 120 target rows: its mean is this, in expectation
    expected = (300 * S.mean(0) + 120 * T.mean(0)) / 420
    first = np.concatenate([S[:300], T]).mean(0)  # what the pool's first 300 rows would give
    assert np.abs(mean - expected).max() < 1.0 < 2.0 < np.abs(first - expected).max()
    again, _ = standardisation(S, T, seed=0, max_rows=300)
    other, _ = standardisation(S, T, seed=1, max_rows=300)
    assert np.array_equal(mean, again) and not np.array_equal(mean, other)  # seeded
    small_mean, small_std = standardisation(S[:200], T, seed=5, max_rows=300)  # fewer rows: all of them
    np.testing.assert_allclose(small_mean, np.concatenate([S[:200], T]).mean(0), rtol=1e-5, atol=1e-5)
    assert mean.dtype == std.dtype == np.float32 and (std > 0).all()


@pytest.mark.parametrize("order", ["high", "low"])
def test_entropy_matches_softmax_entropy(order):
    rng = np.random.default_rng(0)
    S = rng.normal(size=(300, 12)).astype(np.float32)
    W = rng.normal(size=(5, 12)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    z = S.astype(np.float64) @ W.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ref = -(p * np.log(p)).sum(1)
    res = run_scorer("entropy", ScoreInputs(num_source=300, source_emb=S, head_weight=W, head_bias=b), order=order)
    np.testing.assert_allclose(res.scores, ref if order == "high" else -ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="valid: high, low"):
        run_scorer("entropy", ScoreInputs(num_source=300, source_emb=S, head_weight=W, head_bias=b), order="mid")


# ---------------------------------------------------------------- the contract, for every registered scorer

# parameters a scorer cannot run without (every other parameter keeps its default)
REQUIRED = {"class-mask": {"classes": "c0_0"}, "hard-classes": {"count": 1}}


def _contract_inputs(seed=0):
    """Every input a scorer may need, read-only: pool of 3 blobs x 2 classes; target near blob 0."""
    from filterx.scorers import ClassInfo

    S, T, which = blobs(seed, n_source=240, n_target=60, d=8)
    rng = np.random.default_rng(seed)
    source_labels = (2 * which + rng.integers(0, 2, len(S))).astype(np.int64)
    arrays = dict(source_emb=S, target_emb=T[:40], target_labels=rng.integers(0, 3, 40).astype(np.int64),
                  target_val_emb=T[40:], target_val_labels=rng.integers(0, 3, 20).astype(np.int64),
                  source_labels=source_labels, head_weight=rng.normal(size=(3, 8)).astype(np.float32),
                  head_bias=np.zeros(3, np.float32))
    for a in arrays.values():
        a.flags.writeable = False  # a scorer must not change what it is given
    classes = tuple(ClassInfo(i, f"c{i // 2}_{i % 2}") for i in range(6))
    return ScoreInputs(num_source=len(S), source_classes=classes, **arrays)


@pytest.mark.parametrize("name", list_scorers())
def test_every_scorer_keeps_the_contract(name, tmp_path, monkeypatch):
    from filterx.scorers import check_params

    monkeypatch.chdir(tmp_path)
    scorer = get_scorer(name)
    # declared defaults fit their own annotations, so -p values are checked against real types
    assert check_params(name, {k: v for k, v in scorer.defaults.items() if v is not None}) is not None
    inputs = _contract_inputs()
    params = REQUIRED.get(name, {})
    a = run_scorer(name, inputs, seed=0, **params)
    b = run_scorer(name, inputs, seed=0, **params)
    assert a.scores.dtype == np.float32 and a.scores.shape == (inputs.num_source,)
    assert not np.isnan(a.scores).any()  # every input is valid here, so every sample is scored
    np.testing.assert_array_equal(a.scores, b.scores)  # deterministic for a seed
    assert a.scores.std() > 0  # it ranks: a constant score would select by id alone
    import json

    json.dumps(dict(a.attrs))  # attrs are stored as zarr attrs: JSON only
    assert list(tmp_path.iterdir()) == []  # no file I/O: the stage writes, not the scorer


# ---------------------------------------------------------------- pool-level: knn-target, pool-clusters


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _distances(a, b):
    """(len(a), len(b)) Euclidean distances, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sqrt(np.maximum(((a[:, None, :] - b[None]) ** 2).sum(-1), 0))


@pytest.mark.parametrize("k, normalize", [(1, True), (10, True), (7, False)])
def test_knn_target_matches_brute_force(k, normalize):
    S, T, which = blobs(seed=3)
    res = run_scorer("knn-target", ScoreInputs(num_source=len(S), source_emb=S, target_emb=T), k=k,
                     normalize=normalize)
    d = _distances(*((_unit(S), _unit(T)) if normalize else (S, T)))
    ref = -np.sort(d, axis=1)[:, :k].mean(1)
    np.testing.assert_allclose(res.scores, ref, rtol=1e-4, atol=2e-4)
    assert res.scores.dtype == np.float32 and res.attrs["k_used"] == k
    assert auc(res.scores, which == 0) > 0.95


def test_knn_search_streams_blocks_exactly():
    from filterx.scorers.pool import knn_search

    rng = np.random.default_rng(0)
    xq, xb = rng.normal(size=(1000, 12)).astype(np.float32), rng.normal(size=(90, 12)).astype(np.float32)
    d2, idx = knn_search(xq, xb, 5, block=37)  # blocks that do not divide the rows
    whole, whole_idx = knn_search(xq, xb, 5, block=10**6)
    ref = _distances(xq, xb) ** 2
    np.testing.assert_array_equal(idx, np.argsort(ref, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(d2, np.sort(ref, axis=1)[:, :5], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(d2, whole)
    np.testing.assert_array_equal(idx, whole_idx)
    with pytest.raises(ValueError, match=r"k must be in \[1, 90\]"):
        knn_search(xq, xb, 91)


def test_mean_knn_distance_streams_the_pool_in_blocks():
    from filterx.scorers.pool import mean_knn_distance

    S, T, _ = blobs(seed=6, n_source=500)
    S[[0, 40, 41, 499]] = np.nan  # unembedded rows at block edges and inside a block
    ok = np.isfinite(S).all(1)
    small = mean_knn_distance(S, T, 6, block=41)
    # the same up to float32 rounding: on some CPUs (AMD EPYC) the distance product's summation
    # order depends on the block's shape
    whole = mean_knn_distance(S, T, 6, block=10**6)
    assert np.array_equal(np.isnan(small), np.isnan(whole))
    np.testing.assert_allclose(small, whole, rtol=1e-6, atol=1e-7)
    ref = np.sort(_distances(_unit(S[ok]), _unit(T)), axis=1)[:, :6].mean(1)
    np.testing.assert_allclose(small[ok], ref, rtol=1e-4, atol=2e-4)
    assert np.isnan(small[~ok]).all() and small.dtype == np.float32


def test_knn_target_caps_k_and_leaves_unembedded_rows_unscored():
    S, T, _ = blobs(n_target=4)
    S[5] = np.nan
    res = run_scorer("knn-target", ScoreInputs(num_source=len(S), source_emb=S, target_emb=T))
    assert res.attrs["k_used"] == 4 and res.attrs["unscored"] == 1
    assert np.isnan(res.scores[5]) and np.isfinite(np.delete(res.scores, 5)).all()


def _pool_clusters_brute_force(S, T, k, niter=20, seed=0):
    """DataComp's rule, re-done: faiss k-means over the pool, then numpy nearest centroids."""
    import faiss

    S, T = _unit(S).astype(np.float32), _unit(T).astype(np.float32)
    km = faiss.Kmeans(S.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=100_000)
    km.train(S)
    cluster = _distances(S, km.centroids).argmin(1)
    chosen = _distances(T, km.centroids).argmin(1)
    votes = np.bincount(chosen, minlength=k)
    near = _distances(S, T).min(1)
    return cluster, votes, near


def test_pool_clusters_keeps_the_clusters_nearest_to_the_target():
    from filterx.stages.select import select_ids

    S, T, which = blobs(seed=4, n_source=1200, n_target=60)
    res = run_scorer("pool-clusters", ScoreInputs(num_source=len(S), source_emb=S, target_emb=T), seed=0, k=24)
    cluster, votes, near = _pool_clusters_brute_force(S, T, 24)
    kept = votes[cluster] > 0
    assert res.attrs["k_used"] == 24 and res.attrs["clusters_kept"] == int((votes > 0).sum())
    assert res.attrs["kept_samples"] == int(kept.sum()) and res.attrs["kept_share"] == pytest.approx(kept.mean())
    assert 0 < kept.sum() < (which == 0).sum() + 1 and (which[kept] == 0).all()  # only target-like blob
    # --threshold 1 keeps exactly the samples of the chosen clusters (DataComp)
    assert set(select_ids(res.scores, threshold=1.0).tolist()) == set(np.flatnonzero(kept).tolist())
    assert (res.scores[~kept] <= 0.5).all() and (res.scores[~kept] > 0).all()
    # the score: votes of the sample's cluster, then nearer to the target first
    np.testing.assert_allclose(res.scores, votes[cluster] + 0.5 / (1 + near), rtol=1e-5, atol=1e-5)
    ranked = select_ids(res.scores, count=len(S))
    assert (np.diff(votes[cluster][ranked]) <= 0).all()  # clusters with more votes first
    assert auc(res.scores, which == 0) > 0.95


def test_pool_clusters_default_k_and_unembedded_rows():
    from filterx.scorers.pool import default_pool_clusters

    assert [default_pool_clusters(n) for n in (10, 600, 1_280_000, 10**9)] == [1, 12, 1000, 1000]
    S, T, _ = blobs(seed=5)
    S[[3, 7]] = np.nan
    res = run_scorer("pool-clusters", ScoreInputs(num_source=len(S), source_emb=S, target_emb=T))
    assert res.attrs["k_used"] == default_pool_clusters(len(S) - 2) and res.attrs["unscored"] == 2
    assert np.isnan(res.scores[[3, 7]]).all() and np.isfinite(np.delete(res.scores, [3, 7])).all()
    with pytest.raises(ValueError, match="kmeans 'fast'"):
        run_scorer("pool-clusters", ScoreInputs(num_source=len(S), source_emb=S, target_emb=T), kmeans="fast")
