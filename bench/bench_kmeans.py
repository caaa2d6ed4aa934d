"""k-means: FAISS against filterx's torch k-means (the GPU path where FAISS has no GPU build).

Same data, same k, 25 iterations; reports seconds, points*iterations/s, the objective of each
(mean squared distance on the training points), and torch's time and objective as ratios to
FAISS in the same run. On CUDA the torch rows run on the GPU (FAISS stays on the CPU here:
faiss-gpu needs CUDA 12 libraries).

    python bench/bench_kmeans.py [--quick]
"""

from __future__ import annotations

import sys
import time

SIZES_QUICK = ((20_000, 512, 100), (20_000, 2048, 200))
SIZES_FULL = ((100_000, 512, 200), (1_000_000, 256, 1000), (100_000, 2048, 1000), (200_000, 512, 10_000))


def time_kmeans(impl: str, n: int, d: int, k: int, device: str = "cpu") -> dict:
    """Child process: k-means of n x d clustered data with k centroids, 25 iterations."""
    import numpy as np
    import torch

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, (max(k // 2, 1), d)).astype(np.float32)
    x = (centers[rng.integers(0, len(centers), n)] + rng.normal(0, 1, (n, d))).astype(np.float32)
    t0 = time.perf_counter()
    if impl == "faiss":
        import faiss

        km = faiss.Kmeans(d, k, niter=25, seed=0, max_points_per_centroid=256)
        km.train(x)
        c = km.centroids
    else:
        from filterx.math.kmeans import torch_kmeans

        res = torch_kmeans(x, k, niter=25, seed=0, device=device, tol=0.0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        c = res.centroids
    seconds = time.perf_counter() - t0
    from filterx.kernels import nearest_centroid

    d2, _, _ = nearest_centroid(torch.from_numpy(x[:50_000]), torch.from_numpy(np.ascontiguousarray(c)))
    return {"seconds": seconds, "objective": float(d2.mean())}


def run(quick: bool = True) -> list[dict]:
    import torch

    from bench.suite import run_child

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for n, d, k in SIZES_QUICK if quick else SIZES_FULL:
        ref = run_child("bench.bench_kmeans:time_kmeans", dict(impl="faiss", n=n, d=d, k=k))
        rows.append({"impl": "faiss (cpu)", "N": n, "D": d, "K": k, "seconds": round(ref["seconds"], 2),
                     "x_faiss_time": 1.0, "objective_x_faiss": 1.0, "peak_rss_mb": round(ref["peak_rss_mb"])})
        for dev in devices:
            r = run_child("bench.bench_kmeans:time_kmeans", dict(impl="torch", n=n, d=d, k=k, device=dev))
            rows.append({"impl": f"torch ({dev})", "N": n, "D": d, "K": k, "seconds": round(r["seconds"], 2),
                         "x_faiss_time": round(r["seconds"] / ref["seconds"], 2),
                         "objective_x_faiss": round(r["objective"] / ref["objective"], 4),
                         "peak_rss_mb": round(r["peak_rss_mb"])})
    return rows


if __name__ == "__main__":
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.suite import format_table

    print(format_table(run(quick="--quick" in sys.argv)))
