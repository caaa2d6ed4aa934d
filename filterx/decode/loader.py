"""Decode: (sample ids, images, labels) batches from WebDataset shards.

Three backends with one signature, ``load_batches(tars, cfg)``:

- ``dali``: ``fn.readers.webdataset`` with the shards' index files, ``fn.decoders.image`` on
  ``mixed`` (nvJPEG) when the device is CUDA and ``cpu`` otherwise, resize + crop + normalize
  inside the pipeline.
- ``torchvision``: ``torchvision.io.decode_jpeg`` (batched on CUDA), resize with antialias.
- ``pil``: PIL with libjpeg's DCT-domain scaling (``Image.draft``) before the resize, which
  decodes a 450 px JPEG for a 112 px crop about 1.8x faster than a full decode; the CPU backend
  for machines without DALI.

Evaluation transform (all backends): resize the short side to ``round(R / crop_fraction)``
(crop_fraction 0.875: 256 for 224, 128 for 112), center crop R x R, normalise with the given mean/std. Training transform:
random resized crop (area 0.08-1, aspect 3/4-4/3) to R x R and a random horizontal flip.

Images come out as float32 (B, 3, R, R) on ``cfg.device``; ids and labels as int64 (B,) on the
CPU. Ids are read from each sample's key (the key is the sample id), so they stay right under
shuffling and in re-sharded subsets.

A member that cannot be read or decoded (a tar damaged after ``shard`` checked it) goes to
the ``on_error`` handler as a ``BadSample`` naming the tar, the member and the sample id, in
the main process (as webdataset's ``handler=``): ``reraise`` (the default) raises a
ValueError with those names; ``SkipBadSamples`` records it, and the batch comes without it.
DALI cannot skip one image inside its pipeline: with a skipping handler the samples it did
not deliver are read again through the PIL (CPU) or torchvision (CUDA) backend, which skips
only the bad ones.
"""

from __future__ import annotations

import io
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
# Imported here, not in the decode functions: forked loader workers inherit them instead of
# each paying seconds of import time before their first sample.
import torchvision.transforms.v2.functional as TF
from torch.utils.data import IterableDataset
from torchvision.io import ImageReadMode, decode_jpeg

from filterx.io import atomic, tario

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dali", "torchvision", "pil")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875


class Batch(NamedTuple):
    ids: torch.Tensor  # (B,) int64, CPU
    images: torch.Tensor  # (B, 3, R, R) float32, normalised, on the loader's device
    labels: torch.Tensor  # (B,) int64, CPU; -1 where unlabelled


@dataclass(frozen=True)
class BadSample:
    """A sample whose bytes could not be read or decoded."""

    sample_id: int
    tar: str
    member: str  # KEY.jpg
    reason: str

    def line(self) -> str:
        return f"{self.tar}: cannot decode {self.member} (sample id {self.sample_id}): {self.reason}"


ErrorHandler = Callable[[BadSample], None]


def reraise(bad: BadSample) -> None:
    """The default handler: stop with a ValueError that names the tar and the member."""
    raise ValueError(bad.line() + "; re-shard the source, or restore the tar")


class SkipBadSamples:
    """A handler that records every bad sample (a warning each) and lets the run go on."""

    def __init__(self) -> None:
        self.bad: list[BadSample] = []
        self._taken = 0

    def __call__(self, bad: BadSample) -> None:
        log.warning("skipping %s", bad.line())
        self.bad.append(bad)

    def take(self) -> list[BadSample]:
        """The bad samples recorded since the last call."""
        new, self._taken = self.bad[self._taken :], len(self.bad)
        return new


@dataclass(frozen=True)
class LoaderConfig:
    resolution: int = 224
    backend: str = "auto"
    device: str = "cpu"
    batch_size: int = 64
    workers: int = 2
    train: bool = False
    shuffle: bool = False
    seed: int = 0
    epoch: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_fraction: float = CROP_FRACTION  # evaluation: center crop of this share of the short side

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        if self.resolution < 16:
            raise ValueError(f"resolution must be >= 16 pixels, got {self.resolution}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")

    @property
    def resize_size(self) -> int:
        return int(round(self.resolution / self.crop_fraction))


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, *, subset: bool = False) -> str:
    """"auto" -> dali when installed, else torchvision; errors name the valid backends.

    ``subset``: the read covers only some samples of its tars (an id list). DALI reads whole
    tars, so "auto" then means torchvision and an explicit "dali" is refused.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "dali" if dali_available() and not subset else "torchvision"
    if backend == "dali" and not dali_available():
        raise ValueError("--backend dali needs nvidia-dali (pip install 'filterx[dali]'); or use torchvision / pil")
    if backend == "dali" and subset:
        raise ValueError("--backend dali reads whole shards, and this run reads a subset of them; "
                         "materialise it with `filterx select --format wds` or use --backend torchvision / pil")
    return backend


def load_batches(
    tars: Sequence[str | Path], cfg: LoaderConfig, *, rank: int = 0, world_size: int = 1,
    ids: np.ndarray | None = None, on_error: ErrorHandler = reraise,
) -> Iterator[Batch]:
    """Batches over every sample of ``tars`` (one epoch), this rank's share under DDP.

    Every rank reads :func:`samples_per_rank` samples, in the batches
    :func:`rank_batch_sizes` lists, whatever the backend and the worker count. torchvision and
    PIL: one (seeded, same on every rank) shuffle dealt round-robin to the ranks, padded by
    wrapping; each rank's share cut into batches in order (see :func:`worker_positions`), so
    with any number of workers step t of rank r reads the same images. DALI: rank r reads the
    reader's shard r (a contiguous part of the tars), padded by repeating its last sample.
    ``ids`` restricts the epoch to those sample ids (torchvision and PIL backends; "auto" picks
    torchvision; DALI reads whole tars, so for DALI materialise a subset with
    ``filterx select --format wds``). ``on_error``: see the module docstring; a batch whose
    samples were all bad is not yielded.
    """
    tars = [Path(t) for t in tars]
    if not tars:
        raise ValueError("no shards to read")
    for t in tars:
        if not t.is_file():
            raise FileNotFoundError(f"shard {t} does not exist")
        if not tario.index_path(t).is_file():
            log.warning("DALI index for %s is missing; rebuilding it", t)
            tario.rebuild_index(t)
        tario.check_complete(t)
    backend = resolve_backend(cfg.backend, subset=ids is not None)
    if backend == "dali":
        yield from _dali_batches(tars, cfg, rank, world_size, on_error)
    else:
        yield from _torch_batches(tars, cfg, backend, rank, world_size, ids, on_error)


# ---------------------------------------------------------------- sample lists


@dataclass(frozen=True)
class SampleRef:
    tar: int
    sample_id: int
    jpg: tario.MemberEntry
    cls: tario.MemberEntry | None


def sample_refs(tars: Sequence[Path]) -> list[SampleRef]:
    """Every sample of ``tars`` in file order, from their index files."""
    refs = []
    for t, tar in enumerate(tars):
        members: dict[str, dict[str, tario.MemberEntry]] = {}
        for e in tario.read_index(tario.index_path(tar)):
            members.setdefault(e.key, {})[e.ext] = e
        for key, m in members.items():
            if "jpg" not in m:
                raise ValueError(f"{tar}: sample {key} has no .jpg member")
            refs.append(SampleRef(t, int(key), m["jpg"], m.get("cls")))
    return refs


def samples_per_rank(n: int, world_size: int) -> int:
    """Samples every rank reads in an epoch over ``n`` samples, padding included:
    ceil(n / world_size), for every backend (the one count the loaders and the trainer's
    steps per epoch share)."""
    return -(-n // world_size)


def rank_batch_sizes(n: int, batch_size: int, world_size: int) -> list[int]:
    """Sizes of the batches every rank's loader yields in an epoch over ``n`` samples (before
    bad samples are dropped): full batches, then the remainder; for every backend and worker
    count."""
    full, rest = divmod(samples_per_rank(n, world_size), batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def dali_shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The real samples [lo, hi) of DALI's reader shard ``rank`` (positions in file order);
    the reader pads the shard to :func:`samples_per_rank` by repeating its last sample."""
    return (n * rank) // world_size, (n * (rank + 1)) // world_size


def rank_share(n: int, cfg: LoaderConfig, rank: int, world_size: int) -> np.ndarray:
    """Positions (into the sample list) this rank reads, in order (torchvision / PIL): the
    shared permutation dealt round-robin, wrapped so that every rank gets
    :func:`samples_per_rank`."""
    order = np.arange(n)
    if cfg.shuffle:
        order = np.random.default_rng([cfg.seed, cfg.epoch]).permutation(n)
    order = np.resize(order, samples_per_rank(n, world_size) * world_size) if world_size > 1 else order
    return order[rank::world_size]


def worker_positions(positions: np.ndarray, batch_size: int, worker: int, workers: int) -> list[np.ndarray]:
    """The batches (blocks of ``positions``) loader worker ``worker`` of ``workers`` reads: blocks
    ``worker``, ``worker + workers``, ... The DataLoader takes batches from its workers in
    turn, so the rank yields blocks 0, 1, 2, ... in order: the same batches for any worker
    count (0 workers: every block in the main process)."""
    starts = range(worker * batch_size, len(positions), workers * batch_size)
    return [positions[s : s + batch_size] for s in starts]


def augment_seed(cfg: LoaderConfig, rank: int, *stream: int) -> np.random.SeedSequence:
    """The seed of an augmentation stream: (seed, epoch, rank, stream...). The rank is in it so
    that ranks do not draw the same crops and flips for their k-th images."""
    return np.random.SeedSequence([cfg.seed, cfg.epoch, rank, *stream])


# ---------------------------------------------------------------- torchvision / PIL


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
                data = _read(f, ref.jpg, self.tars[ref.tar])
                label = int(_read(f, ref.cls, self.tars[ref.tar])) if ref.cls else -1
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


def _read(f, e: tario.MemberEntry, tar: Path) -> bytes:
    f.seek(e.offset)
    data = f.read(e.size)
    if len(data) != e.size:
        raise ValueError(f"{tar}: member {e.key}.{e.ext} is truncated")
    return data


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


# ---------------------------------------------------------------- DALI


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
