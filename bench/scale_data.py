"""Inputs of the ``scale`` suite: a pool of tiny generated JPEGs, its dataset dir (made by
``filterx shard``), a small target, and SYNTHETIC embeddings and a synthetic encoder head.

Embedding 1.28M images on 2 CPU cores is not what the suite measures, so the stages after
``embed`` read embeddings that were never computed by a network: class-structured Gaussian
rows (D=512, float16) written into the dataset's real embeddings store through filterx's own
store code (``filterx.io.rowstore``, the layout ``filterx.stages.embed`` writes), under the
encoder tag ``SYNTHETIC_TAG``, with ``synthetic: true`` in the store's attrs. The encoder file
holds a head (C x 512) made from the target's class means, no network: it is enough for every
method that works on embeddings (they never load the network), and for nothing else.

Everything is cached under the bench data dir, keyed by N: a larger run reuses nothing from a
smaller one, but a re-run reuses everything.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np

DIM = 512
POOL_CLASSES = 1000
TARGET_CLASSES = 31
TARGET_PER_CLASS = 64
SYNTHETIC_TAG = "synthetic-d512"
DISTINCT_JPEGS = 512  # distinct tiny images; file i holds image i % DISTINCT_JPEGS
JPEG_PX = 16


def tiny_jpegs(count: int = DISTINCT_JPEGS, seed: int = 0) -> list[bytes]:
    """``count`` distinct 16x16 baseline RGB JPEGs (~0.7 KB): coloured blocks and noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
        px = np.clip(base.astype(np.int16) + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_image_folder(root: Path, n: int, classes: int, seed: int = 0) -> Path:
    """An ImageFolder tree of ``n`` tiny JPEGs over ``classes`` folders (n // classes each,
    the remainder in the first ones); written once, marked complete by ``.done``."""
    if (root / ".done").is_file():
        return root
    jpegs = tiny_jpegs(seed=seed)
    per, extra = divmod(n, classes)
    i = 0
    for c in range(classes):
        d = root / f"c{c:04d}"
        d.mkdir(parents=True, exist_ok=True)
        for _ in range(per + (c < extra)):
            (d / f"img{i:08d}.jpg").write_bytes(jpegs[i % len(jpegs)])
            i += 1
    (root / ".done").write_text(str(n))
    return root


def class_means(seed: int = 0) -> np.ndarray:
    """(POOL_CLASSES, DIM) float32 class centres; the target's classes are the first 31."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((POOL_CLASSES, DIM)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True) * 4.0


def write_synthetic_embeddings(dataset: Path, seed: int, *, offset: float = 0.0) -> Path:
    """Fill ``dataset``'s embeddings store for ``SYNTHETIC_TAG`` with class mean + unit noise
    per row (float16), one shard at a time, through ``filterx.io.rowstore`` (the embed stage's
    layout and attrs plus ``synthetic: true``). ``offset`` shifts every row (a target domain)."""
    from filterx.io import rowstore
    from filterx.io.dataset import Dataset

    ds = Dataset.open(dataset)
    path = ds.embeddings_path(SYNTHETIC_TAG)
    if rowstore.complete(path):
        return path
    layout = rowstore.RowLayout("emb", (DIM,), "float16", tuple(ds.shard_counts), ds.fingerprint,
                                {"encoder_tag": SYNTHETIC_TAG, "arch": "synthetic", "resolution": 112,
                                 "feature_dim": DIM})
    if not rowstore.exists(path):
        rowstore.create(path, layout, extra_attrs={"synthetic": True, "note": (
            "SYNTHETIC embeddings written by bench/scale_data.py (class mean + Gaussian noise), "
            "not computed by any network")})
    store = rowstore.open_rows(path, layout)
    means = class_means() + offset
    labels = ds.labels
    for s in store.undone():
        ids = ds.shard_ids(s)
        rng = np.random.default_rng([seed, s])
        rows = means[np.maximum(labels[ids], 0)] + rng.standard_normal((len(ids), DIM), dtype=np.float32)
        store.write_shard(s, rows.astype(np.float16))
    return path


def write_synthetic_encoder(target: Path, out: Path, seed: int = 0) -> Path:
    """An encoder file whose head is the target's class means (no network weights) and whose
    train/val split is the target's (10% of each class held out): SYNTHETIC, enough for every
    method on embeddings."""
    import torch

    from filterx.io.dataset import Dataset
    from filterx.models.encoder import ENCODER_FORMAT

    if out.is_file():
        return out
    ds = Dataset.open(target)
    rng = np.random.default_rng(seed)
    val = np.sort(np.concatenate([rng.choice(np.flatnonzero(ds.labels == c), TARGET_PER_CLASS // 10, replace=False)
                                  for c in range(ds.num_classes)]))
    train = np.setdiff1d(np.arange(ds.num_samples), val)
    w = torch.from_numpy(class_means()[: ds.num_classes] / 4.0)
    payload = {
        "filterx_encoder": ENCODER_FORMAT, "tag": SYNTHETIC_TAG, "arch": "synthetic", "synthetic": True,
        "resolution": 112, "num_classes": ds.num_classes, "class_names": [c.name for c in ds.classes],
        "empty_classes": [], "mean": [0.5] * 3, "std": [0.25] * 3, "feature_dim": DIM,
        "state_dict": {"fc.weight": w, "fc.bias": torch.zeros(ds.num_classes)},
        "target": {"root": str(ds.root), "fingerprint": ds.fingerprint},
        "train_ids": train.tolist(), "val_ids": val.tolist(), "metrics": {},
        "config": {"weight_decay": 5e-4, "note": "synthetic head for bench/scale_data.py"},
    }
    torch.save(payload, out)
    return out


def build_target(base: Path, seed: int = 0) -> tuple[Path, Path]:
    """(target dataset dir, synthetic encoder file): 31 classes x 64 tiny JPEGs, sharded."""
    from filterx.stages.shard import ShardConfig, shard

    ds_dir = base / "target"
    if not (ds_dir / "index.zarr" / "zarr.json").is_file():
        src = write_image_folder(base / "target-src", TARGET_CLASSES * TARGET_PER_CLASS, TARGET_CLASSES, seed + 1)
        shard(ShardConfig(src, ds_dir, shard_size=1000, quiet=True))
    write_synthetic_embeddings(ds_dir, seed + 1, offset=0.3)
    return ds_dir, write_synthetic_encoder(ds_dir, base / "synthetic-encoder.pt", seed)


def describe(dataset: Path) -> dict:
    from filterx.io.dataset import Dataset

    ds = Dataset.open(dataset)
    return {"samples": ds.num_samples, "shards": ds.num_shards, "classes": ds.num_classes}


if __name__ == "__main__":  # python -m bench.scale_data DIR N: build one pool (for a look)
    import sys

    t0 = time.perf_counter()
    write_image_folder(Path(sys.argv[1]), int(sys.argv[2]), POOL_CLASSES)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1)}))
