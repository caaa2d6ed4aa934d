"""The ``dali`` decode backend: ``fn.readers.webdataset`` over the shards' index files,
``fn.decoders.image`` on ``mixed`` (nvJPEG) on CUDA and ``cpu`` otherwise, resize, crop and
normalise inside the pipeline. Rank r reads the reader's shard r. DALI reads whole tars (no
id subsets) and cannot skip one bad image: what it did not deliver is then read again through
the torchvision (CUDA) or PIL (CPU) backend, which skips only the bad ones."""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch

from filterx.decode.backends import register_backend
from filterx.decode.loader import (
    Batch, ErrorHandler, LoaderConfig, augment_seed, dali_shard_range, reraise, sample_refs, samples_per_rank,
)
from filterx.decode.torch_backend import _torch_batches
from filterx.io import tario

log = logging.getLogger("filterx.decode.loader")


def _dali_pipeline(tars, cfg: LoaderConfig, shard_id: int, num_shards: int):
    """The DALI pipeline of rank ``shard_id`` (its reader shard, its augmentation seed)."""
    from nvidia.dali import fn, pipeline_def, types

    on_gpu = cfg.device.startswith("cuda")
    device_id = (int(cfg.device.split(":")[1]) if ":" in cfg.device else 0) if on_gpu else None
    r = cfg.resolution

    @pipeline_def(batch_size=cfg.batch_size, num_threads=max(1, cfg.workers), device_id=device_id,
                  seed=_dali_seed(cfg, shard_id), prefetch_queue_depth=2, exec_dynamic=True)
    def pipe():
        jpg, cls = fn.readers.webdataset(
            paths=[str(t) for t in tars],
            index_paths=[str(tario.index_path(t)) for t in tars],
            ext=["jpg", "cls"],
            missing_component_behavior="error",
            random_shuffle=cfg.shuffle,
            initial_fill=1024,
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=True,
            name="reader",
        )
        info = fn.get_property(jpg, key="source_info")
        dev = "mixed" if on_gpu else "cpu"
        if cfg.train:
            img = fn.decoders.image_random_crop(jpg, device=dev, output_type=types.RGB,
                                                random_area=[0.08, 1.0], random_aspect_ratio=[0.75, 4 / 3])
            img = fn.resize(img, size=[r, r], antialias=True)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            img = fn.decoders.image(jpg, device=dev, output_type=types.RGB)
            img = fn.resize(img, resize_shorter=cfg.resize_size, antialias=True)
            mirror = 0
        img = fn.crop_mirror_normalize(
            img, crop=(r, r), mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
            mean=[m * 255 for m in cfg.mean], std=[s * 255 for s in cfg.std],
        )
        return img, cls, info

    p = pipe()
    p.build()
    return p


def _dali_seed(cfg: LoaderConfig, rank: int) -> int:
    """DALI's pipeline seed (a non-negative int32) from :func:`augment_seed`."""
    return int(augment_seed(cfg, rank).generate_state(1)[0] & 0x7FFFFFFF)


def _key_from_source_info(info: np.ndarray) -> int:
    # source_info is "<tar path>:<offset>:<member name>"; the member name is KEY.jpg
    name = bytes(info).decode("utf-8").rsplit(":", 1)[-1]
    return int(name.rpartition(".")[0])


def _dali_batches(tars, cfg: LoaderConfig, rank: int, world_size: int,
                  on_error: ErrorHandler = reraise) -> Iterator[Batch]:
    p = _dali_pipeline(tars, cfg, rank, world_size)
    # reader_meta names both sizes: epoch_size() is the padded one in some DALI versions and
    # the real one in others
    total = int(p.reader_meta("reader")["epoch_size"])
    lo, hi = dali_shard_range(total, rank, world_size)
    # pad_last_batch repeats the shard's last sample up to the padded shard size (DALI 2.4 does
    # so also when the shard ends on a batch boundary: tests/test_loader.py checks the count)
    remaining = samples_per_rank(total, world_size)
    delivered: list[torch.Tensor] = []
    while remaining > 0:
        try:
            img, cls, info = p.run()
        except RuntimeError as e:
            yield from _after_dali_failure(tars, cfg, lo, hi, delivered, e, on_error)
            return
        n = min(cfg.batch_size, remaining)
        remaining -= n
        ids = torch.tensor([_key_from_source_info(np.asarray(info[i])) for i in range(n)], dtype=torch.int64)
        labels = torch.tensor([int(bytes(np.asarray(cls[i]))) for i in range(n)], dtype=torch.int64)
        if cfg.device.startswith("cuda"):
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = img.as_tensor()
            images = torch.empty(t.shape(), dtype=torch.float32, device=cfg.device)
            feed_ndarray(t, images, cuda_stream=torch.cuda.current_stream())
            images = images[:n]
        else:
            images = torch.from_numpy(img.as_array()[:n])
        delivered.append(ids)
        yield Batch(ids, images, labels)


def _after_dali_failure(tars, cfg: LoaderConfig, lo: int, hi: int, delivered: list[torch.Tensor],
                        error: RuntimeError, on_error: ErrorHandler) -> Iterator[Batch]:
    """DALI stopped (its pipeline cannot skip a bad image, and is unusable after an error):
    with ``reraise`` stop with one line naming the tars; otherwise read what DALI had not
    delivered of this rank's range [lo, hi) through a backend that skips bad images."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "no longer valid" not in ln and not ln.endswith(":")]
    why = next((ln for ln in useful if "failure" in ln.lower()), useful[-1] if useful else "")
    names = f"{tars[0]}" + (f" ... {tars[-1]} ({len(tars)} tars)" if len(tars) > 1 else "")
    if on_error is reraise:
        raise ValueError(f"DALI could not decode an image in {names}: {why}; --backend pil or torchvision "
                         "names the member")
    seen = set(torch.cat(delivered).tolist()) if delivered else set()
    rest = np.asarray([r.sample_id for r in sample_refs(tars)[lo:hi] if r.sample_id not in seen], dtype=np.int64)
    backend = "torchvision" if cfg.device.startswith("cuda") else "pil"
    log.warning("DALI could not decode an image in %s (%s); reading its %d remaining samples with the %s "
                "backend, which skips only the bad ones", names, why, len(rest), backend)
    if len(rest):
        yield from _torch_batches(tars, cfg, backend, 0, 1, rest, on_error)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@register_backend("dali", subsets=False, priority=2, available=dali_available,
                  install="nvidia-dali (pip install 'filterx[dali]')")
def dali_batches(tars, cfg: LoaderConfig, rank: int, world_size: int, ids=None,
                 on_error: ErrorHandler = reraise) -> Iterator[Batch]:
    if ids is not None:
        raise ValueError("the dali backend reads whole tars, not an id subset")
    return _dali_batches(tars, cfg, rank, world_size, on_error)
