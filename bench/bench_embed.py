"""Embed benchmark: decode + ResNet embedding img/s against decode alone and the model alone.

    python -m bench --suite embed [--quick]      (or: python bench/bench_embed.py [--quick])

For each (model, resolution) three jobs run, each in its own child process, ``repeats`` times
round robin:

- ``decode``: ``filterx.decode.loader.load_batches`` over the shards (eval transform), nothing else;
- ``model``: the embedding network on batches already in memory (no decode);
- ``embed``: both, as the embed stage runs them: batches from the loader into the network.

The network is a torchvision ResNet (weights=None: speed does not depend on the weights) with
its classifier replaced by the identity, so it returns the pooled features (B, 512 | 2048),
in eval mode under ``torch.inference_mode``; on CUDA in bf16 autocast with channels_last.
``embed / decode`` says how close the pipeline runs to its decode ceiling, ``embed / model``
how close to its compute ceiling. On the CPU both stages share the same cores, so the end to
end rate is at best about 1 / (1/decode + 1/model).

Inputs are the realistic JPEGs of bench.images, sharded (the decode benchmark's cache): 256
read twice with --quick (resnet18 at 112 only), 512 read once otherwise.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

MODELS = ("resnet18", "resnet50")
RESOLUTIONS = (112, 224)
JOBS = ("decode", "model", "embed")
BATCH = 64


def build_embedder(arch: str, device: str):
    """A torchvision ResNet (random weights) returning pooled features, in eval mode on
    ``device`` (channels_last on CUDA)."""
    import torch
    import torchvision

    if arch not in MODELS:
        raise ValueError(f"unknown model {arch!r}; valid: {', '.join(MODELS)}")
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = torch.nn.Identity()
    model = model.eval().to(device)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    return model


def _embed_batch(model, images, device: str):
    """(B, 3, R, R) float32 -> (B, D) features on ``device``."""
    import torch

    with torch.inference_mode():
        x = images.to(device, non_blocking=True)
        if device.startswith("cuda"):
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(x)
        return model(x)


def measure(job: str, arch: str, resolution: int, tars: list[str], passes: int,
            backend: str = "auto", device: str = "cpu", workers: int = 2, threads: int = 0) -> dict:
    """Time one job over ``passes`` passes of the shards after an untimed warm-up (one loader
    pass over the first shard, one forward pass); runs in a child process. ``threads``: torch
    intra-op threads of the process running the network (0: torch's default, one per core).
    Returns img_s, seconds, images, base_rss_mb and, on CUDA, gpu_peak_mb."""
    import torch

    from bench.suite import current_rss_mb
    from filterx.decode.loader import LoaderConfig, load_batches, resolve_backend

    if job not in JOBS:
        raise ValueError(f"unknown embed job {job!r}; valid: {', '.join(JOBS)}")
    # imported before loader workers are forked (the loader imports them lazily in workers)
    import torchvision.io  # noqa: F401
    import torchvision.transforms.v2.functional  # noqa: F401

    if threads:
        torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base_rss = current_rss_mb()
    cfg = LoaderConfig(resolution, backend=backend, device=device, batch_size=BATCH,
                       workers=workers)
    stream = list(tars) * passes
    model = build_embedder(arch, device) if job != "decode" else None
    if job != "model":
        for _ in load_batches(tars[:1], cfg):
            pass
    if model is not None:
        _embed_batch(model, torch.zeros(BATCH, 3, resolution, resolution), device)

    if job == "model":
        from filterx.decode.loader import sample_refs

        total = len(sample_refs([Path(t) for t in stream]))
        x = torch.randn(BATCH, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
        sizes = [min(BATCH, total - i) for i in range(0, total, BATCH)]

        def batches():
            return (x[:b] for b in sizes)
    else:
        def batches():
            return (b.images for b in load_batches(stream, cfg))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    count = 0
    t0 = time.perf_counter()
    for images in batches():
        if model is not None:
            feats = _embed_batch(model, images, device)
        count += images.shape[0]
    sync()
    seconds = time.perf_counter() - t0
    out = {"img_s": count / seconds, "seconds": seconds, "images": count,
           "base_rss_mb": base_rss, "backend": resolve_backend(backend),
           "torch_threads": torch.get_num_threads()}
    if model is not None:
        out["feature_dim"] = int(feats.shape[1])
    if cuda:
        out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def run(quick: bool, images: int | None = None, passes: int | None = None, repeats: int = 3,
        models=None, resolutions=None, backend: str = "auto", device: str = "auto",
        workers: int = 2, threads: int = 0, seed: int = 0) -> list[dict]:
    """One row per (model, resolution): decode / model / embed img/s (medians of ``repeats``
    interleaved runs), embed as a share of each ceiling (median over rounds of the ratio to the
    same round's run), and the embed job's peak memory."""
    import torch

    from bench.bench_decode import prepare_inputs
    from bench.suite import option_tuple, paired_ratio, round_robin, summarize_runs

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    n = images or (256 if quick else 512)
    passes = passes or (2 if quick else 1)
    archs = option_tuple(models) or (("resnet18",) if quick else MODELS)
    res = option_tuple(resolutions, int) or ((112,) if quick else RESOLUTIONS)
    bad = [a for a in archs if a not in MODELS]
    if bad:
        raise ValueError(f"unknown model {', '.join(bad)}; valid: {', '.join(MODELS)}")
    if repeats < 1 or passes < 1:
        raise ValueError(f"repeats and passes must be >= 1, got {repeats} and {passes}")

    _, tars = prepare_inputs(n, seed)
    jobs = {f"{job}:{a}@{r}": ("bench.bench_embed:measure",
                               dict(job=job, arch=a, resolution=r, tars=[str(t) for t in tars],
                                    passes=passes, backend=backend, device=device,
                                    workers=workers, threads=threads))
            for a in archs for r in res for job in JOBS}
    runs = round_robin(jobs, repeats)

    rows = []
    for a in archs:
        for r in res:
            s = {job: summarize_runs(runs[f"{job}:{a}@{r}"]) for job in JOBS}
            emb_ok = [x for x in runs[f"embed:{a}@{r}"] if "img_s" in x]
            dec, mod, emb = (s[j]["img_s"] for j in JOBS)
            row = {"model": a, "res": r, "device": device,
                   "backend": emb_ok[0]["backend"] if emb_ok else backend,
                   "torch_threads": emb_ok[0]["torch_threads"] if emb_ok else None,
                   "images": emb_ok[0]["images"] if emb_ok else None,
                   "decode_img_s": dec, "model_img_s": mod, "embed_img_s": emb,
                   "embed_x_of_decode": paired_ratio(runs[f"embed:{a}@{r}"], runs[f"decode:{a}@{r}"]),
                   "embed_x_of_model": paired_ratio(runs[f"embed:{a}@{r}"], runs[f"model:{a}@{r}"]),
                   "embed_range": (f"{s['embed']['img_s_min']:.0f}-{s['embed']['img_s_max']:.0f}"
                                   if emb_ok else "-"),
                   "peak_rss_mb": s["embed"].get("peak_rss_mb"),
                   "rss_added_mb": s["embed"].get("rss_added_mb")}
            if emb_ok and "gpu_peak_mb" in emb_ok[0]:
                row["gpu_peak_mb"] = max(x["gpu_peak_mb"] for x in emb_ok)
            errors = [f"{j}: {s[j]['error']}" for j in JOBS if "error" in s[j]]
            if errors:
                row["error"] = "; ".join(errors)
            rows.append(row)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.suite import format_table

    print(format_table(run("--quick" in sys.argv)))
