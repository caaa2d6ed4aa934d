"""Ray runner overhead: the same shard and embed runs with ``--runner local`` and ``--runner ray``
on this machine (one run each, ratio ray / local).

    python -m bench --suite ray [--quick]

Inputs: the realistic JPEGs of bench.images (one class folder), sharded into tars of
``shard_size``; the encoder is a randomly initialised torchvision ResNet-18 at 112 px
(``torchvision:resnet18:none``: speed does not depend on the weights), on the CPU with the PIL
decoder. Each runner runs in its own child process: local first (shard with a pool of one
process per core, embed in that process), then Ray (a fresh one-machine cluster with one CPU
per core, as many actors as CPUs). The cluster's start is timed apart from the stages
(``ray_init_s``): a long-lived cluster pays it once. Both runs must give bit-identical
embeddings (``identical``), or the suite fails.

On one machine Ray cannot be faster than a local run that already uses every core; the ratio
says what the runner costs per stage (actor start-up: every actor imports torch and loads the
model; a task round trip per shard), which matters little once shards take seconds each.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

ENCODER = "torchvision:resnet18:none"


def _dataset(data_dir: Path, images: int) -> Path:
    from bench.images import make_realistic_jpegs

    folder = data_dir / f"ray-jpegs-{images}"
    make_realistic_jpegs(folder / "images", images)
    return folder


def measure(runner: str, folder: str, work_dir: str, shard_size: int, batch_size: int) -> dict:
    """One runner in this (child) process: seconds to shard ``folder``, then to embed it."""
    import numpy as np

    from filterx.io.dataset import Dataset
    from filterx.stages.embed import EmbedConfig, embed, read_embeddings
    from filterx.stages.shard import ShardConfig, shard

    cores = os.cpu_count() or 1
    out = Path(work_dir) / runner
    row = {"runner": runner}
    if runner == "ray":
        import ray

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False, object_store_memory=200 * 2**20)
        row["ray_init_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    s = shard(ShardConfig(Path(folder), out, shard_size=shard_size, workers=cores, quiet=True, runner=runner))
    row["shard_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    e = embed(EmbedConfig(out, ENCODER, backend="pil", device="cpu", batch_size=batch_size, workers=0, quiet=True,
                          runner=runner))
    row["embed_s"] = round(time.perf_counter() - t0, 2)
    ds = Dataset.open(out)
    emb = read_embeddings(ds, e.path.name.removesuffix(".zarr"))
    np.save(Path(work_dir) / f"{runner}.npy", emb)
    row.update(images=s.num_samples, shards=s.num_shards, embed_img_s=round(s.num_samples / row["embed_s"], 1))
    return row


def run(quick: bool = False, images: int | None = None, shard_size: int | None = None, batch_size: int = 32,
        data_dir: str | None = None) -> list[dict]:
    import numpy as np

    from bench.images import default_data_dir
    from bench.suite import run_child

    images = images or (192 if quick else 1024)
    shard_size = shard_size or (24 if quick else 64)
    folder = _dataset(Path(data_dir) if data_dir else default_data_dir(), images)
    work = Path(tempfile.mkdtemp(prefix="filterx-bench-ray-"))
    try:
        local = run_child("bench.bench_ray:measure", {"runner": "local", "folder": str(folder), "work_dir": str(work),
                                                      "shard_size": shard_size, "batch_size": batch_size})
        ray_ = run_child("bench.bench_ray:measure", {"runner": "ray", "folder": str(folder), "work_dir": str(work),
                                                     "shard_size": shard_size, "batch_size": batch_size})
        identical = bool(np.array_equal(np.load(work / "local.npy"), np.load(work / "ray.npy"), equal_nan=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not identical:
        raise RuntimeError("ray and local embeddings differ: the runner changed the output")
    rows = []
    for stage in ("shard", "embed"):
        rows.append({"stage": stage, "images": local["images"], "shards": local["shards"],
                     "local_s": local[f"{stage}_s"], "ray_s": ray_[f"{stage}_s"],
                     "ray/local": round(ray_[f"{stage}_s"] / local[f"{stage}_s"], 2),
                     "ray_init_s": ray_["ray_init_s"], "identical": identical})
    return rows


if __name__ == "__main__":
    import sys

    from bench.suite import format_table

    print(format_table(run(quick="--quick" in sys.argv)))
