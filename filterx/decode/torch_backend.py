"""The ``torchvision`` and ``pil`` decode backends: a torch DataLoader over the shards' index
files, one seeded permutation dealt to the ranks (see :func:`filterx.decode.loader.rank_share`),
batched ``decode_jpeg`` on CUDA. Both read id subsets (``ids``), so they serve manifests
that were not re-sharded, and they skip single bad members through the error handler."""

from __future__ import annotations

import io
import math
import re
from typing import Iterator

import numpy as np
import torch
# Imported here, not in the decode functions: forked loader workers inherit them instead of
# each paying seconds of import time before their first sample.
import torchvision.transforms.v2.functional as TF
from torch.utils.data import IterableDataset
from torchvision.io import ImageReadMode, decode_jpeg

from filterx.decode.backends import register_backend
from filterx.decode.loader import (
    BadSample, Batch, ErrorHandler, LoaderConfig, SampleRef, augment_seed, rank_share, reraise, sample_refs,
    worker_positions,
)
from filterx.io import atomic, tario


def _decode_pil(data: bytes, cfg: LoaderConfig, rng: np.random.Generator) -> np.ndarray:
    """uint8 (3, R, R) through PIL with DCT-domain scaling."""
    from PIL import Image

    r = cfg.resolution
    with Image.open(io.BytesIO(data)) as im:
        if cfg.train:
            im = im.convert("RGB")
            box = _random_crop_box(im.width, im.height, rng)
            im = im.resize((r, r), Image.BILINEAR, box=box)
            if rng.random() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            s = cfg.resize_size
            # draft picks the largest 1/2^k scale whose short side still covers s
            w, h = im.size
            im.draft("RGB", (max(1, w * s // min(w, h)), max(1, h * s // min(w, h))))
            im = im.convert("RGB")
            w, h = im.size
            nw, nh = (s, max(s, round(h * s / w))) if w <= h else (max(s, round(w * s / h)), s)
            im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
            left, top = center_offset(nw, r), center_offset(nh, r)
            im = im.crop((left, top, left + r, top + r))
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def center_offset(size: int, crop: int) -> int:
    """Start of a centred crop, rounding half up as DALI does. torchvision's center_crop rounds
    half to even (Python's round), one pixel off DALI whenever size - crop is odd."""
    return (size - crop + 1) // 2


def _random_crop_box(w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameters (area 0.08-1, log-uniform aspect 3/4-4/3)."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x, y, x + cw, y + ch
    side = min(w, h)
    x, y = (w - side) // 2, (h - side) // 2
    return x, y, x + side, y + side


def _resize_crop_tensor(img, cfg: LoaderConfig, rng: np.random.Generator):
    """uint8 (3, H, W) tensor -> uint8 (3, R, R) with torchvision's functional ops."""
    r = cfg.resolution
    if cfg.train:
        x0, y0, x1, y1 = _random_crop_box(img.shape[2], img.shape[1], rng)
        img = TF.resized_crop(img, y0, x0, y1 - y0, x1 - x0, [r, r], antialias=True)
        return TF.horizontal_flip(img) if rng.random() < 0.5 else img
    img = TF.resize(img, [cfg.resize_size], antialias=True)
    top, left = center_offset(img.shape[1], r), center_offset(img.shape[2], r)
    return img[:, top : top + r, left : left + r]


def _decode_torchvision(data: bytes, cfg: LoaderConfig, rng: np.random.Generator):
    img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return _resize_crop_tensor(img, cfg, rng)


class _SampleStream(IterableDataset):
    """(id, uint8 image or raw bytes, label, error) for one rank; split over loader workers.

    ``error`` is "" for a good sample; for one that could not be read or decoded it says why,
    and the image is a placeholder (the main process hands it to the error handler)."""

    def __init__(self, tars, refs, positions, cfg: LoaderConfig, backend: str, raw: bool, rank: int = 0):
        super().__init__()
        self.tars, self.refs, self.positions = tars, refs, positions
        self.cfg, self.backend, self.raw, self.rank = cfg, backend, raw, rank

    def __iter__(self):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        bs = self.cfg.batch_size
        blocks = worker_positions(self.positions, bs, wid, nw)
        decode = _decode_pil if self.backend == "pil" else _decode_torchvision
        files: dict[int, object] = {}
        try:
            for k, block in enumerate(blocks):
                # one stream per batch (block index wid + k nw): the draws do not depend on the
                # worker count
                rng = np.random.default_rng(augment_seed(self.cfg, self.rank, wid + k * nw))
                yield from self._block(block, files, decode, rng)
        finally:
            for f in files.values():
                f.close()

    def _block(self, block, files: dict, decode, rng):
        for pos in block:
            ref = self.refs[pos]
            f = files.get(ref.tar) or files.setdefault(ref.tar, open(self.tars[ref.tar], "rb"))
            label = -1
            try:
                data = tario.read_member(f, ref.jpg, self.tars[ref.tar])
                label = int(tario.read_member(f, ref.cls, self.tars[ref.tar])) if ref.cls else -1
                if self.raw:
                    yield ref.sample_id, torch.frombuffer(bytearray(data), dtype=torch.uint8), label, ""
                    continue
                img = torch.as_tensor(decode(data, self.cfg, rng))
            except Exception as e:  # noqa: BLE001 - any damage: the handler decides, in the main process
                yield ref.sample_id, self._placeholder(), label, _reason(e)
                continue
            yield ref.sample_id, img, label, ""

    def _placeholder(self) -> torch.Tensor:
        if self.raw:
            return torch.zeros(0, dtype=torch.uint8)
        return torch.zeros((3, self.cfg.resolution, self.cfg.resolution), dtype=torch.uint8)


def _reason(e: BaseException) -> str:
    """One line for a report: the exception's first line, without object addresses."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    first = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the member's bytes", first)
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _collate_raw(items):
    ids, datas, labels, errors = zip(*items)
    return (torch.tensor(ids, dtype=torch.int64), list(datas), torch.tensor(labels, dtype=torch.int64),
            list(errors))


def _decode_raw(datas: list, errors: list[str], cfg: LoaderConfig, rng: np.random.Generator) -> list:
    """Batched nvJPEG decode + resize of the good members; a batch with a bad JPEG is decoded
    one by one to find it (its entry in ``errors`` is set, its image is None)."""
    good = [i for i, e in enumerate(errors) if not e]
    try:
        decoded = dict(zip(good, decode_jpeg([datas[i] for i in good], mode=ImageReadMode.RGB, device=cfg.device)))
    except RuntimeError:
        decoded = {}
        for i in good:
            try:
                decoded[i] = decode_jpeg(datas[i], mode=ImageReadMode.RGB, device=cfg.device)
            except RuntimeError as e:
                errors[i] = _reason(e)
    return [_resize_crop_tensor(decoded[i], cfg, rng) if i in decoded else None for i in range(len(datas))]


def _drop_bad(ids, images, labels, errors: list[str], refs_by_id, tars, on_error: ErrorHandler):
    """Hand each bad sample to ``on_error`` and return the batch without them."""
    bad = [i for i, e in enumerate(errors) if e]
    for i in bad:
        ref = refs_by_id()[int(ids[i])]
        on_error(BadSample(int(ids[i]), str(tars[ref.tar]), f"{ref.jpg.key}.{ref.jpg.ext}", errors[i]))
    keep = torch.tensor([not e for e in errors], dtype=torch.bool)
    return ids[keep], images[keep], labels[keep]


def normalize(images_u8, cfg: LoaderConfig):
    """uint8 (B, 3, R, R) -> float32 normalised, on the images' device."""
    mean = torch.tensor(cfg.mean, device=images_u8.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.std, device=images_u8.device).view(1, 3, 1, 1) * 255
    return (images_u8.float() - mean) / std


def _torch_batches(tars, cfg: LoaderConfig, backend: str, rank: int, world_size: int,
                   ids: np.ndarray | None = None, on_error: ErrorHandler = reraise) -> Iterator[Batch]:
    from torch.utils.data import DataLoader

    refs = sample_refs(tars)
    if ids is not None:
        wanted = set(np.asarray(ids, dtype=np.int64).tolist())
        refs = [r for r in refs if r.sample_id in wanted]
        if len(refs) != len(wanted):
            raise ValueError(f"{len(wanted) - len(refs)} of the requested sample ids are not in these shards")
    positions = rank_share(len(refs), cfg, rank, world_size)
    on_gpu = cfg.device.startswith("cuda")
    # On CUDA torchvision decodes whole batches with nvJPEG: workers only read bytes.
    raw = on_gpu and backend == "torchvision"
    stream = _SampleStream(tars, refs, positions, cfg, backend, raw, rank)
    loader = DataLoader(
        stream,
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        collate_fn=_collate_raw if raw else None,
        pin_memory=on_gpu,
        persistent_workers=False,
        worker_init_fn=atomic.worker_init if cfg.workers else None,
    )
    rng = np.random.default_rng(augment_seed(cfg, rank, 1 << 20))  # nvJPEG path: augments here
    by_id: dict[int, SampleRef] = {}

    def refs_by_id() -> dict[int, SampleRef]:  # built on the first bad sample only
        if not by_id:
            by_id.update((r.sample_id, r) for r in refs)
        return by_id

    placeholder = torch.zeros((3, cfg.resolution, cfg.resolution), dtype=torch.uint8, device=cfg.device)
    for ids, images, labels, errors in loader:
        errors = list(errors)
        if raw:
            out = _decode_raw(images, errors, cfg, rng)
            images = torch.stack([placeholder if im is None else im for im in out])
        else:
            images = images.to(cfg.device, non_blocking=True)
        if any(errors):
            ids, images, labels = _drop_bad(ids, images, labels, errors, refs_by_id, tars, on_error)
            if not len(ids):
                continue
        yield Batch(ids, normalize(images, cfg), labels)


@register_backend("torchvision", priority=1)
def torchvision_batches(tars, cfg: LoaderConfig, rank: int, world_size: int, ids=None,
                        on_error: ErrorHandler = reraise) -> Iterator[Batch]:
    """``torchvision.io.decode_jpeg`` (batched on CUDA), resize with antialias."""
    return _torch_batches(tars, cfg, "torchvision", rank, world_size, ids, on_error)


@register_backend("pil", priority=0)
def pil_batches(tars, cfg: LoaderConfig, rank: int, world_size: int, ids=None,
                on_error: ErrorHandler = reraise) -> Iterator[Batch]:
    """PIL with libjpeg's DCT-domain scaling before the resize: the CPU backend without DALI."""
    return _torch_batches(tars, cfg, "pil", rank, world_size, ids, on_error)
