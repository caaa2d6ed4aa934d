"""Benchmark filterx.kernels against the obvious alternatives.

    python bench/bench_kernels.py            # quick sizes (CPU: ~1 minute on 2 cores)
    python bench/bench_kernels.py --full     # larger sizes

- nearest_centroid: torch twin vs faiss (IndexFlatL2 k=1 search, plus the mean distance
  through the same centroid-mean identity in numpy) vs the Triton kernel (CUDA only; a
  "skipped" row on the CPU).
- softmax_stats: torch twin vs naive torch (softmax, log_softmax, topk over the whole matrix).
- head_influence: torch twin vs forming every per-sample gradient g_i (C, D + 1) in blocks.

Each row: seconds (best of a few runs), rows/s, and peak memory above the inputs: on CUDA
torch.cuda.max_memory_allocated; on the CPU the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs), which also sees faiss's and torch's native allocations that
tracemalloc would miss. ``run(quick)`` returns the rows; this script prints them and writes
no files. Timings on a shared CPU are noisy: compare rows of one run, as ratios.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
try:
    from filterx import kernels
except ImportError:  # run as a script from a source tree that is not installed
    sys.path.insert(0, str(REPO))
    from filterx import kernels



# ------------------------------------------------------------------------------ measurement

def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _pin_malloc_mmap_threshold() -> None:
    """Make glibc return every freed block over 1 MB to the OS at once.

    By default glibc raises its mmap threshold after the first big free and then keeps
    blocks up to 32 MB in the heap, so a warmed-up process shows no RSS growth for them and
    the peak below would read ~0. With the threshold pinned, RSS tracks live allocations.
    """
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (pinning it also stops the adjustment)
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure(fn, device: str, reps: int) -> tuple[float, float]:
    """Best wall time over ``reps`` runs after one warm-up, and peak extra memory in MB."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    elif _reset_peak_rss():
        base = _rss_kb("VmRSS")
        fn()
        peak = (_rss_kb("VmHWM") - base) / 1024
    else:
        peak = math.nan
    return min(times), peak


def row(kernel, impl, device, shape, seconds, peak_mb, n, note=""):
    return {
        "kernel": kernel, "impl": impl, "device": device, "shape": shape,
        "seconds": seconds, "rows_per_s": n / seconds if seconds == seconds else math.nan,
        "peak_mb": peak_mb, "note": note,
    }


# --------------------------------------------------------------------------------- benches

def faiss_nearest(x: np.ndarray, c: np.ndarray):
    import faiss  # noqa: PLC0415

    index = faiss.IndexFlatL2(c.shape[1])
    index.add(c)
    min_dist, argmin = index.search(x, 1)
    c_mean = c.mean(0, dtype=np.float64).astype(np.float32)
    spread = float(((c - c_mean) ** 2).sum(1).mean())
    # Blocked so the (rows, D) difference stays small, like the torch twin's scratch.
    mean_dist = np.empty(len(x), np.float32)
    for r0 in range(0, len(x), 8192):
        dev = x[r0 : r0 + 8192] - c_mean
        mean_dist[r0 : r0 + 8192] = np.einsum("ij,ij->i", dev, dev) + spread
    return min_dist[:, 0], mean_dist, argmin[:, 0]


def bench_nearest(n, d, k, reps, cuda):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    shape = f"N={n} D={d} K={k}"
    rows = []
    s, m = measure(lambda: kernels.nearest_centroid(x, c, impl="torch"), "cpu", reps)
    rows.append(row("nearest_centroid", "torch twin", "cpu", shape, s, m, n))
    try:
        xn, cn = x.numpy(), c.numpy()
        s, m = measure(lambda: faiss_nearest(xn, cn), "cpu", reps)
        rows.append(row("nearest_centroid", "faiss IndexFlatL2", "cpu", shape, s, m, n))
    except ImportError:
        rows.append(row("nearest_centroid", "faiss IndexFlatL2", "cpu", shape, math.nan,
                        math.nan, n, "skipped: faiss not installed"))
    if not cuda:
        rows.append(row("nearest_centroid", "triton", "cuda", shape, math.nan, math.nan, n,
                        "skipped: no CUDA device"))
        return rows
    for dtype in (torch.float32, torch.float16):
        xg, cg = x.to("cuda", dtype), c.to("cuda", dtype)
        name = str(dtype).removeprefix("torch.")
        for impl in ("torch", "triton"):
            s, m = measure(lambda: kernels.nearest_centroid(xg, cg, impl=impl), "cuda", reps)
            rows.append(row("nearest_centroid", f"{impl} {name}", "cuda", shape, s, m, n))
    return rows


def naive_softmax_stats(logits):
    p = torch.softmax(logits, 1)
    entropy = -(p * torch.log_softmax(logits, 1)).sum(1)
    top = p.topk(2, dim=1).values
    return entropy, top[:, 0], top[:, 0] - top[:, 1]


def bench_softmax(n, c, reps, cuda):
    logits = torch.randn(n, c, generator=torch.Generator().manual_seed(1)) * 3
    shape = f"N={n} C={c}"
    rows = []
    for device in ("cpu", "cuda") if cuda else ("cpu",):
        lg = logits.to(device)
        impls = [("torch twin", lambda: kernels.softmax_stats(lg, impl="torch")),
                 ("naive softmax+topk", lambda: naive_softmax_stats(lg))]
        if device == "cuda":
            impls.append(("triton", lambda: kernels.softmax_stats(lg, impl="triton")))
        for name, fn in impls:
            s, m = measure(fn, device, reps)
            rows.append(row("softmax_stats", name, device, shape, s, m, n))
    return rows


def naive_head_influence(x, r, s_test, block=256):
    """g_i . s_test with every g_i = r_i (x) [x_i, 1] formed, ``block`` samples at a time."""
    out = torch.empty(x.shape[0])
    ones = torch.ones(x.shape[0], 1)
    xa = torch.cat([x, ones], 1)
    for r0 in range(0, x.shape[0], block):
        g = r[r0 : r0 + block, :, None] * xa[r0 : r0 + block, None, :]
        out[r0 : r0 + block] = (g * s_test).sum((1, 2))
    return out


def bench_influence(n, c, d, reps, cuda):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, d, generator=gen)
    r = torch.softmax(torch.randn(n, c, generator=gen), 1)
    r[torch.arange(n), torch.randint(0, c, (n,), generator=gen)] -= 1.0
    s_test = torch.randn(c, d + 1, generator=gen)
    shape = f"N={n} C={c} D={d}"
    rows = []
    s, m = measure(lambda: kernels.head_influence(x, r, s_test, impl="torch"), "cpu", reps)
    rows.append(row("head_influence", "torch twin", "cpu", shape, s, m, n))
    s, m = measure(lambda: naive_head_influence(x, r, s_test), "cpu", max(1, reps - 2))
    rows.append(row("head_influence", "formed gradients", "cpu", shape, s, m, n))
    if cuda:
        xg, rg, sg = x.cuda(), r.cuda(), s_test.cuda()
        for impl in ("torch", "triton"):
            s, m = measure(lambda: kernels.head_influence(xg, rg, sg, impl=impl), "cuda", reps)
            rows.append(row("head_influence", impl, "cuda", shape, s, m, n))
    return rows


def run(quick: bool = True) -> list[dict]:
    """Run every benchmark; ``quick`` keeps sizes small enough for a 2-core CPU."""
    cuda = torch.cuda.is_available()
    _pin_malloc_mmap_threshold()
    reps = 3 if quick else 5
    nearest = [(100_000, 512, 200), (20_000, 2048, 1000)]
    softmax = [(100_000, 1000), (200_000, 10)]
    influence = [(20_000, 100, 512)]
    if not quick:
        nearest += [(200_000, 512, 1000), (50_000, 256, 10_000)]
        softmax += [(400_000, 1000)]
        influence += [(100_000, 1000, 512)]
    rows = []
    for n, d, k in nearest:
        rows += bench_nearest(n, d, k, reps, cuda)
    for n, c in softmax:
        rows += bench_softmax(n, c, reps, cuda)
    for n, c, d in influence:
        rows += bench_influence(n, c, d, reps, cuda)
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["kernel", "impl", "device", "shape", "seconds", "rows_per_s", "peak_mb", "note"]
    fmt = {"seconds": "{:.4f}", "rows_per_s": "{:,.0f}", "peak_mb": "{:.1f}"}
    cells = [[("-" if isinstance(r[k], float) and r[k] != r[k] else fmt.get(k, "{}").format(r[k]))
              for k in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(cols)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="larger sizes (slow on a CPU)")
    args = parser.parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    print(f"filterx.kernels benchmark; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {device}")
    print(format_table(run(quick=not args.full)))


if __name__ == "__main__":
    main()
