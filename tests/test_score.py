"""score: orchestration over real datasets, embeddings and the scores store."""

import numpy as np
import pytest

from filterx.io.dataset import Dataset
from filterx.stages.embed import embeddings_complete
from filterx.models.encoder import load_encoder
from filterx.stages.score import ScoreConfig, read_scores, score

KW = dict(device="cpu", backend="pil", batch_size=16, workers=0, quiet=True)


@pytest.fixture(scope="module")
def dirs(sample_dirs, encoder_file, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("score")
    shutil.copytree(sample_dirs[0], root / "source")
    shutil.copytree(sample_dirs[1], root / "target")
    return root / "source", root / "target", encoder_file


def test_score_embeds_what_is_missing_and_stores_attrs(dirs):
    src, tgt, enc = dirs
    tag = load_encoder(enc).tag
    s = score(ScoreConfig("clustering", src, tgt, enc, {"k": 4}, seed=3, **KW))
    ds = Dataset.open(src)
    assert embeddings_complete(ds, tag) and embeddings_complete(Dataset.open(tgt), tag)
    scores, attrs = read_scores(ds, "clustering")
    assert scores.shape == (ds.num_samples,) and np.isfinite(scores).all() and (scores <= 0).all()
    assert attrs["method"] == "clustering" and attrs["seed"] == 3
    assert attrs["params"] == {"k": 4, "distance": "min", "niter": 25, "normalize": True, "kmeans": "auto",
                               "center": "none"}
    assert attrs["result"]["kmeans"] == "faiss"  # on the CPU
    assert attrs["encoder"]["tag"] == tag and attrs["result"]["k_used"] == 4
    assert s.scored == ds.num_samples
    again = score(ScoreConfig("clustering", src, tgt, enc, {"k": 4}, seed=3, **KW))
    np.testing.assert_array_equal(read_scores(ds, "clustering")[0], scores)
    assert again.scored == s.scored


def test_entropy_uses_the_encoder_head_and_named_store(dirs):
    src, tgt, enc = dirs
    score(ScoreConfig("entropy", src, tgt, enc, {"head": "given", "order": "low"}, name="entropy-low", **KW))
    ds = Dataset.open(src)
    scores, attrs = read_scores(ds, "entropy-low")
    # the same entropy from the stored embeddings and the encoder file's own head, in float64
    from filterx.stages.embed import read_embeddings
    from filterx.models.encoder import read_encoder_file

    state = read_encoder_file(enc)["state_dict"]
    z = read_embeddings(ds, load_encoder(enc).tag).astype(np.float64) @ state["fc.weight"].double().numpy().T
    z += state["fc.bias"].double().numpy()
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    np.testing.assert_allclose(scores, (np.exp(logp) * logp).sum(1), rtol=1e-4, atol=1e-5)  # low: minus entropy
    assert attrs["params"] == {"order": "low"}


def test_class_mask_needs_no_encoder(dirs):
    src, _, _ = dirs
    score(ScoreConfig("class-mask", src, params={"classes": "digit_3,texture_stripes"}, **KW))
    ds = Dataset.open(src)
    scores, _ = read_scores(ds, "class-mask")
    masked = np.isin(ds.labels, [c.index for c in ds.classes if c.name in ("digit_3", "texture_stripes")])
    assert (scores[masked] < scores[~masked].min()).all()
    tables = list((ds.root / "reports").glob("scores-class-mask-*.csv"))
    assert [t.name for t in tables] == ["scores-class-mask-masked_classes.csv"]


def test_target_train_candidates_leave_validation_unscored(dirs):
    src, tgt, enc = dirs
    score(ScoreConfig("random", src, tgt, enc, candidates="target-train", **KW))
    info = load_encoder(enc).info
    scores, attrs = read_scores(Dataset.open(tgt), "random")
    assert np.isnan(scores[info["val_ids"]]).all() and np.isfinite(scores[info["train_ids"]]).all()
    assert attrs["candidates"] == "target-train"


def test_user_errors(dirs):
    src, tgt, enc = dirs
    with pytest.raises(ValueError, match="needs --encoder"):
        score(ScoreConfig("clustering", src, tgt, **KW))
    with pytest.raises(ValueError, match="needs --target"):
        score(ScoreConfig("domain-cls", src, encoder=enc, **KW))
    with pytest.raises(ValueError, match="valid methods"):
        score(ScoreConfig("nope", src, **KW))
    with pytest.raises(ValueError, match=r"takes no parameter\(s\) \['kay'\]"):
        score(ScoreConfig("clustering", src, tgt, enc, {"kay": 3}, **KW))


def test_influence_data_dropout_on_the_target(dirs):
    src, tgt, enc = dirs
    s = score(ScoreConfig("influence", src, tgt, enc, {"labels": "given", "solver": "cg"}, candidates="target-train",
                          name="dropout", **KW))
    info = load_encoder(enc).info
    scores, attrs = read_scores(Dataset.open(tgt), "dropout")
    assert np.isfinite(scores[info["train_ids"]]).all() and np.isnan(scores[info["val_ids"]]).all()
    assert attrs["result"]["residual"] < 1e-4 and attrs["params"]["labels"] == "given"
    assert "residual=" in s.line()


def test_grad_align_on_the_pool_and_on_the_target(dirs):
    """The stage gives grad-align the encoder's head and held-out split: the stored scores are
    the math's on the stored embeddings; with given labels it scores the target's training split."""
    from filterx.math.influence import head_alignment_scores, head_class_alignment_scores, head_val_alignment
    from filterx.models.encoder import read_encoder_file
    from filterx.stages.embed import read_embeddings

    src, tgt, enc = dirs
    score(ScoreConfig("grad-align", src, tgt, enc, **KW))
    ds, info = Dataset.open(src), load_encoder(enc).info
    scores, attrs = read_scores(ds, "grad-align")
    state = read_encoder_file(enc)["state_dict"]
    W, b = state["fc.weight"].float().numpy(), state["fc.bias"].float().numpy()
    t_emb = read_embeddings(Dataset.open(tgt), load_encoder(enc).tag)
    val_ids = np.asarray(info["val_ids"])
    pool_emb = read_embeddings(ds, load_encoder(enc).tag)
    both = np.r_[np.asarray(info["train_ids"]), val_ids]  # the default aligns with the whole target
    expected = head_class_alignment_scores(pool_emb, W, b, t_emb[both], Dataset.open(tgt).labels[both])
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert attrs["params"] == {"labels": "pseudo", "val_classes": None, "center": "none", "align_with": "auto",
                               "over": "class", "batch_size": 65536}
    scored = ~np.isnan(scores)
    assert attrs["result"]["align_with"] == "target" and attrs["result"]["num_val"] == len(both)
    assert np.all(np.abs(scores[scored]) <= 1 + 1e-6) and attrs["result"]["unaligned"] == int((~scored).sum())
    score(ScoreConfig("grad-align", src, tgt, enc, {"over": "all", "align_with": "validation"}, name="grad-align-all",
                      **KW))
    M = head_val_alignment(t_emb[val_ids], Dataset.open(tgt).labels[val_ids], W, b)
    np.testing.assert_allclose(read_scores(ds, "grad-align-all")[0], head_alignment_scores(pool_emb, W, b, M.float()),
                               rtol=1e-5, atol=1e-6)
    score(ScoreConfig("grad-align", src, tgt, enc, {"labels": "given"}, candidates="target-train",
                      name="grad-align-given", **KW))
    given, _ = read_scores(Dataset.open(tgt), "grad-align-given")
    assert np.isfinite(given[info["train_ids"]]).all() and np.isnan(given[val_ids]).all()
    assert read_scores(Dataset.open(tgt), "grad-align-given")[1]["result"]["align_with"] == "validation"  # auto
    with pytest.raises(ValueError, match="needs --candidates target-train"):
        score(ScoreConfig("grad-align", src, tgt, enc, {"labels": "given"}, **KW))
    # a candidate of a class without a target sample to align with is left unscored, and not counted
    one = score(ScoreConfig("grad-align", src, tgt, enc, {"val_classes": [0]}, name="grad-align-one", **KW))
    kept = np.isfinite(read_scores(ds, "grad-align-one")[0])
    assert 0 < one.scored == kept.sum() < ds.num_samples and one.attrs["unaligned"] == ds.num_samples - one.scored
    # --align-with target: the training split's gradients and the held-out split's together
    score(ScoreConfig("grad-align", src, tgt, enc, {"align_with": "target", "over": "all"}, name="grad-align-target",
                      **KW))
    whole, attrs = read_scores(ds, "grad-align-target")
    M = head_val_alignment(t_emb[both], Dataset.open(tgt).labels[both], W, b)
    expected = head_alignment_scores(read_embeddings(ds, load_encoder(enc).tag), W, b, M.float())
    np.testing.assert_allclose(whole, expected, rtol=1e-5, atol=1e-6)
    assert attrs["result"]["align_with"] == "target" and attrs["result"]["num_val"] == len(both)
    with pytest.raises(ValueError, match="align each candidate with its own gradient"):
        score(ScoreConfig("grad-align", src, tgt, enc, {"align_with": "target"}, candidates="target-train",
                          name="grad-align-self", **KW))


def test_outlier_exposure_entropy_scores_the_pool_with_the_recorded_decay(dirs):
    from filterx.models.encoder import read_encoder_file

    src, tgt, enc = dirs
    score(ScoreConfig("entropy", src, tgt, enc, {"head": "outlier-exposure", "order": "low"}, name="entropy-oe", **KW))
    scores, attrs = read_scores(Dataset.open(src), "entropy-oe")
    assert np.isfinite(scores).all() and (scores <= 0).all()
    assert attrs["params"]["head"] == "outlier-exposure"
    assert attrs["params"]["weight_decay"] == read_encoder_file(enc)["config"]["weight_decay"]
    assert len(attrs["result"]["lbfgs_grad_norm"]) == attrs["result"]["folds"] == 2
    with pytest.raises(ValueError, match="scores the pool .*not 'target-train'"):
        score(ScoreConfig("entropy", src, tgt, enc, {"head": "outlier-exposure"}, candidates="target-train",
                          name="entropy-oe-t", **KW))
    # the default head (auto): outlier exposure for order low on the pool, the same scores as
    # asking for it; the encoder's head for order high and on the target's training split
    score(ScoreConfig("entropy", src, tgt, enc, {"order": "low"}, name="entropy-auto", **KW))
    auto, auto_attrs = read_scores(Dataset.open(src), "entropy-auto")
    np.testing.assert_array_equal(auto, scores)
    assert auto_attrs["params"]["head"] == "outlier-exposure" and "lbfgs_grad_norm" in auto_attrs["result"]
    score(ScoreConfig("entropy", src, tgt, enc, {"order": "low"}, candidates="target-train", name="entropy-auto-t",
                      **KW))
    score(ScoreConfig("entropy", src, tgt, enc, {"head": "given", "order": "low"}, candidates="target-train",
                      name="entropy-given-t", **KW))
    on_train, train_attrs = read_scores(Dataset.open(tgt), "entropy-auto-t")
    np.testing.assert_array_equal(on_train, read_scores(Dataset.open(tgt), "entropy-given-t")[0])
    assert train_attrs["params"]["head"] == "given" and train_attrs["result"] == {}
    score(ScoreConfig("entropy", src, tgt, enc, {}, name="entropy-auto-high", **KW))
    assert read_scores(Dataset.open(src), "entropy-auto-high")[1]["params"]["head"] == "given"


def test_influence_last_block_from_pixels(dirs):
    src, tgt, enc = dirs
    # ResNet-18's layer4 is 8.4M parameters: a strong damping keeps CG to a few passes on a CPU
    score(ScoreConfig("influence", src, tgt, enc, {"params": "last-block", "solver": "cg", "damping": 10.0,
                                                   "cg_max_iter": 8, "cg_tol": 1e-3},
                      name="influence-lb", **KW))
    scores, attrs = read_scores(Dataset.open(src), "influence-lb")
    assert np.isfinite(scores).all() and scores.std() > 0
    # two loader workers interleave the samples: a score must still land on its own id
    score(ScoreConfig("influence", src, tgt, enc, {"params": "last-block", "solver": "cg", "damping": 10.0,
                                                   "cg_max_iter": 8, "cg_tol": 1e-3},
                      name="influence-lb-2w", **{**KW, "workers": 2}))
    np.testing.assert_allclose(read_scores(Dataset.open(src), "influence-lb-2w")[0], scores, rtol=1e-4,
                               atol=1e-6 * np.abs(scores).max())
    assert attrs["params"]["params"] == "last-block" and attrs["params"]["curvature"] == "gauss-newton"
    assert attrs["result"]["residual"] < 1e-2 and attrs["result"]["num_params"] > 8_000_000
    with pytest.raises(ValueError, match="valid: head, last-block"):
        score(ScoreConfig("influence", src, tgt, enc, {"params": "everything"}, **KW))


def test_influence_takes_the_weight_decay_the_head_was_trained_with(dirs, tmp_path):
    import torch

    src, tgt, enc = dirs
    state = torch.load(enc, weights_only=False)
    state["config"] = {**state["config"], "weight_decay": 2e-3}
    other = tmp_path / "encoder-wd.pt"
    torch.save(state, other)
    score(ScoreConfig("influence", src, tgt, other, {"solver": "cg"}, name="influence-wd", **KW))
    _, attrs = read_scores(Dataset.open(src), "influence-wd")
    assert attrs["params"]["weight_decay"] == 2e-3 and attrs["result"]["weight_decay"] == 2e-3
    score(ScoreConfig("influence", src, tgt, other, {"solver": "cg", "weight_decay": 0.0}, name="influence-wd0", **KW))
    assert read_scores(Dataset.open(src), "influence-wd0")[1]["params"]["weight_decay"] == 0.0  # given wins


def test_score_under_torchrun_embeds_on_every_rank_and_scores_once(sample_dirs, encoder_file, tmp_path):
    """Two gloo ranks: the missing embeddings are split between them, rank 0 scores and writes
    once (no second writer refused, no rank left waiting), with the one-process result."""
    import os
    import shutil
    import socket
    import subprocess
    import sys

    src, ref = tmp_path / "source", tmp_path / "reference"
    for d in (src, ref):
        shutil.copytree(sample_dirs[0], d)
        shutil.rmtree(d / "embeddings", ignore_errors=True)
    tgt = tmp_path / "target"
    shutil.copytree(sample_dirs[1], tgt)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    def args(source):
        return ["-m", "filterx", "score", "--method", "domain-cls", "--source", str(source), "--target", str(tgt),
                "--encoder", str(encoder_file), "--backend", "pil", "--device", "cpu", "--batch-size", "16",
                "--workers", "0", "-q", "--json"]

    # The one-process reference runs with the ranks' thread count: the classifier's float
    # reductions depend on it.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           *args(src)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count('"name": "domain-cls"') == 1  # one summary: rank 0's
    one = subprocess.run([sys.executable, *args(ref)], capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    np.testing.assert_array_equal(read_scores(Dataset.open(src), "domain-cls")[0],
                                  read_scores(Dataset.open(ref), "domain-cls")[0])
