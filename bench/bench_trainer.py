"""Trainer benchmark: pre-training img/s on in-memory batches, of the train loader alone, and
end to end from shards.

    python -m bench --suite trainer [--quick]      (or: python bench/bench_trainer.py [--quick])

For each (model, resolution) three jobs run, each in its own child process (its own peak
memory), ``repeats`` times round robin:

- ``step``: ``filterx.train.common.supervised_step`` (the pretrain loop's forward, float32
  cross-entropy, backward, SGD with momentum and weight decay; bf16 autocast and channels_last
  on CUDA) on one random batch kept on the device: the compute ceiling, no decode;
- ``decode``: ``filterx.decode.loader.load_batches`` with the training transform (random resized crop
  + flip, shuffled), nothing else: the input ceiling;
- ``e2e``: ``filterx.train.pretrain.pretrain`` itself on a dataset dir of the same images, two epochs;
  the figure is the second epoch's img/s as pretrain logs it (loader + steps; the first epoch
  carries the warm-up, checkpoint writes are outside the timed loop).

On the CPU the loader and the network share the same cores, so ``e2e`` is at best about
1 / (1/step + 1/decode); ``e2e_x_of_step`` says how much of the compute ceiling the trainer
keeps. Inputs are the realistic JPEGs of bench.images (ImageNet-like sizes and file sizes),
sharded: 32 with --quick, 256 otherwise, in batches of 8 / 32 on the CPU; 1024 / 4096 in
batches of 128 / 256 on CUDA. ``run(quick)`` returns the rows; the script prints
them as a table and writes no files (``python -m bench`` writes the results files).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

MODELS = ("resnet18", "resnet50", "alexnet_lrn")
RESOLUTIONS = (112, 224)
JOBS = ("step", "decode", "e2e")


def measure(job: str, arch: str, resolution: int, batch: int, steps: int, dataset: str,
            device: str = "cpu", backend: str = "auto", workers: int = 2) -> dict:
    """One job in a child process; returns img_s, seconds, images, base_rss_mb (RSS after
    imports and set-up) and, on CUDA, gpu_peak_mb."""
    import torch

    from bench.suite import current_rss_mb

    if job not in JOBS:
        raise ValueError(f"unknown trainer job {job!r}; valid: {', '.join(JOBS)}")
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if job == "step":
        out = _measure_step(arch, resolution, batch, steps, device, sync, current_rss_mb)
    elif job == "decode":
        out = _measure_decode(resolution, batch, dataset, device, backend, workers, sync, current_rss_mb)
    else:
        out = _measure_e2e(arch, resolution, batch, dataset, device, backend, workers, current_rss_mb)
    out["torch_threads"] = torch.get_num_threads()
    if cuda:
        out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _measure_step(arch, resolution, batch, steps, device, sync, rss) -> dict:
    import torch

    from filterx.models.archs import build_model
    from filterx.train.common import Runtime, prepare_model, supervised_step

    rt = Runtime(device)
    torch.manual_seed(0)
    model = prepare_model(build_model(arch, 1000), rt, sync_bn=False).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, resolution, resolution, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if rt.cuda else x
    y = torch.randint(0, 1000, (batch,), device=device)
    base = rss()
    supervised_step(model, opt, x, y, rt)  # warm-up: allocations, kernel selection
    if rt.cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss, _ = supervised_step(model, opt, x, y, rt)
    sync()
    seconds = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise RuntimeError(f"{arch} at {resolution}: the loss is not finite")
    return {"img_s": steps * batch / seconds, "seconds": seconds, "images": steps * batch, "base_rss_mb": base}


def _measure_decode(resolution, batch, dataset, device, backend, workers, sync, rss) -> dict:
    import torchvision.io  # noqa: F401  (imported before loader workers fork)
    import torchvision.transforms.v2.functional  # noqa: F401

    from filterx.io.dataset import Dataset
    from filterx.decode.loader import LoaderConfig, load_batches
    from filterx.decode.loader import resolve_backend

    tars = Dataset.open(dataset).tar_paths()
    backend = resolve_backend(backend)
    base = rss()
    for epoch in range(2):  # the first pass warms up (pipeline build, page cache); the second is timed
        cfg = LoaderConfig(resolution, backend=backend, device=device, batch_size=batch, workers=workers,
                           train=True, shuffle=True, epoch=epoch)
        count = 0
        t0 = time.perf_counter()
        for b in load_batches(tars, cfg):
            count += len(b.ids)
        sync()
        seconds = time.perf_counter() - t0
    return {"img_s": count / seconds, "seconds": seconds, "images": count, "base_rss_mb": base,
            "backend": backend}


def _measure_e2e(arch, resolution, batch, dataset, device, backend, workers, rss) -> dict:
    from filterx.train.pretrain import PretrainConfig, pretrain
    from filterx.decode.loader import resolve_backend

    base = rss()
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as out:
        s = pretrain(PretrainConfig(data=Path(dataset), out=Path(out) / "run", arch=arch, resolution=resolution,
                                    epochs=2, batch_size=batch, workers=workers, backend=backend,
                                    device=device, quiet=True))
    last = s.history[-1]
    return {"img_s": last["img_s"], "seconds": last["seconds"], "images": last["images"], "base_rss_mb": base,
            "backend": resolve_backend(backend)}


def _as_tuple(value, cast=str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(cast(v) for v in value)
    return tuple(cast(v) for v in str(value).split(",") if v.strip())


def run(quick: bool, images: int | None = None, batch: int | None = None, steps: int | None = None,
        repeats: int | None = None, models=None, resolutions=None, jobs=None, backend: str = "auto",
        device: str = "auto", workers: int = 2, seed: int = 0) -> list[dict]:
    """One row per (model, resolution): step / decode / e2e img/s (medians of ``repeats``
    interleaved runs), e2e as a share of each ceiling, and peak memory of the step and e2e jobs."""
    import torch

    from bench.bench_decode import prepare_inputs
    from bench.suite import round_robin, summarize_runs

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    n = images or ((1024 if quick else 4096) if cuda else (32 if quick else 256))
    batch = batch or ((128 if quick else 256) if cuda else (8 if quick else 32))
    steps = steps or ((10 if quick else 50) if cuda else (3 if quick else 10))
    repeats = repeats or (1 if quick else 3)
    archs = _as_tuple(models) or MODELS
    res = _as_tuple(resolutions, int) or RESOLUTIONS
    which = _as_tuple(jobs) or JOBS
    for name, got, valid in (("model", archs, MODELS), ("job", which, JOBS)):
        bad = [g for g in got if g not in valid]
        if bad:
            raise ValueError(f"unknown {name} {', '.join(bad)}; valid: {', '.join(valid)}")
    if n < 2 * batch and "e2e" in which:
        raise ValueError(f"e2e needs at least two batches of images: {n} images, batch {batch}")

    _, tars = prepare_inputs(n, seed)
    dataset = str(Path(tars[0]).parent.parent)
    todo = {f"{job}:{a}@{r}": ("bench.bench_trainer:measure",
                               dict(job=job, arch=a, resolution=r, batch=batch, steps=steps, dataset=dataset,
                                    device=device, backend=backend, workers=workers))
            for a in archs for r in res for job in which
            if not (job == "decode" and a != archs[0])}  # decode does not depend on the model
    runs = round_robin(todo, repeats)

    rows = []
    for a in archs:
        for r in res:
            s = {job: summarize_runs(runs[f"{job}:{a if job != 'decode' else archs[0]}@{r}"]) for job in which}
            img = {job: s[job]["img_s"] for job in which}
            row = {"model": a, "res": r, "device": device, "batch": batch}
            e2e_ok = [x for x in runs.get(f"e2e:{a}@{r}", []) if "img_s" in x]
            if e2e_ok:
                row["backend"] = e2e_ok[0]["backend"]
            for job in which:
                row[f"{job}_img_s"] = img[job]
            if img.get("e2e") and img.get("step"):
                row["e2e_x_of_step"] = img["e2e"] / img["step"]
            if img.get("e2e") and img.get("decode"):
                row["e2e_x_of_decode"] = img["e2e"] / img["decode"]
            for job in ("step", "e2e"):
                if job in s:
                    row[f"{job}_peak_rss_mb"] = s[job].get("peak_rss_mb")
                    ok = [x for x in runs[f"{job}:{a}@{r}"] if "gpu_peak_mb" in x]
                    if ok:
                        row[f"{job}_gpu_peak_mb"] = max(x["gpu_peak_mb"] for x in ok)
            if "step" in s:
                row["step_rss_added_mb"] = s["step"].get("rss_added_mb")
            errors = [f"{j}: {s[j]['error']}" for j in which if "error" in s[j]]
            if errors:
                row["error"] = "; ".join(errors)
            rows.append(row)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.suite import format_table

    print(format_table(run("--quick" in sys.argv)))
