"""Where training data comes from: a dataset dir or a manifest, held-out splits, the backend
that can read them, and how many steps an epoch takes on every rank.

    data = resolve_training_data("runs/select/subset.jsonl")   # or a dataset dir
    data.tars, data.ids          # ids None: whole tars (DALI can read them)
    train, val = held_out_split(data, 0.1, seed=0)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from filterx.io.dataset import Dataset, is_dataset
from filterx.decode.loader import Batch, rank_batch_sizes


@dataclass(frozen=True)
class TrainingData:
    """The samples a run reads: ``tars`` restricted to ``ids`` (None: every sample of the tars,
    which lets DALI read them). ``sample_ids``/``labels`` list the selected samples (int64)."""

    tars: list[Path]
    ids: np.ndarray | None
    num_classes: int
    class_names: tuple[str, ...]
    sample_ids: np.ndarray
    labels: np.ndarray
    source: Path
    fingerprint: str | None = None

    @property
    def count(self) -> int:
        return len(self.sample_ids)

    def identity(self) -> dict:
        """What a resumed run must read again: the dataset's fingerprint and a hash of the ids."""
        ids_hash = hashlib.sha256(np.ascontiguousarray(self.sample_ids, np.int64).tobytes()).hexdigest()[:16]
        return {"fingerprint": self.fingerprint, "count": self.count, "ids": ids_hash}

    def subset(self, ids: np.ndarray) -> "TrainingData":
        """The same source restricted to ``ids`` (a subset of ``sample_ids``)."""
        pos = np.searchsorted(self.sample_ids, ids)
        if len(ids) and (pos.max() >= len(self.sample_ids) or not np.array_equal(self.sample_ids[pos], ids)):
            raise ValueError("subset ids are not all in the source")
        return TrainingData(self.tars, np.asarray(ids, np.int64), self.num_classes, self.class_names,
                            np.asarray(ids, np.int64), self.labels[pos], self.source, self.fingerprint)


def resolve_training_data(source: str | Path) -> TrainingData:
    """A dataset dir (every sample) or a manifest (its selected samples) -> what to read.

    A manifest whose selection was materialised as tars (``--format wds``) reads those tars
    whole; any other manifest reads the selected ids out of its dataset's tars. Raises
    FileNotFoundError/ValueError naming the path when it is neither, or when the manifest's
    dataset is missing or has another fingerprint.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"training data {str(path)!r} does not exist; give a dataset dir "
                                "(made by filterx shard) or a manifest (made by filterx select)")
    if is_dataset(path):
        ds = Dataset.open(path)
        ids = np.arange(ds.num_samples, dtype=np.int64)
        return TrainingData(ds.tar_paths(), None, ds.num_classes, tuple(c.name for c in ds.classes),
                            ids, ds.labels, ds.root, ds.fingerprint)
    try:
        from filterx.io.manifest import read_manifest
    except ImportError:
        raise ValueError(f"{path} is not a filterx dataset dir (no index.zarr), and this filterx "
                         "cannot read manifests") from None
    try:
        m = read_manifest(path)
        ds = m.open_dataset()
    except FileNotFoundError as exc:
        if str(path) in str(exc):
            raise
        raise FileNotFoundError(f"manifest {path}: {exc}") from None
    except (ValueError, KeyError, OSError) as exc:
        if isinstance(exc, ValueError) and str(path) in str(exc):
            raise
        raise ValueError(f"{path} is neither a filterx dataset dir nor a readable manifest "
                         f"({type(exc).__name__}: {exc})") from None
    ids = np.asarray(m.ids, dtype=np.int64)
    if len(ids) == 0:
        raise ValueError(f"manifest {path} selects no samples")
    if len(ids) and (ids.min() < 0 or ids.max() >= ds.num_samples):
        raise ValueError(f"manifest {path} has sample ids outside [0, {ds.num_samples}) of {ds.root}")
    tars = [Path(t) for t in m.tars] if m.tars else ds.tar_paths()
    return TrainingData(tars, None if m.tars else ids, ds.num_classes, tuple(c.name for c in ds.classes),
                        ids, ds.labels[ids], path, ds.fingerprint)


def held_out_split(data: TrainingData, fraction: float, seed: int,
                   what: str = "evaluation") -> tuple[TrainingData, TrainingData]:
    """(train, held-out): ``fraction`` of every class held out (seeded, stratified; see
    ``filterx.math.splits.stratified_split``). ``what`` names the held-out part in the error raised
    when it would be empty (every class has a single image)."""
    from filterx.math.splits import stratified_split

    train_pos, val_pos = stratified_split(data.labels, fraction, seed)
    if len(val_pos) == 0:
        raise ValueError(f"a held-out fraction of {fraction} leaves no {what} images in {data.source} "
                         f"({data.count} images; a class needs 2 or more to give one)")
    return data.subset(data.sample_ids[train_pos]), data.subset(data.sample_ids[val_pos])


def batches_per_epoch(n: int, batch_size: int, workers: int = 0, world_size: int = 1, backend: str = "") -> int:
    """Training steps every rank takes per epoch over ``n`` samples: the batches its loader
    yields (:func:`filterx.decode.loader.rank_batch_sizes`, the same on every rank for every backend
    and worker count, so ``workers`` and ``backend`` do not change it), less those of a single
    image (BatchNorm cannot train on them)."""
    return sum(size >= 2 for size in rank_batch_sizes(n, batch_size, world_size))


def usable_batches(batches: Iterable[Batch], steps: int) -> Iterator[Batch]:
    """The first ``steps`` batches of two or more images (see :func:`batches_per_epoch`)."""
    taken = 0
    it = iter(batches)
    try:
        for b in it:
            if taken == steps:
                break
            if len(b.ids) >= 2:
                taken += 1
                yield b
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
