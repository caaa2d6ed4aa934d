"""entropy --head outlier-exposure: the head's objective (its minimiser), what it ranks where the
encoder's own head is surest of far images, and its cross-fitting (no pool image scored by a head
fitted on it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from filterx.math.probe import fit_linear_probe
from filterx.scorers import ScoreInputs, resolve_scorer, run_scorer

pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n, seed):
    """Non-negative (post-ReLU-like) 8-d embeddings of 3 target classes, each strong in its own
    coordinate; classes 0 and 1 have a weaker second cue in coordinates 3 and 4."""
    g = np.random.default_rng(seed)
    y = g.integers(0, 3, n)
    x = np.abs(g.normal(0, 0.7, (n, 8)))
    x[np.arange(n), y] += 2.0
    x[:, 3] += 1.0 * (y == 0)
    x[:, 4] += 1.0 * (y == 1)
    return x.astype(np.float32), y


def _inputs():
    """A pool of 20 target-like images and 180 far ones, which fill coordinate 3 or 4 strongly:
    the target's own head reads those cues and is surest of the far images."""
    x, y = _blobs(240, 1)
    vx, vy = _blobs(60, 2)
    near, _ = _blobs(20, 3)
    g = np.random.default_rng(4)
    far = np.abs(g.normal(0, 0.7, (180, 8))).astype(np.float32)
    far[np.arange(180), 3 + g.integers(0, 2, 180)] += 6.0
    W, b, _ = fit_linear_probe(x, y, 3, 0.01)
    inputs = ScoreInputs(num_source=200, source_emb=np.concatenate([near, far]), target_emb=x, target_labels=y,
                         target_val_emb=vx, target_val_labels=vy, head_weight=W, head_bias=b)
    return inputs, np.r_[np.ones(20, bool), np.zeros(180, bool)]


def test_the_fit_is_the_minimiser_of_the_objective_with_the_outlier_term():
    inputs, _ = _inputs()
    x, y, outliers = inputs.target_emb, inputs.target_labels, inputs.source_emb[20:]
    wd, lam = 0.01, 0.5
    W, b, stats = fit_linear_probe(x, y, 3, wd, outliers=outliers, outlier_weight=lam)
    # the objective written out here (CE from uniform = -mean_c log p_c), its gradient at the fit
    W, b = torch.from_numpy(W).double().requires_grad_(), torch.from_numpy(b).double().requires_grad_()
    X, O = torch.from_numpy(x).double(), torch.from_numpy(outliers).double()
    loss = (F.cross_entropy(X @ W.T + b, torch.from_numpy(y)) + 0.5 * wd * (W.pow(2).sum() + b.pow(2).sum())
            - lam * F.log_softmax(O @ W.T + b, 1).mean())
    loss.backward()
    loss = float(loss.detach())
    # float32 weights returned: the gradient at their rounding, not the solver's 1e-6
    assert max(W.grad.abs().max(), b.grad.abs().max()) < 1e-4
    assert stats["loss"] == pytest.approx(loss, rel=1e-5)
    # and the term does what it is for: the head is less sure of the outliers than without it
    W0, b0, _ = fit_linear_probe(x, y, 3, wd)

    def sure(w, c):  # mean max-probability on the outliers
        return float(torch.softmax(O.float() @ torch.as_tensor(w).T + torch.as_tensor(c), 1).max(1).values.mean())

    assert sure(W.detach().float(), b.detach().float()) < sure(W0, b0) - 0.2


def test_the_refitted_head_keeps_target_like_images_where_the_encoders_head_keeps_far_ones():
    inputs, relevant = _inputs()
    given = np.argsort(-run_scorer("entropy", inputs, order="low").scores, kind="stable")[:20]
    assert relevant[given].mean() < 0.2  # the encoder's head is surest of the far images
    res = run_scorer("entropy/outlier-exposure", inputs, seed=0, order="low", weight_decay=0.01)
    top = np.argsort(-res.scores, kind="stable")[:20]
    assert relevant[top].mean() >= 0.75  # random: 0.1
    # still the target's classifier on its held-out split, and sure of it
    assert len(res.attrs["val_acc"]) == 2 and min(res.attrs["val_acc"]) > 0.9
    assert max(res.attrs["mean_val_entropy"]) < res.attrs["mean_pool_entropy"]
    high = run_scorer("entropy/outlier-exposure", inputs, seed=0, order="high", weight_decay=0.01).scores
    np.testing.assert_array_equal(high, -res.scores)


def test_no_pool_image_is_scored_by_a_head_fitted_on_it():
    inputs, _ = _inputs()
    base = run_scorer("entropy/outlier-exposure", inputs, seed=3, folds=3).scores
    again = run_scorer("entropy/outlier-exposure", inputs, seed=3, folds=3).scores
    np.testing.assert_array_equal(base, again)  # deterministic for a seed
    # move one image far away: the heads fitted on its fold's complement do not see it, so the
    # other images of its fold keep their scores exactly; every other fold's head changes
    moved = inputs.source_emb.copy()
    moved[7] += 40.0
    changed = run_scorer("entropy/outlier-exposure", dataclasses.replace(inputs, source_emb=moved), seed=3,
                         folds=3).scores
    same = np.flatnonzero(changed == base)
    assert 7 not in same and 60 <= len(same) <= 70


def test_the_variant_is_chosen_by_head_and_refuses_what_it_cannot_do():
    scorer, params, chosen = resolve_scorer("entropy", {"head": "outlier-exposure", "order": "low"})
    assert scorer.name == "entropy/outlier-exposure" and params == {"order": "low"}
    assert chosen == {"head": "outlier-exposure"}
    assert resolve_scorer("entropy", {"head": "given"})[0].name == "entropy"
    with pytest.raises(ValueError, match="unknown entropy head 'oe'; valid: given, outlier-exposure, auto"):
        resolve_scorer("entropy", {"head": "oe"})
    # auto, the default: this head for order low over the pool, the encoder's head otherwise
    for params, candidates, name in [({"order": "low"}, "source", "entropy/outlier-exposure"),
                                     ({"head": "auto", "order": "low"}, "source", "entropy/outlier-exposure"),
                                     ({"order": "low"}, "target-train", "entropy"),
                                     ({}, "source", "entropy"), ({"order": "high"}, "source", "entropy")]:
        scorer, rest, chosen = resolve_scorer("entropy", params, candidates)
        assert scorer.name == name and chosen == {"head": "given" if name == "entropy" else "outlier-exposure"}
        assert "head" not in rest
    assert resolve_scorer("influence", {})[2] == {}  # a method without choose_auto records no choice
    inputs, _ = _inputs()
    with pytest.raises(ValueError, match="folds must be >= 2, got 1"):
        run_scorer("entropy/outlier-exposure", inputs, folds=1)
    with pytest.raises(ValueError, match="unknown order 'mid'"):
        run_scorer("entropy/outlier-exposure", inputs, order="mid")
    with pytest.raises(ValueError, match="at least 2 pool images"):
        run_scorer("entropy/outlier-exposure", dataclasses.replace(inputs, num_source=1,
                                                                   source_emb=inputs.source_emb[:1]))
    with pytest.raises(ValueError, match="outlier rows and a weight > 0"):
        fit_linear_probe(inputs.target_emb, inputs.target_labels, 3, 0.01, outliers=inputs.source_emb,
                         outlier_weight=0.0)
