"""Decode: (sample ids, images, labels) batches from WebDataset shards.

One entry point, ``load_batches(tars, cfg)``, over the registered decode backends
(:mod:`filterx.decode.backends`; built in: :mod:`~filterx.decode.torch_backend`,
:mod:`~filterx.decode.dali_backend`):

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

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from filterx.decode.backends import AUTO, check_backend, get_backend, resolve_backend  # noqa: F401 (API)
from filterx.io import tario

log = logging.getLogger(__name__)

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
        check_backend(self.backend)
        if self.resolution < 16:
            raise ValueError(f"resolution must be >= 16 pixels, got {self.resolution}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")

    @property
    def resize_size(self) -> int:
        return int(round(self.resolution / self.crop_fraction))


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
    yield from get_backend(backend).batches(tars, cfg, rank, world_size, ids, on_error)


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
