"""The dataset dir: shards, their DALI indexes, and ``index.zarr``.

    DATASET/
      shards/NNNNNN.tar, NNNNNN.idx   WebDataset tars (see filterx.io.tario) + DALI indexes
      index.zarr                      per sample: key, shard, label, path; attrs below
      embeddings/<encoder>.zarr       (N, D) float16 + per-shard done mask (filterx.stages.embed)
      scores.zarr                     one float32 (N,) array per method (filterx.stages.score)
      scores.zarr/.work-<name>        a resumable score's work, removed when done (not a score)
      configs/<command>-<name>.yaml   options of the embed / score runs that wrote here
      shard_report.json               what `shard` skipped and why

The **sample id** is the row of ``index.zarr``; ids are dense (0..N-1), shard ``s`` holds a
contiguous id range, and every later array is aligned to the id.

``index.zarr`` attrs: ``filterx_index`` (format version), ``classes`` (list of
``{index, name, wnid}``), ``source_root``, ``filterx_version``, ``shard_size``,
``shard_counts``, ``resize_short``, ``fingerprint`` (a hash of keys, labels and shard layout
that manifests carry, so that a manifest is never applied to another dataset).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

INDEX_FORMAT = 1
INDEX = "index.zarr"
SHARDS = "shards"
EMBEDDINGS = "embeddings"
SCORES = "scores.zarr"
SHARD_REPORT = "shard_report.json"


@dataclass(frozen=True)
class ClassInfo:
    """One class of a dataset: its label index, display name and WordNet id when known."""

    index: int
    name: str
    wnid: str | None = None


def shard_name(shard: int) -> str:
    return f"{shard:06d}"


def fingerprint(keys: np.ndarray, labels: np.ndarray, shard_counts: list[int]) -> str:
    """A short hash identifying a dataset's samples and layout (not its bytes)."""
    h = hashlib.sha256()
    h.update(np.asarray(shard_counts, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    h.update("\n".join(map(str, keys)).encode())
    return h.hexdigest()[:16]


def _strings(values) -> np.ndarray:
    """zarr's variable-length strings as a plain fixed-width numpy str array."""
    return np.array([str(v) for v in values], dtype=str)


def is_dataset(path: str | Path) -> bool:
    return (Path(path) / INDEX / "zarr.json").is_file()


@dataclass(frozen=True)
class Dataset:
    """A read-only view of a dataset dir. Arrays are loaded on first use."""

    root: Path

    @classmethod
    def open(cls, path: str | Path) -> "Dataset":
        """Open a dataset dir; FileNotFoundError says how to make one when ``path`` is not."""
        root = Path(path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"dataset dir {str(root)!r} does not exist")
        if not is_dataset(root):
            raise FileNotFoundError(
                f"{str(root)!r} is not a filterx dataset dir (no complete {INDEX}); "
                f"create one with: filterx shard SRC {root}"
            )
        return cls(root.resolve())

    @cached_property
    def _group(self):
        import zarr

        return zarr.open_group(self.root / INDEX, mode="r")

    @cached_property
    def attrs(self) -> dict:
        return dict(self._group.attrs)

    @cached_property
    def labels(self) -> np.ndarray:
        """(N,) int64 class index per sample."""
        return np.asarray(self._group["label"][:], dtype=np.int64)

    @cached_property
    def shards(self) -> np.ndarray:
        """(N,) int32 shard number per sample."""
        return np.asarray(self._group["shard"][:], dtype=np.int32)

    @cached_property
    def keys(self) -> np.ndarray:
        """(N,) tar keys (strings)."""
        return _strings(self._group["key"][:])

    @cached_property
    def paths(self) -> np.ndarray:
        """(N,) original paths, relative to ``source_root``."""
        return _strings(self._group["path"][:])

    @property
    def num_samples(self) -> int:
        return int(self._group["label"].shape[0])

    @cached_property
    def shard_counts(self) -> list[int]:
        return [int(c) for c in self.attrs["shard_counts"]]

    @property
    def num_shards(self) -> int:
        return len(self.shard_counts)

    @cached_property
    def shard_starts(self) -> np.ndarray:
        """(num_shards + 1,) int64: shard ``s`` holds ids ``starts[s]:starts[s+1]``."""
        return np.concatenate([[0], np.cumsum(self.shard_counts)]).astype(np.int64)

    def shard_ids(self, shard: int) -> np.ndarray:
        return np.arange(self.shard_starts[shard], self.shard_starts[shard + 1], dtype=np.int64)

    @cached_property
    def classes(self) -> tuple[ClassInfo, ...]:
        return tuple(ClassInfo(c["index"], c["name"], c.get("wnid")) for c in self.attrs["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["fingerprint"])

    @property
    def name(self) -> str:
        return self.root.name

    def shard_path(self, shard: int) -> Path:
        return self.root / SHARDS / f"{shard_name(shard)}.tar"

    def index_path(self, shard: int) -> Path:
        return self.root / SHARDS / f"{shard_name(shard)}.idx"

    def tar_paths(self, shards: list[int] | None = None) -> list[Path]:
        return [self.shard_path(s) for s in (range(self.num_shards) if shards is None else shards)]

    def embeddings_path(self, encoder_tag: str) -> Path:
        return self.root / EMBEDDINGS / f"{encoder_tag}.zarr"

    @property
    def scores_path(self) -> Path:
        return self.root / SCORES

    def ensure_indexes(self) -> list[int]:
        """Rebuild missing or stale DALI index files; returns the shards whose index was rebuilt."""
        from filterx.io.tario import read_index, rebuild_index

        rebuilt = []
        for s, count in enumerate(self.shard_counts):
            idx = self.index_path(s)
            try:
                ok = len({e.key for e in read_index(idx)}) == count
            except (OSError, ValueError, IndexError):
                ok = False
            if not ok:
                tar = self.shard_path(s)
                if not tar.is_file():
                    raise FileNotFoundError(f"shard {tar} is missing; re-run: filterx shard")
                rebuild_index(tar)
                rebuilt.append(s)
        return rebuilt

    def summary(self) -> str:
        per_class = np.bincount(self.labels[self.labels >= 0], minlength=self.num_classes)
        return (
            f"{self.root}: {self.num_samples} samples in {self.num_shards} shards, "
            f"{self.num_classes} classes ({int((per_class == 0).sum())} empty)"
        )
