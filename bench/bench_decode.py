"""Decode benchmark: images/s of JPEG decode + eval transform, against PIL full decode.

    python -m bench --suite decode [--quick]      (or: python bench/bench_decode.py [--quick])

Eval transform everywhere: resize the short side to round(R / 0.875), center crop R x R,
normalise to float32 (3, R, R). R = 224 and 112. Inputs: realistic ImageNet-like JPEGs
(bench.images; 300 with --quick, 2000 otherwise), in memory for the single-process decoders,
sharded with ``filterx.stages.shard`` (500 per tar) for the filterx loaders.

Configs (``CONFIGS``): PIL full decode + resize and PIL with DCT-domain scaling (``draft``),
torchvision ``decode_jpeg`` on a list of 64, each on one thread; the filterx loader end to end
with its dali / torchvision / pil backends on the CPU (2 workers; each call streams the shards
often enough for >= 1200 images, so the ~0.5 s start of a call is amortised); on CUDA, torchvision's
batched nvJPEG and the DALI ``mixed`` loader. Each (config, resolution) runs in its own child
process (its peak RSS is the row's memory; no decoder inherits another's thread pools or
caches), ``repeats`` times round robin; a row is the median img/s with its min..max and the
ratio to PIL full decode at the same resolution: the median over rounds of the ratio to that
round's PIL run (``bench.suite.paired_ratio``).
"""

from __future__ import annotations

import io
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REFERENCE = "pil-full"
RESOLUTIONS = (224, 112)
BATCH = 64


@dataclass(frozen=True)
class DecodeConfig:
    description: str
    threads: str  # what runs in parallel, for the table
    cuda: bool = False


CONFIGS: dict[str, DecodeConfig] = {
    "pil-full": DecodeConfig("PIL open + convert (full decode) + resize + crop", "1"),
    "pil-draft": DecodeConfig("PIL with draft (libjpeg DCT-domain scaling) + resize + crop", "1"),
    "tv-list": DecodeConfig("torchvision decode_jpeg(list of 64) + resize + crop", "1"),
    "loader-dali": DecodeConfig("filterx load_batches, backend dali, device cpu", "2 DALI threads"),
    "loader-torchvision": DecodeConfig("filterx load_batches, backend torchvision, device cpu",
                                       "2 workers"),
    "loader-pil": DecodeConfig("filterx load_batches, backend pil (draft), device cpu", "2 workers"),
    "tv-nvjpeg": DecodeConfig("torchvision decode_jpeg(list of 64, device=cuda) + GPU resize",
                              "GPU", cuda=True),
    "loader-dali-mixed": DecodeConfig("filterx load_batches, backend dali, device cuda (nvJPEG)",
                                      "GPU + 2 threads", cuda=True),
}


# ---------------------------------------------------------------- inputs (parent process)


def prepare_inputs(n: int, seed: int = 0, data_dir: Path | None = None,
                   shards: bool = True) -> tuple[Path, list[Path]]:
    """``n`` realistic JPEGs in an ImageFolder class dir and (``shards``) the same images
    sharded with ``filterx.stages.shard``.

    Both are cached under the data dir, keyed by n, seed and generator version. Returns the
    JPEG directory and the shard tars (empty without ``shards``).
    """
    from bench.images import GENERATOR_VERSION, default_data_dir, make_realistic_jpegs
    from filterx.io import dataset
    from filterx.stages.shard import ShardConfig, shard

    root = Path(data_dir) if data_dir else default_data_dir()
    base = root / f"decode-n{n}-s{seed}-v{GENERATOR_VERSION}"
    jpeg_dir = base / "imagefolder" / "photos"
    make_realistic_jpegs(jpeg_dir, n, seed)
    out = base / "dataset"
    if not shards:
        return jpeg_dir, []
    if not dataset.is_dataset(out):
        shard(ShardConfig(src=jpeg_dir.parent, out=out, shard_size=500, workers=2, quiet=True))
    tars = sorted((out / dataset.SHARDS).glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"sharding {jpeg_dir.parent} left no tars in {out / dataset.SHARDS}")
    return jpeg_dir, tars


# ---------------------------------------------------------------- measurement (child process)


def _pil_eval(data: bytes, r: int, draft: bool):
    """uint8 (R, R, 3) numpy through PIL; ``draft`` lets libjpeg decode at 1/2, 1/4 or 1/8."""
    import numpy as np
    from PIL import Image

    s = round(r / 0.875)
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if draft:
            im.draft("RGB", (max(1, w * s // min(w, h)), max(1, h * s // min(w, h))))
        im = im.convert("RGB")
        w, h = im.size
        nw, nh = (s, max(s, round(h * s / w))) if w <= h else (max(s, round(w * s / h)), s)
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - r) // 2, (nh - r) // 2
        return np.asarray(im.crop((left, top, left + r, top + r)))


def _normalize(u8_bchw):
    import torch

    from filterx.decode.loader import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=u8_bchw.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=u8_bchw.device).view(1, 3, 1, 1) * 255
    return (u8_bchw.float() - mean) / std


def _list_batches(config: str, datas: list[bytes], r: int):
    """Yield normalised float32 (B, 3, R, R) batches of ``datas`` with a single-process decoder."""
    import numpy as np
    import torch

    if config in ("pil-full", "pil-draft"):
        for i in range(0, len(datas), BATCH):
            arr = np.stack([_pil_eval(d, r, config == "pil-draft") for d in datas[i:i + BATCH]])
            yield _normalize(torch.from_numpy(arr).permute(0, 3, 1, 2))
        return
    import torchvision.transforms.v2.functional as TF
    from torchvision.io import ImageReadMode, decode_jpeg

    device = "cuda" if config == "tv-nvjpeg" else "cpu"
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    for i in range(0, len(tensors), BATCH):
        images = decode_jpeg(tensors[i:i + BATCH], mode=ImageReadMode.RGB, device=device)
        images = [TF.center_crop(TF.resize(im, [round(r / 0.875)], antialias=True), [r, r])
                  for im in images]
        yield _normalize(torch.stack(images))


def measure(config: str, resolution: int, jpeg_dir: str, tars: list[str], n: int,
            workers: int = 2, loader_images: int = 0) -> dict:
    """Time one config after an untimed warm-up; runs in a child process (``run_child``).

    The single-process decoders decode the ``n`` images once; the loaders read the shards
    ``ceil(loader_images / n)`` times in one ``load_batches`` call, so that the per-call start
    (worker processes, DALI pipeline build: ~0.5 s) weighs on a 300-image quick run no more
    than on an epoch of thousands. Returns img_s (end to end, start included), first_batch_s,
    seconds, images and out_mean (the mean of every output value: the same images through the
    same transform give nearly the same mean, so a config that decodes something else shows).
    """
    import torch

    from bench.suite import current_rss_mb
    from filterx.decode.loader import LoaderConfig, load_batches

    if config not in CONFIGS:
        raise ValueError(f"unknown decode config {config!r}; valid: {', '.join(CONFIGS)}")
    # Imported here, before any loader worker is forked: the loader imports them lazily inside
    # its workers, which costs every epoch's fresh workers seconds (not what a long epoch pays).
    import torchvision.io  # noqa: F401
    import torchvision.transforms.v2.functional  # noqa: F401
    from PIL import Image  # noqa: F401

    cuda = CONFIGS[config].cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base_rss = current_rss_mb()  # after imports, before any input or decoder is loaded
    if config.startswith("loader-"):
        backend = config.split("-")[1]
        cfg = LoaderConfig(resolution, backend=backend, device="cuda" if cuda else "cpu",
                           batch_size=BATCH, workers=workers)
        for _ in load_batches(tars[:1], cfg):  # warm-up: library loading, page cache
            pass
        stream = list(tars) * max(1, -(-loader_images // n))

        def batches():
            return (b.images for b in load_batches(stream, cfg))
    else:
        torch.set_num_threads(1)
        datas = [p.read_bytes() for p in sorted(Path(jpeg_dir).glob("img_*.jpg"))[:n]]
        for _ in _list_batches(config, datas[:BATCH], resolution):
            pass

        def batches():
            return _list_batches(config, datas, resolution)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    count, total, first = 0, 0.0, None
    t0 = time.perf_counter()
    for images in batches():
        count += images.shape[0]
        total += float(images.sum(dtype=torch.float64))
        first = first if first is not None else time.perf_counter() - t0
    sync()
    seconds = time.perf_counter() - t0
    out = {"img_s": count / seconds, "first_batch_s": first, "seconds": seconds, "images": count,
           "out_mean": total / max(1, count * 3 * resolution * resolution), "base_rss_mb": base_rss}
    if cuda:
        out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


# ---------------------------------------------------------------- suite


def run(quick: bool, images: int | None = None, repeats: int = 3, resolutions=None,
        configs=None, seed: int = 0, workers: int = 2, loader_images: int = 1200) -> list[dict]:
    """Rows: config, resolution, img/s (median of ``repeats`` interleaved runs), min..max, x vs
    PIL full decode (median over rounds of the ratio to the same round's PIL run), peak RSS.

    ``configs`` / ``resolutions`` may be comma-separated strings; CUDA configs run only where
    CUDA is available; the reference config is always included.
    """
    import torch

    from bench.suite import option_tuple, paired_ratio, round_robin, summarize_runs

    n = images or (300 if quick else 2000)
    res = option_tuple(resolutions, int) or RESOLUTIONS
    names = option_tuple(configs) or tuple(CONFIGS)
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        raise ValueError(f"unknown decode config {', '.join(bad)}; valid: {', '.join(CONFIGS)}")
    names = tuple(dict.fromkeys((REFERENCE, *names)))
    if not torch.cuda.is_available():
        names = tuple(c for c in names if not CONFIGS[c].cuda)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")

    t0 = time.perf_counter()
    jpeg_dir, tars = prepare_inputs(n, seed, shards=any(c.startswith("loader-") for c in names))
    print(f"decode: {n} images ready in {time.perf_counter() - t0:.1f}s: {_describe(jpeg_dir, n)}",
          flush=True)
    jobs = {f"{c}@{r}": ("bench.bench_decode:measure",
                         dict(config=c, resolution=r, jpeg_dir=str(jpeg_dir),
                              tars=[str(t) for t in tars], n=n, workers=workers,
                              loader_images=loader_images))
            for r in res for c in names}
    runs = round_robin(jobs, repeats)

    rows = []
    for r in res:
        ref_runs = runs[f"{REFERENCE}@{r}"]
        for c in names:
            s = summarize_runs(runs[f"{c}@{r}"])
            ok = [x for x in runs[f"{c}@{r}"] if "img_s" in x]
            row = {"config": c, "res": r, "threads": CONFIGS[c].threads,
                   "images": ok[0]["images"] if ok else None, "img_s": s["img_s"],
                   "range": f"{s['img_s_min']:.0f}-{s['img_s_max']:.0f}" if ok else "-",
                   "x_vs_pil_full": paired_ratio(runs[f"{c}@{r}"], ref_runs),
                   "first_batch_s": statistics.median(x["first_batch_s"] for x in ok) if ok else None,
                   "peak_rss_mb": s.get("peak_rss_mb"), "rss_added_mb": s.get("rss_added_mb"),
                   "out_mean": round(ok[0]["out_mean"], 4) if ok else None}
            if CONFIGS[c].cuda and ok:
                row["gpu_peak_mb"] = max(x.get("gpu_peak_mb", 0.0) for x in ok)
            if "error" in s:
                row["error"] = s["error"]
            rows.append(row)
    return rows


def _describe(jpeg_dir: Path, n: int) -> str:
    from bench.images import describe_jpegs, format_description

    return format_description(describe_jpegs(sorted(jpeg_dir.glob("img_*.jpg"))[:n]))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.suite import format_table

    print(format_table(run("--quick" in sys.argv)))
