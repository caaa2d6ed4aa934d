"""Influence (Koh & Liang): solvers against the exact solve, retraining, sign, streaming."""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from filterx.math.influence import (
    InfluenceDivergedError,
    SolverOptions,
    head_hessian,
    head_influence_scores,
    head_loss_gradient,
    head_s_test,
)
from filterx.math.influence_block import last_block_influence_scores, last_block_s_test
from filterx.scorers import ScoreInputs, run_scorer

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n, dim, classes, seed, flip=0.0, spread=1.5):
    """Gaussian class blobs (float64); a fraction ``flip`` of labels replaced by another class."""
    g = np.random.default_rng(seed)
    means = np.random.default_rng(1234).normal(0, spread, (classes, dim))
    y = g.integers(0, classes, n)
    x = means[y] + g.normal(0, 1.0, (n, dim))
    flipped = g.random(n) < flip
    y = np.where(flipped, (y + g.integers(1, classes, n)) % classes, y)
    return torch.from_numpy(x), torch.from_numpy(y), flipped


def random_head(classes, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(classes, dim, generator=g, dtype=F64), 0.1 * torch.randn(
        classes, generator=g, dtype=F64
    )


def per_sample_scores_autograd(x, y, W, b, s_test):
    """∇θ CE(x_i, y_i)ᵀ s_test by autograd, one sample at a time: the definition of the score."""
    out = []
    for xi, yi in zip(x, y):
        theta = torch.cat([W, b[:, None]], 1).clone().requires_grad_(True)
        loss = F.cross_entropy((xi @ theta[:, :-1].T + theta[:, -1])[None], yi[None])
        (g,) = torch.autograd.grad(loss, theta)
        out.append(float((g * s_test).sum()))
    return np.array(out)


# ------------------------------------------------------------------------------ head: math


def test_head_hessian_matches_autograd():
    x, y, _ = blobs(50, 4, 3, seed=0)
    W, b = random_head(3, 4)
    wd = 0.03

    def objective(theta):
        loss = F.cross_entropy(x @ theta[:, :-1].T + theta[:, -1], y)
        return loss + 0.5 * wd * (theta**2).sum()

    theta = torch.cat([W, b[:, None]], 1)
    expected = torch.autograd.functional.hessian(objective, theta).reshape(15, 15)
    got = head_hessian(x, W, b, weight_decay=wd)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_head_loss_gradient_matches_autograd():
    x, y, _ = blobs(40, 4, 3, seed=1)
    W, b = random_head(3, 4)
    theta = torch.cat([W, b[:, None]], 1).requires_grad_(True)
    loss = F.cross_entropy(x @ theta[:, :-1].T + theta[:, -1], y)
    (expected,) = torch.autograd.grad(loss, theta)
    got, got_loss = head_loss_gradient(x, y, W, b)
    torch.testing.assert_close(got, expected)
    assert got_loss == pytest.approx(loss.item())


@pytest.fixture(scope="module")
def head_problem():
    x, _, _ = blobs(400, 6, 4, seed=2)
    vx, vy, _ = blobs(150, 6, 4, seed=3)
    W, b = random_head(4, 6)
    # Scale features so H's largest eigenvalue is O(1): LiSSA then needs O(100) steps.
    return x / 3, vx / 3, vy, W, b


def test_cg_and_lissa_agree_with_exact(head_problem):
    x, vx, vy, W, b = head_problem
    exact = head_s_test(x, vx, vy, W, b, options=SolverOptions(solver="exact", damping=0.1))
    cg = head_s_test(x, vx, vy, W, b, options=SolverOptions(solver="cg", damping=0.1, cg_tol=1e-8))
    # LiSSA settings: mini-batches of 128 of the 400 samples, 8 averaged repeats, depth <= 3000.
    lissa_opts = SolverOptions(solver="lissa", damping=0.1, lissa_batch_size=128,
                               lissa_repeats=8, lissa_depth=3000, seed=0)
    lissa = head_s_test(x, vx, vy, W, b, options=lissa_opts)
    ref = exact.s_test
    assert exact.s_test.shape == (4, 7) and exact.residual < 1e-12
    assert ((cg.s_test - ref).norm() / ref.norm()) < 1e-3 and cg.residual < 1e-7
    assert ((lissa.s_test - ref).norm() / ref.norm()) < 5e-2 and lissa.residual < 0.1
    assert lissa.lambda_max > 0 and lissa.scale == pytest.approx(1.5 * (lissa.lambda_max + 0.1))
    true_max = float(torch.linalg.eigvalsh(head_hessian(x, W, b))[-1])
    assert lissa.lambda_max == pytest.approx(true_max, rel=1e-2)
    assert 1 < cg.iterations <= 28 and 0 < lissa.iterations <= 8 * 3000


def test_exact_refuses_large_parameter_blocks(head_problem):
    x, vx, vy, W, b = head_problem
    with pytest.raises(ValueError, match="max_exact_params=20.*cg"):
        head_s_test(x, vx, vy, W, b, options=SolverOptions(solver="exact", max_exact_params=20))


def test_lissa_divergence_is_detected(head_problem):
    x, vx, vy, W, b = head_problem
    opts = SolverOptions(solver="lissa", damping=0.1, lissa_scale=0.01, check_scale=False)
    with pytest.raises(InfluenceDivergedError, match=r"scale=0\.01.*λ_max"):
        head_s_test(x, vx, vy, W, b, options=opts)


def test_lissa_small_scale_is_raised_with_a_warning(head_problem, caplog):
    x, vx, vy, W, b = head_problem
    opts = SolverOptions(solver="lissa", damping=0.1, lissa_scale=0.01, lissa_batch_size=400,
                         lissa_depth=3000)
    with caplog.at_level(logging.WARNING, logger="filterx.math.influence"):
        res = head_s_test(x, vx, vy, W, b, options=opts)
    assert "raising it to" in caplog.text
    assert res.scale > res.lambda_max + 0.1
    exact = head_s_test(x, vx, vy, W, b, options=SolverOptions(solver="exact", damping=0.1))
    # Full batches make the recursion deterministic; it stops once the norm has settled.
    assert float((res.s_test - exact.s_test).norm() / exact.s_test.norm()) < 1e-3


def test_val_classes_restricts_the_validation_loss(head_problem):
    x, vx, vy, W, b = head_problem
    opts = SolverOptions(solver="exact", damping=0.1)
    restricted = head_s_test(x, vx, vy, W, b, val_classes=(0, 2), options=opts)
    keep = (vy == 0) | (vy == 2)
    manual = head_s_test(x, vx[keep], vy[keep], W, b, options=opts)
    torch.testing.assert_close(restricted.s_test, manual.s_test)
    assert restricted.num_val == int(keep.sum()) < len(vy)
    everything = head_s_test(x, vx, vy, W, b, options=opts)
    assert not torch.allclose(restricted.s_test, everything.s_test)
    with pytest.raises(ValueError, match="none of the"):
        head_s_test(x, vx[vy != 3], vy[vy != 3], W, b, val_classes=(3,), options=opts)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        head_s_test(x, vx, vy, W, b, val_classes=(7,), options=opts)


def test_scores_match_autograd_and_stream_in_batches(head_problem):
    x, vx, vy, W, b = head_problem
    s = head_s_test(x, vx, vy, W, b).s_test
    cand = vx.float().numpy()
    labels = vy.numpy()
    big = head_influence_scores(cand, W, b, s, labels=labels, batch_size=10_000)
    small = head_influence_scores(cand, W, b, s, labels=labels, batch_size=7)
    assert big.dtype == np.float32 and big.shape == (150,)
    np.testing.assert_allclose(small, big, rtol=1e-5, atol=1e-6)
    expected = per_sample_scores_autograd(vx, vy, W, b, s)
    np.testing.assert_allclose(big, expected, rtol=1e-4, atol=1e-5)
    pseudo = head_influence_scores(cand, W, b, s, batch_size=7)
    argmax = (vx @ W.T + b).argmax(1)
    np.testing.assert_allclose(pseudo, per_sample_scores_autograd(vx, argmax, W, b, s),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        head_influence_scores(cand, W, b, s, labels=np.full(150, -1))


_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


@pytest.mark.parametrize("device,impl", [
    ("cpu", "torch"),
    pytest.param("cpu", "triton", marks=pytest.mark.skipif(
        not _INTERPRETING, reason="Triton's interpreter needs TRITON_INTERPRET=1 at start-up")),
    pytest.param("cuda", "triton", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")]),
])
def test_kernel_paths_match_the_reference_path(head_problem, device, impl):
    x, vx, vy, W, b = head_problem
    s = head_s_test(x, vx, vy, W, b).s_test
    cand = torch.randn(3000, 6, generator=torch.Generator().manual_seed(0)) / 3
    ref = head_influence_scores(cand, W, b, s, device=device, kernel=None, batch_size=1000)
    fast = head_influence_scores(cand, W, b, s, device=device, kernel=impl, batch_size=1000)
    np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert np.abs(ref).max() > 0.1


# ------------------------------------------------------------------- head: retraining check


def _train(x, y, weights, lam, theta0, steps=50):
    """argmin Σ_i weights_i CE_i / n + λ/2 ||θ||² by Newton's method (autograd, float64)."""
    n, dim = x.shape

    def objective(theta):
        ce = F.cross_entropy(x @ theta[:, :dim].T + theta[:, dim], y, reduction="none")
        return (weights * ce).sum() / n + 0.5 * lam * (theta**2).sum()

    theta = theta0.clone()
    for _ in range(steps):
        g = torch.autograd.functional.jacobian(objective, theta).reshape(-1)
        if g.norm() < 1e-13:
            break
        H = torch.autograd.functional.hessian(objective, theta).reshape(g.numel(), -1)
        theta = theta - torch.linalg.solve(H, g).view_as(theta)
    return theta


def test_influence_predicts_retraining():
    lam, k = 0.01, 10
    x, y, flipped = blobs(200, 5, 3, seed=4, flip=0.1)
    vx, vy, _ = blobs(300, 5, 3, seed=5)
    ones = torch.ones(len(y), dtype=F64)
    theta = _train(x, y, ones, lam, torch.zeros(3, 6, dtype=F64))
    W, b = theta[:, :5], theta[:, 5]

    def val_loss(t):
        return float(F.cross_entropy(vx @ t[:, :5].T + t[:, 5], vy))

    # The objective is mean CE + λ/2||θ||², so H + λI: weight_decay=λ, no extra damping.
    res = head_s_test(x, vx, vy, W, b, options=SolverOptions(solver="exact", damping=0.0,
                                                              weight_decay=lam))
    scores = head_influence_scores(x, W, b, res.s_test, labels=y, dtype=F64).astype(np.float64)
    predicted = scores / len(y)  # removal changes the val loss by about +score / n
    order = np.argsort(scores)
    chosen = np.concatenate([order[:k], order[-k:]])
    base = val_loss(theta)
    actual = []
    for i in chosen:
        weights = ones.clone()
        weights[i] = 0.0  # remove sample i, keeping the 1/n normalisation of the objective
        actual.append(val_loss(_train(x, y, weights, lam, theta)) - base)
    actual = np.array(actual)
    assert spearmanr(predicted[chosen], actual).statistic > 0.8
    assert np.all(actual[:k] < 0) and np.all(actual[k:] > 0)  # harmful ... helpful
    np.testing.assert_allclose(predicted[chosen], actual, rtol=0.3)
    assert flipped[order[:k]].mean() > 0.5  # the most harmful points are mostly mislabelled


# --------------------------------------------------------------------------------- scorer


def _scorer_inputs(source_labels=None):
    x, y, flipped = blobs(300, 8, 4, seed=6, flip=0.1)
    vx, vy, _ = blobs(200, 8, 4, seed=7)
    theta = _train(x, y, torch.ones(300, dtype=F64), 0.01, torch.zeros(4, 9, dtype=F64))
    inputs = ScoreInputs(
        num_source=300, source_emb=x.float().numpy(), target_emb=x.float().numpy(),
        target_labels=y.numpy(), target_val_emb=vx.float().numpy(), target_val_labels=vy.numpy(),
        source_labels=y.numpy() if source_labels is None else source_labels,
        head_weight=theta[:, :8].float().numpy(), head_bias=theta[:, 8].float().numpy(),
    )
    return inputs, flipped


def test_scorer_scores_follow_the_definition():
    inputs, flipped = _scorer_inputs()
    result = run_scorer("influence", inputs, labels="given", solver="cg", damping=0.01)
    scores = result.scores
    assert result.attrs["solver"] == "cg" and result.attrs["residual"] < 1e-5
    assert result.attrs["num_val"] == 200 and result.attrs["num_params"] == 36
    assert result.attrs["weight_decay"] == 5e-4 and result.attrs["label_smoothing"] == 0.0
    assert scores.dtype == np.float32 and scores.shape == (300,) and np.isfinite(scores).all()
    W, b = torch.from_numpy(inputs.head_weight), torch.from_numpy(inputs.head_bias)
    # by default H is that of train-encoder's objective: its weight decay is part of it
    s = head_s_test(inputs.target_emb, inputs.target_val_emb, inputs.target_val_labels, W, b,
                    options=SolverOptions(solver="exact", damping=0.01, weight_decay=5e-4)).s_test
    x, y = torch.from_numpy(inputs.source_emb).double(), torch.from_numpy(inputs.source_labels)
    expected = per_sample_scores_autograd(x, y, W.double(), b.double(), s)
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    # Positive = helpful: mislabelled training samples score below the clean ones.
    assert np.median(scores[flipped]) < 0 < np.median(scores[~flipped])
    pseudo = run_scorer("influence", inputs, solver="exact").scores
    assert np.isfinite(pseudo).all() and not np.allclose(pseudo, scores)


def test_scorer_default_objective_is_train_encoders():
    from filterx.train.encoder import EncoderConfig
    from filterx.scorers import get_scorer

    assert get_scorer("influence").defaults["weight_decay"] == EncoderConfig.weight_decay == 5e-4
    inputs, _ = _scorer_inputs()
    plain = run_scorer("influence", inputs, labels="given", solver="exact", weight_decay=0.0).scores
    default = run_scorer("influence", inputs, labels="given", solver="exact").scores
    assert not np.allclose(plain, default, rtol=1e-4)  # the decay changes H, so the scores


def test_scorer_without_a_held_out_split_says_so_in_one_line():
    inputs, _ = _scorer_inputs()
    empty = dataclasses.replace(inputs, target_val_emb=inputs.target_val_emb[:0],
                                target_val_labels=inputs.target_val_labels[:0])
    with pytest.raises(ValueError) as err:
        run_scorer("influence", empty)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("influence needs the encoder's held-out split of the target")
    assert "retrain it with filterx train-encoder TARGET OUT --val-fraction 0.1" in msg
    W, b = torch.from_numpy(inputs.head_weight), torch.from_numpy(inputs.head_bias)
    with pytest.raises(ValueError, match="influence needs validation samples"):
        head_s_test(inputs.target_emb, empty.target_val_emb, empty.target_val_labels, W, b)
    with pytest.raises(ValueError, match=r"none of the 200 validation samples is in val_classes \(0, 1\)"):
        head_s_test(inputs.target_emb, inputs.target_val_emb, np.full(200, 3), W, b, val_classes=[0, 1])


def test_scorer_rejects_unknown_labels_and_modes():
    inputs, _ = _scorer_inputs(source_labels=np.full(300, -1))
    with pytest.raises(ValueError, match="source_labels"):
        run_scorer("influence", inputs, labels="given")
    with pytest.raises(ValueError, match="pseudo, given"):
        run_scorer("influence", inputs, labels="true")
    with pytest.raises(ValueError, match="cg, exact, lissa"):
        run_scorer("influence", inputs, solver="newton")


# ----------------------------------------------------------------------------- last block


def tiny_block():
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    block = nn.Sequential(BasicBlock(3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for m in block.modules():  # non-trivial eval-mode BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return block, nn.Linear(3, 3)  # 174 block + 12 head parameters


def feature_maps(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 3, 3, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def _flat_loss_fn(block, head):
    """(θ0, loss_at(θ, x, y), logits_at(θ, x)) for nn.Sequential(block, head), built here with
    plain autograd so that the library's torch.func code is checked against it."""
    seq = nn.Sequential(block, head).double().eval()
    params = dict(seq.named_parameters())
    names = list(params)
    theta0 = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def logits_at(flat, xs):
        parts = flat.split([params[n].numel() for n in names])
        p = {n: t.view(params[n].shape) for n, t in zip(names, parts)}
        return torch.func.functional_call(seq, p, (xs,))

    def loss_at(flat, xs, ys):
        return F.cross_entropy(logits_at(flat, xs), ys)

    return theta0, loss_at, logits_at


@pytest.fixture(scope="module")
def block_problem():
    block, head = tiny_block()
    x, y = feature_maps(64, 1)
    vx, vy = feature_maps(40, 2)
    train = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    val = [(vx[:25], vy[:25]), (vx[25:], vy[25:])]
    return block, head, x, y, vx, vy, train, val


def test_last_block_hessian_solves_match_autograd(block_problem):
    block, head, x, y, vx, vy, train, val = block_problem
    # The random block is not at a minimum (H has eigenvalues down to about -0.14): damping
    # 0.5 makes H + λI positive definite so CG applies.
    kw = dict(device="cpu", dtype=F64)
    exact = last_block_s_test(block, head, train, val, options=SolverOptions("exact", 0.5), **kw)
    cg = last_block_s_test(block, head, train, val,
                           options=SolverOptions("cg", 0.5, cg_tol=1e-10), **kw)
    assert exact.num_params == 186 and exact.residual < 1e-10 and cg.residual < 1e-9
    assert float((cg.s_test - exact.s_test).norm() / exact.s_test.norm()) < 1e-6
    theta0, loss_at, _ = _flat_loss_fn(block, head)
    H = torch.autograd.functional.hessian(lambda t: loss_at(t, x, y), theta0)
    g = torch.autograd.functional.jacobian(lambda t: loss_at(t, vx, vy), theta0)
    expected = torch.linalg.solve(H + 0.5 * torch.eye(186, dtype=F64), g)
    torch.testing.assert_close(exact.s_test, expected, rtol=1e-8, atol=1e-10)
    assert exact.val_loss == pytest.approx(float(loss_at(theta0, vx, vy)))


def test_last_block_gauss_newton_matches_autograd(block_problem):
    block, head, x, y, vx, vy, train, val = block_problem
    kw = dict(device="cpu", dtype=F64, curvature="gauss-newton")
    exact = last_block_s_test(block, head, train, val, options=SolverOptions("exact", 0.01), **kw)
    cg = last_block_s_test(block, head, train, val,
                           options=SolverOptions("cg", 0.01, cg_tol=1e-10), **kw)
    assert exact.curvature == "gauss-newton" and cg.residual < 1e-9
    assert float((cg.s_test - exact.s_test).norm() / exact.s_test.norm()) < 1e-6
    theta0, loss_at, logits_at = _flat_loss_fn(block, head)
    J = torch.autograd.functional.jacobian(lambda t: logits_at(t, x), theta0)  # (N, C, P)
    p = torch.softmax(logits_at(theta0, x), 1).detach()
    A = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    G = torch.einsum("ncp,ncd,ndq->pq", J, A, J) / len(x)
    g = torch.autograd.functional.jacobian(lambda t: loss_at(t, vx, vy), theta0)
    expected = torch.linalg.solve(G + 0.01 * torch.eye(186, dtype=F64), g)
    torch.testing.assert_close(exact.s_test, expected, rtol=1e-7, atol=1e-9)


def test_last_block_negative_curvature_is_refused(block_problem):
    block, head, x, y, vx, vy, train, val = block_problem
    kw = dict(device="cpu", dtype=F64)
    with pytest.raises(ValueError, match="non-positive curvature.*gauss-newton"):
        last_block_s_test(block, head, train, val, options=SolverOptions("cg", 0.01), **kw)
    with pytest.raises(InfluenceDivergedError):
        last_block_s_test(block, head, train, val, **kw, options=SolverOptions(
            "lissa", 0.01, lissa_depth=3000, power_iters=30))
    with pytest.raises(ValueError, match="curvature 'fisher'.*gauss-newton"):
        last_block_s_test(block, head, train, val, curvature="fisher", **kw)


def test_last_block_lissa_close_to_exact(block_problem):
    block, head, x, y, vx, vy, train, val = block_problem
    kw = dict(device="cpu", dtype=F64, curvature="gauss-newton")
    exact = last_block_s_test(block, head, train, val, options=SolverOptions("exact", 0.1), **kw)
    # Mini-batches are the caller's 4 batches of 16; 4 averaged repeats of <= 150 steps
    # (measured error about 0.03).
    lissa = last_block_s_test(block, head, train, val, **kw, options=SolverOptions(
        "lissa", 0.1, lissa_depth=150, lissa_repeats=4, lissa_window=20, power_iters=30, seed=1))
    assert float((lissa.s_test - exact.s_test).norm() / exact.s_test.norm()) < 0.1


def test_last_block_jvp_scores_match_per_sample_gradients(block_problem):
    block, head, x, y, vx, vy, train, val = block_problem
    s = torch.randn(186, dtype=F64, generator=torch.Generator().manual_seed(0))
    kw = dict(device="cpu", dtype=F64)
    fast = last_block_influence_scores(block, head, s, vx[:30], labels=vy[:30], batch_size=8, **kw)
    ref = last_block_influence_scores(block, head, s, [(vx[:13], vy[:13]), (vx[13:30], vy[13:30])],
                                      method="per-sample-grad", **kw)
    assert fast.shape == (30,) and fast.dtype == np.float32
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-6)
    theta0, loss_at, logits_at = _flat_loss_fn(block, head)
    g0 = torch.autograd.functional.jacobian(lambda t: loss_at(t, vx[:1], vy[:1]), theta0)
    assert fast[0] == pytest.approx(float(g0 @ s), rel=1e-5)
    pseudo = last_block_influence_scores(block, head, s, [vx[:10], vx[10:30]], **kw)
    argmax = logits_at(theta0, vx[:30]).argmax(1)
    same = last_block_influence_scores(block, head, s, vx[:30], labels=argmax, **kw)
    np.testing.assert_allclose(pseudo, same, rtol=1e-6)


@pytest.mark.parametrize("curvature", ["hessian", "gauss-newton"])
def test_last_block_without_block_parameters_reduces_to_head(head_problem, curvature):
    x, vx, vy, W, b = head_problem
    head = nn.Linear(6, 4).double()
    head.weight.data, head.bias.data = W.clone(), b.clone()
    opts = SolverOptions(solver="cg", damping=0.1, cg_tol=1e-10)
    # Train labels do not enter the cross-entropy Hessian; zeros stand in for them.
    zeros = torch.zeros(200, dtype=torch.long)
    block_res = last_block_s_test(nn.Flatten(), head, [(x[:200], zeros), (x[200:], zeros)],
                                  [(vx, vy)], val_classes=(1, 3), options=opts, dtype=F64,
                                  curvature=curvature)
    head_res = head_s_test(x, vx, vy, W, b, val_classes=(1, 3), options=opts)
    S = head_res.s_test
    # Flat order of nn.Sequential(block, head): W row-major, then b; the head keeps (C, D+1).
    torch.testing.assert_close(block_res.s_test, torch.cat([S[:, :6].reshape(-1), S[:, 6]]))
    assert block_res.val_loss == pytest.approx(head_res.val_loss)
    assert block_res.num_val == head_res.num_val == int(((vy == 1) | (vy == 3)).sum())
    scores = last_block_influence_scores(nn.Flatten(), head, block_res.s_test, vx, dtype=F64)
    np.testing.assert_allclose(scores, head_influence_scores(vx, W, b, S, dtype=F64), rtol=1e-6)

