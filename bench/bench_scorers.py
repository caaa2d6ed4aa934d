"""Scorers on precomputed embeddings: samples/s and peak memory for each registered scorer.

Synthetic embeddings with the shape of a real run (a pool of N x D, a target of M x D with C
classes, a linear head); each scorer runs once in its own child process after a warm-up on a
tiny problem, so the timing is the scorer, not imports or first-call compilation. The
reference column is ``entropy``: one GEMM over the pool's embeddings and a softmax, the floor
for any scorer that reads every embedding once.

    python bench/bench_scorers.py [--quick]
"""

from __future__ import annotations

import sys
import time

# (label, method, params)
CASES = (
    ("entropy", "entropy", {"order": "high"}),
    ("random", "random", {}),
    ("clustering min, k=200", "clustering", {"k": 200, "distance": "min"}),
    ("clustering avg, k=200", "clustering", {"k": 200, "distance": "avg"}),
    ("domain-cls linear", "domain-cls", {"model": "linear", "steps": 300}),
    ("domain-cls mlp", "domain-cls", {"model": "mlp", "steps": 300}),
    ("influence head, cg", "influence", {"solver": "cg"}),
    ("class-mask", "class-mask", {"classes": "0,1,2,3,4"}),
    ("hard-classes", "hard-classes", {"count": 5, "epochs": 2}),
)


def make_inputs(n: int, m: int, d: int, c: int, seed: int = 0):
    import numpy as np

    from filterx.scorers import ClassInfo, ScoreInputs

    rng = np.random.default_rng(seed)
    pool_classes = 50
    source = rng.normal(size=(n, d)).astype(np.float32)
    target = (rng.normal(size=(m, d)) + 0.5).astype(np.float32)
    val = (rng.normal(size=(max(m // 10, c), d)) + 0.5).astype(np.float32)
    return ScoreInputs(
        num_source=n, source_emb=source, target_emb=target,
        target_labels=rng.integers(0, c, m), target_val_emb=val,
        target_val_labels=rng.integers(0, c, len(val)),
        source_labels=rng.integers(0, pool_classes, n),
        source_classes=tuple(ClassInfo(i, str(i)) for i in range(pool_classes)),
        head_weight=(rng.normal(size=(c, d)) * 0.05).astype(np.float32),
        head_bias=np.zeros(c, dtype=np.float32),
    )


def time_scorer(method: str, params: dict, n: int, m: int, d: int, c: int) -> dict:
    """Child process: warm up on a tiny problem, then time one run on the full one."""
    import torch

    from bench.suite import current_rss_mb
    from filterx.scorers import run_scorer

    torch.set_num_threads(2)
    run_scorer(method, make_inputs(256, 64, d, c), **params)
    inputs = make_inputs(n, m, d, c)
    base = current_rss_mb()
    t0 = time.perf_counter()
    run_scorer(method, inputs, **params)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "samples_s": n / seconds, "rss_base_mb": base}


def run(quick: bool = True) -> list[dict]:
    from bench.suite import run_child

    n, m, d, c = (50_000, 1_000, 512, 31) if quick else (500_000, 3_000, 512, 31)
    rows, ref = [], None
    for label, method, params in CASES:
        try:
            res = run_child("bench.bench_scorers:time_scorer", dict(method=method, params=params, n=n, m=m, d=d, c=c))
        except RuntimeError as exc:
            rows.append({"scorer": label, "N": n, "error": str(exc).splitlines()[-1][:120]})
            continue
        ref = ref or res["samples_s"]
        rows.append({"scorer": label, "N": n, "D": d, "target": m, "seconds": round(res["seconds"], 3),
                     "samples_s": round(res["samples_s"]), "x_entropy_time": round(ref / res["samples_s"], 2),
                     "peak_rss_mb": round(res.get("peak_rss_mb", float("nan"))),
                     "rss_added_mb": round(res.get("peak_rss_mb", float("nan")) - res["rss_base_mb"])})
    return rows


if __name__ == "__main__":
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.suite import format_table

    print(format_table(run(quick="--quick" in sys.argv)))
