"""Row blocks (filterx.math.blocks) and the scorers that stream the pool through them: blocked
results equal the unblocked computation, float16 input (the pool as stored) gives what its
float32 copy gives, and no scorer makes a full-size copy of the pool (traced peak memory)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from filterx.math.blocks import compact_rows, finite_rows, l2_normalize, row_blocks, sample_rows
from filterx.scorers import ScoreInputs, run_scorer


def _pool(n=3000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10, d)) * 3
    labels = rng.integers(0, 10, n)
    return (centres[labels] + rng.standard_normal((n, d))).astype(np.float16), labels


def test_row_blocks_cover_every_row_in_order_cast_and_normalised():
    x, _ = _pool(1001, 8)
    got = np.concatenate([b for _, b in row_blocks(x, 64, normalize=True)])
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, l2_normalize(x.astype(np.float32)))
    rows = np.array([3, 7, 500, 1000])
    starts, blocks = zip(*row_blocks(x, 3, rows=rows))
    assert starts == (0, 3)
    np.testing.assert_array_equal(np.concatenate(blocks), x[rows].astype(np.float32))
    with pytest.raises(ValueError, match="block must be >= 1"):
        next(row_blocks(x, 0))


def test_a_named_pass_of_several_blocks_reports_its_rows(monkeypatch):
    import filterx.core.progress as prog

    bars = []

    class Bar:
        def __init__(self, total, disable, **kw):
            self.total, self.disabled, self.n, self.closed = total, disable, 0, False
            bars.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    monkeypatch.setattr(prog, "tqdm", Bar)
    monkeypatch.setattr(prog, "QUIET", False)  # an earlier CLI test may have run with -q
    x = np.ones((10, 3), np.float16)
    assert sum(len(b) for _, b in row_blocks(x, 4, desc="pass")) == 10
    assert (bars[0].total, bars[0].n, bars[0].closed, bars[0].disabled) == (10, 10, True, None)
    list(row_blocks(x, 16, desc="pass"))  # one block: nothing to watch
    list(row_blocks(x, 4))  # unnamed: a scorer's inner pass
    assert bars[1].disabled is True and bars[2].disabled is True


def test_finite_rows_and_in_place_compaction_equal_the_masked_copy():
    x, _ = _pool(997, 4)
    x[[0, 5, 6, 400, 996]] = np.nan
    x[10, 2] = np.inf
    keep = finite_rows(x, block=13)
    np.testing.assert_array_equal(keep, np.isfinite(x).all(axis=1))
    want = x[keep].copy()
    got = compact_rows(x, keep, block=7)
    np.testing.assert_array_equal(got, want)
    assert np.shares_memory(got, x)  # in place: no second pool-sized buffer


def test_sample_rows_draws_from_the_given_rows_only():
    x = np.arange(100, dtype=np.float32)[:, None].repeat(2, 1)
    rows = np.arange(0, 100, 2)
    s = sample_rows(x, 10, np.random.default_rng(0), rows=rows)
    assert s.shape == (10, 2) and np.all(s[:, 0] % 2 == 0) and np.all(np.diff(s[:, 0]) > 0)
    np.testing.assert_array_equal(sample_rows(x, 1000, np.random.default_rng(0), rows=rows), x[rows])


def test_blocked_centroid_distances_equal_one_unblocked_pass():
    from filterx.scorers.clustering import centroid_distances

    x, _ = _pool(500, 16)
    c = l2_normalize(np.random.default_rng(1).standard_normal((7, 16)))
    unit = l2_normalize(x.astype(np.float32))
    for distance in ("min", "avg"):
        blocked = centroid_distances(x, c, distance=distance, block=37, normalize=True)
        whole = centroid_distances(unit, c, distance=distance, block=len(x))
        np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-6)
    d2 = ((unit[:, None, :] - c[None]) ** 2).sum(-1)  # brute force
    np.testing.assert_allclose(centroid_distances(x, c, distance="min", block=37, normalize=True),
                               np.sqrt(d2.min(1)), rtol=1e-4, atol=1e-5)


def test_pool_assignments_do_not_depend_on_the_block_size():
    from filterx.scorers.pool import pool_assignments

    x, _ = _pool(400, 16)
    rows = np.arange(0, 400, 3)
    c = l2_normalize(x[:9].astype(np.float32))
    t = l2_normalize(x[-20:].astype(np.float32))
    a = pool_assignments(x, rows, c, t, normalize=True, block=11)
    b = pool_assignments(x, rows, c, t, normalize=True, block=10_000)
    np.testing.assert_array_equal(a[0], b[0])
    # distances come from |x|^2 + |c|^2 - 2 x.c in float32, and on some CPUs (AMD EPYC) the
    # product's summation order depends on the block's shape: the same to about 1e-6 relative, except
    # near 0 (a row that is a centroid), where the cancellation leaves up to sqrt(eps) ~ 5e-4
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-3)
    unit = l2_normalize(x[rows].astype(np.float32))
    np.testing.assert_array_equal(a[0], ((unit[:, None] - c[None]) ** 2).sum(-1).argmin(1))


def _inputs(source, labels, target, *, classes=10):
    from filterx.io.dataset import ClassInfo

    rng = np.random.default_rng(2)
    d = source.shape[1]
    return ScoreInputs(
        num_source=len(source), source_emb=source, target_emb=target,
        target_labels=np.arange(len(target)) % 3, target_val_emb=target[:30],
        target_val_labels=np.arange(30) % 3, source_labels=labels,
        source_classes=tuple(ClassInfo(i, f"c{i}") for i in range(classes)),
        head_weight=rng.standard_normal((3, d)).astype(np.float32), head_bias=np.zeros(3, np.float32))


CASES = [
    ("clustering", {"k": 8, "distance": "min"}),
    ("clustering", {"k": 8, "distance": "avg"}),
    ("entropy", {}),
    ("entropy/outlier-exposure", {"max_outliers": 2000, "order": "low"}),
    ("domain-cls", {"steps": 20, "folds": 3}),
    ("knn-target", {"k": 5}),
    ("pool-clusters", {"k": 20, "niter": 5}),
    ("hard-classes", {"count": 2, "epochs": 1}),
    ("influence", {}),
]


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_float16_pool_scores_as_its_float32_copy(method, params):
    source, labels = _pool(2000, 32)
    target = source[:120].astype(np.float32) + 0.5
    half = run_scorer(method, _inputs(source, labels, target), seed=0, **params).scores
    full = run_scorer(method, _inputs(source.astype(np.float32), labels, target), seed=0, **params).scores
    np.testing.assert_allclose(half, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,params", [c for c in CASES if c[0] not in ("hard-classes",)],
                         ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES) if m != "hard-classes"])
def test_scorers_make_no_full_size_copy_of_the_pool(method, params):
    """Peak traced memory during a scorer stays well under one float32 copy of the pool (a
    reintroduced x.astype(float32), normalised copy or boolean-mask copy would exceed it)."""
    n, d = 300_000, 128  # several blocks of 65536 rows
    source, labels = _pool(n, d)
    target = source[:200].astype(np.float32)
    inputs = _inputs(source, labels, target)
    # imports done before tracing, the ones a scorer makes as it runs (the probe's, FAISS's) included:
    # a first import inside the traced call would count the module's objects as the scorer's
    small, small_labels = _pool(2000, d)
    run_scorer(method, _inputs(small, small_labels, small[:200].astype(np.float32)), seed=0, **params)
    tracemalloc.start()
    try:
        run_scorer(method, inputs, seed=0, **params)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    float32_copy = n * d * 4
    assert peak < 0.8 * float32_copy, f"{method}: traced peak {peak / 2**20:.1f} MiB"
