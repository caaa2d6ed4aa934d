"""--center pool for the embedding-space scorers (knn-target, clustering, pool-clusters,
grad-align): the pool's mean embedding subtracted before the L2 normalisation (CL2N).

Each centred scorer equals the plain one run on embeddings shifted by the pool's mean (computed
by streaming the pool, float16 as stored); the input is never modified; a centre without the
normalisation, or an unknown one, is refused; and where images differ in how much of the shared
direction they carry, the centred distances find the target and the plain ones cannot."""

from __future__ import annotations

import numpy as np
import pytest

from filterx.math.blocks import l2_normalize, pool_center, row_blocks
from filterx.scorers import ScoreInputs, run_scorer

pytestmark = pytest.mark.usefixtures("one_thread")


def _relu_pool(seed=0, n=900, m=120, d=24):
    """Non-negative embeddings with a large shared part, as a ReLU network's pooled features:
    (pool float16, target float32, relevant mask, target labels). Class blobs ride on a common
    offset; the target is near class 0."""
    rng = np.random.default_rng(seed)
    offset = np.abs(rng.normal(3.0, 0.5, d))
    means = np.abs(rng.normal(0, 1.5, (3, d)))
    which = rng.integers(0, 3, n)
    pool = np.maximum(offset + means[which] + rng.normal(0, 0.6, (n, d)), 0)
    labels = rng.integers(0, 2, m)
    target = np.maximum(offset + means[0] + 0.2 * labels[:, None] + rng.normal(0, 0.6, (m, d)), 0)
    return pool.astype(np.float16), target.astype(np.float32), which == 0, labels


def test_row_blocks_shift_before_normalising_and_leave_the_input_alone():
    x = np.random.default_rng(0).normal(2.0, 1.0, (301, 8)).astype(np.float32)
    before = x.copy()
    c = x.mean(0)
    got = np.concatenate([b for _, b in row_blocks(x, 64, normalize=True, center=c)])
    np.testing.assert_allclose(got, l2_normalize(x - c), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(x, before)  # float32 contiguous blocks are views of x: not written
    shifted = np.concatenate([b for _, b in row_blocks(x, 64, center=c)])
    np.testing.assert_allclose(shifted, x - c, rtol=1e-6, atol=1e-6)


def test_pool_center_is_the_mean_of_the_finite_rows_streamed():
    x = np.random.default_rng(1).normal(1.0, 2.0, (1000, 6)).astype(np.float16)
    x[[5, 700]] = np.nan  # images embed could not decode
    ok = np.isfinite(x).all(1)
    got = pool_center(x, "pool", block=37)
    assert got.dtype == np.float32 and got.shape == (6,)
    np.testing.assert_allclose(got, x[ok].astype(np.float64).mean(0), rtol=1e-6)
    assert pool_center(x, "none") is None
    with pytest.raises(ValueError, match="unknown center 'target'; valid: none, pool"):
        pool_center(x, "target")
    with pytest.raises(ValueError, match="at least one finite pool embedding"):
        pool_center(np.full((3, 6), np.nan, np.float32), "pool")


@pytest.mark.parametrize("method, params", [
    ("knn-target", {"k": 5}),
    ("clustering", {"k": 6, "distance": "min"}),
    ("clustering", {"k": 6, "distance": "avg"}),
    ("pool-clusters", {"k": 12}),
])
def test_a_centred_scorer_is_the_plain_one_on_shifted_embeddings(method, params):
    pool, target, _, _ = _relu_pool()
    mean = pool.astype(np.float64).mean(0).astype(np.float32)
    centred = run_scorer(method, ScoreInputs(num_source=len(pool), source_emb=pool, target_emb=target),
                         center="pool", **params)
    plain = run_scorer(method, ScoreInputs(num_source=len(pool), source_emb=pool.astype(np.float32) - mean,
                                           target_emb=target - mean), center="none", **params)
    np.testing.assert_allclose(centred.scores, plain.scores, rtol=1e-4, atol=1e-5)
    assert centred.attrs["center"] == "pool" and plain.attrs["center"] == "none"


def test_centred_grad_align_is_the_same_head_written_on_shifted_embeddings():
    """Centring re-expresses the head (weight W, bias b + W mean: the same logits, so the same
    residuals and pseudo-labels) and takes its gradient on x - mean."""
    pool, target, _, labels = _relu_pool(seed=2)
    rng = np.random.default_rng(3)
    W, b = rng.normal(0, 0.3, (2, 24)).astype(np.float32), rng.normal(0, 0.1, 2).astype(np.float32)
    mean = pool.astype(np.float64).mean(0).astype(np.float32)

    def inputs(shift, bias):
        return ScoreInputs(num_source=len(pool), source_emb=pool.astype(np.float32) - shift,
                           target_emb=target[:80] - shift, target_labels=labels[:80],
                           target_val_emb=target[80:] - shift, target_val_labels=labels[80:],
                           head_weight=W, head_bias=bias)

    centred = run_scorer("grad-align", inputs(0.0, b), center="pool")
    plain = run_scorer("grad-align", inputs(mean, b + W @ mean), center="none")
    np.testing.assert_allclose(centred.scores, plain.scores, rtol=1e-4, atol=1e-5)
    assert centred.attrs["center"] == "pool"
    assert not np.allclose(centred.scores, run_scorer("grad-align", inputs(0.0, b)).scores, atol=1e-3)


def test_a_centre_without_normalisation_or_an_unknown_one_is_refused():
    pool, target, _, _ = _relu_pool()
    inputs = ScoreInputs(num_source=len(pool), source_emb=pool, target_emb=target)
    for method in ("knn-target", "clustering", "pool-clusters"):
        with pytest.raises(ValueError, match="needs normalize=True: Euclidean distances do not change"):
            run_scorer(method, inputs, center="pool", normalize=False)
        with pytest.raises(ValueError, match="valid: none, pool"):
            run_scorer(method, inputs, center="mean")


def test_centring_finds_the_target_where_images_differ_in_how_much_of_the_shared_part_they_carry():
    """Every pool image is a multiple of one non-negative pattern (plus small noise in its
    direction): the relevant tenth carries more of it, as a ReLU feature fires harder on what
    the target shows. Normalised as they are, relevant and irrelevant rows point the same way
    (knn-target near chance); minus the pool's mean, the relevant ones point along +pattern,
    like the target, and the rest along -pattern."""
    rng = np.random.default_rng(4)
    d, n = 16, 2000
    pattern = np.abs(rng.normal(1.0, 0.3, d))
    relevant = np.arange(n) < n // 10
    strength = np.where(relevant, rng.uniform(2.0, 3.0, n), rng.uniform(0.5, 1.5, n))
    pool = strength[:, None] * (pattern + rng.normal(0, 0.05, (n, d)))
    target = rng.uniform(2.0, 3.0, 100)[:, None] * (pattern + rng.normal(0, 0.05, (100, d)))
    inputs = ScoreInputs(num_source=n, source_emb=pool.astype(np.float16), target_emb=target.astype(np.float32))
    budget = n // 10

    def precision(scores):
        return relevant[np.argsort(-scores, kind="stable")[:budget]].mean()

    assert precision(run_scorer("knn-target", inputs, k=10).scores) < 0.3
    assert precision(run_scorer("knn-target", inputs, k=10, center="pool").scores) > 0.95
    assert precision(run_scorer("clustering", inputs, k=8, distance="avg", center="pool").scores) > 0.95


def test_score_center_pool_from_the_command_line(sample_dirs, encoder_file, tmp_path):
    """`filterx score --method knn-target --center pool`: the stored scores are the scorer's on
    the stored embeddings (float16) with the pool's mean out, and the attrs say so; a bad value
    is one line, exit 2, and leaves the stored scores as they were."""
    import shutil

    from filterx.io.dataset import Dataset
    from filterx.models.encoder import encoder_target_split, load_encoder, read_encoder_file
    from filterx.stages.embed import read_embeddings
    from filterx.stages.score import read_scores
    from tests.clirun import one_line, run

    src, tgt = tmp_path / "source", tmp_path / "target"
    shutil.copytree(sample_dirs[0], src)
    shutil.copytree(sample_dirs[1], tgt)
    common = ["--method", "knn-target", "--source", src, "--target", tgt, "--encoder", encoder_file,
              "--device", "cpu", "--backend", "pil", "--workers", 0, "--quiet"]
    code, _, err = run("score", *common, "--k", 3, "--center", "pool")
    assert code == 0, err
    ds, tds = Dataset.open(src), Dataset.open(tgt)
    scores, attrs = read_scores(ds, "knn-target")
    assert attrs["params"]["center"] == "pool" and attrs["result"]["center"] == "pool"
    tag = load_encoder(encoder_file).tag
    train_ids, _ = encoder_target_split(tds, read_encoder_file(encoder_file))
    stored = read_embeddings(ds, tag).astype(np.float16)
    ref = run_scorer("knn-target", ScoreInputs(num_source=len(stored), source_emb=stored,
                                               target_emb=read_embeddings(tds, tag)[train_ids]), k=3, center="pool")
    np.testing.assert_allclose(scores, ref.scores, rtol=1e-4, atol=1e-5)
    code, _, err = run("score", *common, "--center", "median")
    assert code == 2 and "'median' is not one of 'none', 'pool'" in one_line(err)
    np.testing.assert_array_equal(read_scores(ds, "knn-target")[0], scores)
