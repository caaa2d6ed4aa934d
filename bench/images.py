"""Realistic benchmark JPEGs: ImageNet-like sizes and file sizes, made from real photos.

Decode speed depends on what is decoded: pixel count, chroma subsampling and, through the
Huffman stage, the number of compressed bytes. Flat or random-noise images get both wrong,
so the decode benchmark runs on crops of the photos that scikit-image ships:

- sizes drawn around ImageNet's typical 400x350 .. 500x375 (landscape, ~15% portrait);
- a random crop of a random photo, scaled to that size (mostly a downscale, which keeps the
  photo's detail), a random horizontal flip, mild colour jitter (per-channel gain, brightness,
  saturation);
- a camera-like finish: mild unsharp masking and sensor grain (sigma 3-5.5 grey levels).
  The skimage photos are small and already compressed, hence smoother than camera output;
  without this the files come out at ~40 KB instead of ImageNet's ~110 KB;
- JPEG quality 92-97 with 4:2:0 chroma subsampling (4:4:4 for 30% of the images), the mix
  found in ImageNet's Flickr photos. Quality 90 and 4:2:0 only gave a ~75 KB mean; with these
  settings 300 images come out at ~110 KB mean (p10 ~55, p90 ~170: the smooth photos, moon,
  clock, colorwheel, retina, stay small, as ImageNet's plain-background shots do).

Image ``i`` depends only on ``(seed, i)``, so a larger set extends a smaller one and a cache
directory is reused across runs (``python -m bench.images DIR --n 300`` prints the size and
byte distribution).
"""

from __future__ import annotations

import argparse
import io
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

GENERATOR_VERSION = 1  # bump when the recipe changes: cached images are then regenerated
STAMP = ".realistic_jpegs.json"
COLOR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field",
                "immunohistochemistry", "retina", "colorwheel", "motorcycle_left",
                "motorcycle_right")
GRAY_PHOTOS = ("camera", "moon", "coins", "clock", "brick", "grass", "gravel")
PHOTOS = COLOR_PHOTOS + GRAY_PHOTOS
WIDTH_RANGE = (400, 500)  # long side
ASPECT_RANGE = (0.70, 0.90)  # short side / long side
QUALITY_RANGE = (92, 97)


def default_data_dir() -> Path:
    """Where benchmark inputs are cached: $FILTERX_BENCH_DATA or ~/.cache/filterx-bench."""
    env = os.environ.get("FILTERX_BENCH_DATA")
    return Path(env) if env else Path.home() / ".cache" / "filterx-bench"


@lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One of ``PHOTOS`` as uint8 (H, W, 3); grayscale photos are repeated to three channels."""
    import skimage.data as data

    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; valid: {', '.join(PHOTOS)}")
    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        img = left if name.endswith("left") else right
    else:
        img = getattr(data, name)()
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3], dtype=np.uint8)


def realistic_jpeg(seed: int, index: int) -> bytes:
    """The JPEG bytes of image ``index`` of the set made with ``seed`` (deterministic)."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng([seed, index, GENERATOR_VERSION])
    photo = load_photo(PHOTOS[int(rng.integers(len(PHOTOS)))])
    ph, pw = photo.shape[:2]
    long_side = int(rng.integers(WIDTH_RANGE[0], WIDTH_RANGE[1] + 1))
    w, h = long_side, int(round(long_side * rng.uniform(*ASPECT_RANGE)))
    if rng.random() < 0.15:
        w, h = h, w
    # crop = output size * scale; scale > 1 downscales (keeps detail), < 1 upscales a small
    # photo (smoother, smaller files); bounded by the photo itself
    max_scale = min(pw / w, ph / h)
    scale = min(max_scale, rng.uniform(0.8, 1.8))
    cw, ch = min(pw, max(16, round(w * scale))), min(ph, max(16, round(h * scale)))
    x, y = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
    img = Image.fromarray(photo).resize((w, h), Image.BICUBIC, box=(x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = img.filter(ImageFilter.UnsharpMask(radius=2, percent=int(rng.integers(150, 251)),
                                             threshold=2))
    arr = np.asarray(img, dtype=np.float32)
    gray = arr.mean(axis=2, keepdims=True)
    saturation = rng.uniform(0.85, 1.15)
    arr = gray + (arr - gray) * saturation
    arr = arr * rng.uniform(0.92, 1.08, size=3) + rng.uniform(-12, 12)
    arr += rng.normal(0.0, rng.uniform(3.0, 5.5), size=arr.shape)
    img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    quality = int(rng.integers(QUALITY_RANGE[0], QUALITY_RANGE[1] + 1))
    subsampling = 0 if rng.random() < 0.3 else 2  # 0: 4:4:4, 2: 4:2:0
    img.save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def make_realistic_jpegs(out_dir: str | Path, n: int, seed: int = 0) -> list[Path]:
    """Write ``n`` realistic JPEGs as ``out_dir/img_NNNNNN.jpg``; return their paths in order.

    Images already there from the same seed and recipe are kept (a cache); others of the
    name pattern, beyond ``n`` or from another seed, are removed, so that ``out_dir`` can serve
    as one class folder of an ImageFolder tree.
    """
    from filterx.io import atomic

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / STAMP
    want = {"seed": int(seed), "version": GENERATOR_VERSION}
    cached = stamp.is_file() and json.loads(stamp.read_text()) == want
    paths = [out / f"img_{i:06d}.jpg" for i in range(n)]
    keep = set(paths) if cached else set()
    for p in out.glob("img_*.jpg"):
        if p not in keep:
            p.unlink()
    atomic.write_text(stamp, json.dumps(want))
    for i, p in enumerate(paths):
        if not p.is_file():
            atomic.write_bytes(p, realistic_jpeg(seed, i))
    return paths


def describe_jpegs(paths: list[Path]) -> dict:
    """Size and byte distribution of JPEG files: count, mean/min/max bytes, percentiles, sizes."""
    from PIL import Image

    sizes = np.array([p.stat().st_size for p in paths], dtype=np.float64)
    dims = []
    for p in paths:
        with Image.open(p) as im:
            dims.append(im.size)
    wh = np.array(dims, dtype=np.float64)
    return {
        "count": len(paths),
        "kb_mean": float(sizes.mean() / 1e3),
        "kb_p10": float(np.percentile(sizes, 10) / 1e3),
        "kb_median": float(np.median(sizes) / 1e3),
        "kb_p90": float(np.percentile(sizes, 90) / 1e3),
        "width_mean": float(wh[:, 0].mean()),
        "height_mean": float(wh[:, 1].mean()),
        "megapixels_mean": float((wh[:, 0] * wh[:, 1]).mean() / 1e6),
    }


def format_description(d: dict) -> str:
    return (f"{d['count']} JPEGs, {d['kb_mean']:.0f} KB mean (p10 {d['kb_p10']:.0f}, median "
            f"{d['kb_median']:.0f}, p90 {d['kb_p90']:.0f}), {d['width_mean']:.0f}x"
            f"{d['height_mean']:.0f} px mean")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = make_realistic_jpegs(args.out_dir, args.n, args.seed)
    print(format_description(describe_jpegs(paths)))


if __name__ == "__main__":
    main()
