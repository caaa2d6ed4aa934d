"""Influence benchmark: candidates scored per second and s_test solve time per solver.

    python bench/bench_influence.py [--quick] [--device cpu|cuda]

params="head": N candidates (200k; 20k with --quick) of D=512 features, C=31 classes,
streamed through head_influence_scores; solves on M target training embeddings with each
solver (relative error against the exact solve where that one runs: with --quick the exact
solve uses D=128, since its dense Hessian at D=512 has 15903² entries). params="last-block": a
ResNet BasicBlock (64 -> 128 channels, stride 2) + avgpool + a 31-way head on 7x7 trunk
feature maps; candidates per second with the jvp and per-sample-gradient paths and the CG /
LiSSA solve time (Gauss-Newton curvature: the random block is not at a minimum, so its exact
Hessian is indefinite; the HVP costs about the same). Synthetic data (fixed seeds): timings depend on shapes, not on values.
``run(quick)`` returns the rows; the script prints them as a table and writes no files.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from filterx.math.influence import (
    SolverOptions,
    head_influence_scores,
    head_s_test,
)
from filterx.math.influence_block import last_block_influence_scores, last_block_s_test


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats=1):
    fn()  # warm-up (allocations, kernel compilation)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats, out


def _embeddings(n, dim, classes, seed):
    """Post-ReLU-like features: class means plus noise, clipped at zero (float32 numpy)."""
    g = np.random.default_rng(seed)
    means = np.abs(np.random.default_rng(99).normal(0, 1, (classes, dim)))
    y = g.integers(0, classes, n)
    x = np.maximum(means[y] + g.normal(0, 1, (n, dim)), 0) / np.sqrt(dim)
    return x.astype(np.float32), y


def _head(classes, dim):
    means = np.abs(np.random.default_rng(99).normal(0, 1, (classes, dim)))
    W = 4 * (means - means.mean(0)) / np.linalg.norm(means, axis=1, keepdims=True)
    return torch.from_numpy(W).float(), torch.zeros(classes)


def bench_head(quick, device):
    n, dim, classes = (20_000 if quick else 200_000), 512, 31
    m = 500 if quick else 2000
    rows = []
    W, b = _head(classes, dim)
    train_x, _ = _embeddings(m, dim, classes, 1)
    val_x, val_y = _embeddings(500, dim, classes, 2)
    exact_dim = 128 if quick else dim  # the dense 15.9k-square Hessian takes minutes on 2 cores
    solves = {}
    for solver in ("exact", "cg", "lissa"):
        d = exact_dim if solver == "exact" else dim
        opts = SolverOptions(solver=solver, damping=0.01, lissa_batch_size=256, lissa_depth=5000)
        t0 = time.perf_counter()
        res = head_s_test(train_x[:, :d], val_x[:, :d], val_y, W[:, :d], b, options=opts,
                          device=device)
        _sync(device)
        solves[(solver, d)] = res
        rows.append(dict(case="head-solve", solver=solver, device=device, m=m, d=d, c=classes,
                         params=res.num_params, seconds=time.perf_counter() - t0,
                         iterations=res.iterations, residual=res.residual))
    if ("exact", dim) in solves:
        ref = solves[("exact", dim)].s_test
        for row in rows:
            s = solves[(row["solver"], row["d"])].s_test
            row["rel_err_vs_exact"] = float((s - ref).norm() / ref.norm())
    s_test = solves[("cg", dim)].s_test
    cand, _ = _embeddings(n, dim, classes, 3)
    paths = [None] + (["auto"] if torch.device(device).type == "cuda" else [])
    for kernel in paths:
        secs, _ = _timed(lambda: head_influence_scores(cand, W, b, s_test, device=device,
                                                       kernel=kernel), device)
        rows.append(dict(case="head-score", solver="", device=device, n=n, d=dim, c=classes,
                         path="torch" if kernel is None else "kernel", seconds=secs,
                         per_second=n / secs))
    return rows


def _tiny_resnet_stage(classes):
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(64, 128, 1, stride=2, bias=False), nn.BatchNorm2d(128))
    block = nn.Sequential(BasicBlock(64, 128, stride=2, downsample=down),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return block, nn.Linear(128, classes)


def bench_last_block(quick, device):
    classes, n, m = 31, (256 if quick else 2048), (256 if quick else 1024)
    block, head = _tiny_resnet_stage(classes)
    g = torch.Generator().manual_seed(0)
    feats = torch.relu(torch.randn(n + m + 256, 64, 7, 7, generator=g)).to(device)
    labels = torch.randint(0, classes, (n + m + 256,), generator=g).to(device)
    train = [(feats[i : i + 128], labels[i : i + 128]) for i in range(0, m, 128)]
    val = [(feats[m : m + 256], labels[m : m + 256])]
    cand = feats[m + 256 :]
    rows = []
    results = {}
    for solver, opts in (("cg", SolverOptions("cg", damping=0.1, cg_max_iter=10 if quick else 50,
                                              cg_tol=1e-4)),
                         ("lissa", SolverOptions("lissa", damping=0.1,
                                                 lissa_depth=20 if quick else 100,
                                                 power_iters=5 if quick else 20))):
        t0 = time.perf_counter()
        res = last_block_s_test(block, head, train, val, options=opts, device=device,
                                curvature="gauss-newton")
        _sync(device)
        results[solver] = res
        rows.append(dict(case="last-block-solve", solver=solver, device=device, m=m,
                         params=res.num_params, seconds=time.perf_counter() - t0,
                         iterations=res.iterations, residual=res.residual))
    s_test = results["cg"].s_test.float()
    for method in ("jvp", "per-sample-grad"):
        count = n if method == "jvp" else min(n, 256)
        secs, _ = _timed(lambda: last_block_influence_scores(
            block, head, s_test, cand[:count], batch_size=128, device=device, method=method),
            device)
        rows.append(dict(case="last-block-score", solver="", device=device, n=count,
                         params=results["cg"].num_params, path=method, seconds=secs,
                         per_second=count / secs))
    return rows


def run(quick: bool, device: str = "cpu") -> list[dict]:
    """All benchmark rows (dicts with case, solver/path, shapes, seconds, rates)."""
    return bench_head(quick, device) + bench_last_block(quick, device)


def _table(rows):
    cols = ["case", "solver", "path", "device", "n", "m", "d", "c", "params", "iterations",
            "residual", "rel_err_vs_exact", "seconds", "per_second"]
    cols = [c for c in cols if any(c in r for r in rows)]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(_table(run(args.quick, args.device)))
