"""Built-in sample data: a small source pool and target where the relevant part is known.

Everything is made from what scikit-learn and scikit-image ship (no downloads):

- pool ``digits``: the handwritten digits of ``sklearn.datasets.load_digits`` (one half of
  them), upscaled and drawn as dark ink on light paper of random tints, with random shifts,
  rotations and noise; one class per digit 0-9;
- pool ``photos``: random crops, scales, flips and colour jitter of real photos from
  ``skimage.data`` (astronaut, coffee, cat, rocket, ...); one class per photo;
- pool ``textures``: procedural gratings, checkerboards, dots and rings; one class per kind;
- target: digits 0-4 from the *other* half of the digits, as if photographed by another
  camera (blurred strokes, coloured ink on tinted paper, lower contrast, more sensor noise):
  the same classes as five pool classes, a shifted domain, no image in common.

An earlier version drew the target as light ink on saturated backgrounds (inverted
polarity). An encoder trained on that target alone put the pool's dark-on-light digits
further away than photos, so no embedding-based method could find them: "relevant" has to
mean related in appearance, as ImageNet's mugs are to Office-31's.

Two relevant parts are known: the images of the target's classes (pool digits 0-4), and the
images of the target's domain (all pool digits, handwritten like the target). A filtering
method's precision is the share of its selection that falls in either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel", "stereo_motorcycle")
TEXTURES = ("stripes", "grating", "checker", "dots", "rings", "noise_blobs", "plaid",
            "zigzag", "gradient", "speckle")
TARGET_DIGITS = (0, 1, 2, 3, 4)
DIGIT_STYLES = ("paper", "camera")  # the pool's default style; the target's style


@dataclass(frozen=True)
class SampleData:
    source: Path  # ImageFolder tree
    target: Path  # ImageFolder tree
    relevant_classes: tuple[str, ...]  # pool classes that are the target's classes
    domain_classes: tuple[str, ...] = ()  # pool classes of the target's domain (a superset)


def make_sample_data(out: str | Path, *, per_class: int = 100, target_per_class: int = 60,
                     digits: bool = True, photos: int = len(PHOTOS), textures: int = len(TEXTURES),
                     size_range: tuple[int, int] = (64, 96), seed: int = 0, quality: int = 90,
                     digit_style: str = "paper", pool_digits: tuple[int, ...] = tuple(range(10)),
                     digits_per_class: int | None = None) -> SampleData:
    """Write the sample pool and target as JPEG ImageFolder trees under ``out``.

    ``out/source/<class>/*.jpg`` and ``out/target/<class>/*.jpg``; a ``sample_data.json``
    beside them records the relevant classes. Deterministic for a given seed.

    ``digit_style``: how the pool digits are drawn, "paper" (the default: dark ink on light
    paper) or "camera" (the target's style; still from the pool's half of the handwriting, so
    no image in common with the target). ``pool_digits``: which digit classes the pool has;
    ``digits_per_class``: images per pool digit class (default ``per_class``). The digit split
    depends on the seed only, so pools made with other values of these and a target made by
    another call with the same seed never share a handwritten glyph.
    """
    from PIL import Image

    if digit_style not in DIGIT_STYLES:
        raise ValueError(f"unknown digit_style {digit_style!r}; valid: {', '.join(DIGIT_STYLES)}")
    bad = [d for d in pool_digits if d not in range(10)]
    if bad:
        raise ValueError(f"pool_digits must lie in 0-9, got {bad}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    pool_bank, target_bank = _split_digits(rng)

    def save(arr: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path, format="JPEG", quality=quality)

    def size() -> int:
        return int(rng.integers(size_range[0], size_range[1] + 1))

    if digits:
        for d in pool_digits:
            for i in range(per_class if digits_per_class is None else digits_per_class):
                save(_render_digit(pool_bank[d], rng, size(), style=digit_style),
                     out / "source" / f"digit_{d}" / f"d{d}_{i:04d}.jpg")
    for name in PHOTOS[:photos]:
        photo = _photo(name)
        for i in range(per_class):
            save(_photo_crop(photo, rng, size()), out / "source" / f"photo_{name}" / f"{name}_{i:04d}.jpg")
    for kind in TEXTURES[:textures]:
        for i in range(per_class):
            save(_texture(kind, rng, size()), out / "source" / f"texture_{kind}" / f"{kind}_{i:04d}.jpg")
    for d in TARGET_DIGITS:
        for i in range(target_per_class):
            save(_render_digit(target_bank[d], rng, size(), style="camera"),
                 out / "target" / f"digit_{d}" / f"t{d}_{i:04d}.jpg")
    relevant = tuple(f"digit_{d}" for d in TARGET_DIGITS if d in pool_digits) if digits else ()
    domain = tuple(f"digit_{d}" for d in pool_digits) if digits else ()
    (out / "sample_data.json").write_text(json.dumps(
        {"relevant_classes": list(relevant), "domain_classes": list(domain), "seed": seed}))
    return SampleData(out / "source", out / "target", relevant, domain)


def _split_digits(rng: np.random.Generator) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """The sklearn digits (8x8, values 0-16) split in two disjoint halves per class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pool, target = {}, {}
    for c in range(10):
        imgs = d.images[d.target == c][rng.permutation(int((d.target == c).sum()))]
        half = len(imgs) // 2
        pool[c], target[c] = imgs[:half], imgs[half:]
    return pool, target


def _render_digit(bank: np.ndarray, rng: np.random.Generator, size: int, style: str) -> np.ndarray:
    from scipy import ndimage

    glyph = bank[rng.integers(len(bank))] / 16.0
    canvas = np.zeros((12, 12))
    oy, ox = rng.integers(0, 5, size=2)
    canvas[oy : oy + 8, ox : ox + 8] = glyph
    canvas = ndimage.rotate(canvas, rng.uniform(-15, 15), reshape=False, order=1)
    ink = np.clip(ndimage.zoom(canvas, size / 12.0, order=3), 0, 1)[:size, :size]
    if style == "paper":
        paper = rng.uniform(0.75, 1.0, 3)
        color = rng.uniform(0.0, 0.3, 3)
    else:  # "camera": blurred coloured ink on tinted paper, lower contrast, more noise
        ink = ndimage.gaussian_filter(ink, rng.uniform(0.8, 1.5))
        ink = ink / max(ink.max(), 1e-6)
        paper = rng.uniform(0.55, 0.9, 3)
        color = rng.uniform(0.0, 0.45, 3)
    noise = 0.03 if style == "paper" else 0.06
    img = paper[None, None] * (1 - ink[..., None]) + color[None, None] * ink[..., None]
    img += rng.normal(0, noise, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


_PHOTO_CACHE: dict[str, np.ndarray] = {}


def _photo(name: str) -> np.ndarray:
    if name not in _PHOTO_CACHE:
        import skimage.data

        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):
            img = img[0]
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        _PHOTO_CACHE[name] = np.ascontiguousarray(img[..., :3]).astype(np.uint8)
    return _PHOTO_CACHE[name]


def _photo_crop(photo: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    from PIL import Image

    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.3, 0.8))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
    arr = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    arr = arr * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20, 3)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    from scipy import ndimage

    yy, xx = np.mgrid[0:size, 0:size] / size
    th = rng.uniform(0, np.pi)
    u = xx * np.cos(th) + yy * np.sin(th)
    f = rng.uniform(4, 10)
    if kind == "stripes":
        v = (np.sin(2 * np.pi * f * u) > 0).astype(float)
    elif kind == "grating":
        v = 0.5 + 0.5 * np.sin(2 * np.pi * f * u)
    elif kind == "checker":
        v = ((np.floor(xx * f) + np.floor(yy * f)) % 2).astype(float)
    elif kind == "dots":
        v = ((np.sin(2 * np.pi * f * xx) * np.sin(2 * np.pi * f * yy)) > 0.5).astype(float)
    elif kind == "rings":
        cy, cx = rng.uniform(0.3, 0.7, 2)
        v = 0.5 + 0.5 * np.sin(2 * np.pi * f * np.hypot(xx - cx, yy - cy))
    elif kind == "noise_blobs":
        v = ndimage.gaussian_filter(rng.random((size, size)), size / 16)
        v = (v - v.min()) / max(np.ptp(v), 1e-6)
    elif kind == "plaid":
        v = 0.5 + 0.25 * (np.sin(2 * np.pi * f * xx) + np.sin(2 * np.pi * f * 0.7 * yy))
    elif kind == "zigzag":
        v = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * f * (yy + 0.1 * np.abs(((xx * f) % 1) - 0.5))))
    elif kind == "gradient":
        v = u / max(u.max(), 1e-6)
    elif kind == "speckle":
        v = (rng.random((size, size)) > 0.9).astype(float)
        v = ndimage.gaussian_filter(v, 0.7)
        v = v / max(v.max(), 1e-6)
    else:
        raise ValueError(f"unknown texture {kind!r}; valid: {', '.join(TEXTURES)}")
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    img = c0[None, None] * (1 - v[..., None]) + c1[None, None] * v[..., None]
    img += rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)
