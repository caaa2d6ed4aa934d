"""rowstore: per-shard rows in zarr with a per-shard done mask, for stages that survive a kill.

    <store>/                     a zarr group
      <rows>   (N,) or (N, D)    one row per sample id; chunks of max(shard_counts) rows, so
                                 shard s is chunk s (every shard but the last is full-size)
      done     (num_shards,) bool, one chunk per element: the per-shard done mask
      <extra>                    arrays the caller stores once, at creation (e.g. s_test)
      attrs    dataset_fingerprint, shard_counts, and the caller's own attrs

A store is created atomically (written under a temporary name, then renamed), so it is
either absent or complete with every array. A shard's rows are written first and its
``done`` flag after them, so a run killed at any point leaves every shard either done (all
rows written) or not done; a re-run computes only ``undone()`` shards. zarr (>= 3.1.3) writes
each chunk file atomically, and with one chunk per shard no two shards share a file.

Opening checks the store against what the caller is about to compute (``RowLayout``): the
dataset fingerprint, the shard counts, the rows' shape and dtype and every caller attr. A
mismatch either raises ValueError (``on_mismatch="raise"``: the store is a user-visible
output, e.g. embeddings, that a person should remove knowingly) or removes the store
(``"discard"``: a private work dir whose key no longer matches the run is only stale).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from filterx.io import atomic

log = logging.getLogger(__name__)

MISMATCH = ("raise", "discard")


def _plain(obj):
    """obj as JSON would give it back (tuples -> lists), so stored and new attrs compare equal."""
    return json.loads(json.dumps(obj))


@dataclass(frozen=True)
class RowLayout:
    """What a store holds and what it must match on open.

    rows:       name of the rows array ("emb", "scores")
    row_shape:  () for one value per sample (a 1-D store), (D,) for a vector per sample
    dtype:      numpy dtype name of the rows ("float16", "float32")
    shard_counts, fingerprint: of the dataset the rows are aligned to
    attrs:      the caller's attrs; all must be equal (after a JSON round trip) on open
    """

    rows: str
    row_shape: tuple[int, ...]
    dtype: str
    shard_counts: tuple[int, ...]
    fingerprint: str
    attrs: Mapping = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return len(self.shard_counts)

    @property
    def starts(self) -> np.ndarray:
        """(num_shards + 1,) int64: shard s holds ids starts[s]:starts[s+1]."""
        return np.concatenate([[0], np.cumsum(self.shard_counts)]).astype(np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(sum(self.shard_counts)), *self.row_shape)


def exists(path: str | Path) -> bool:
    return (Path(path) / "zarr.json").is_file()


def complete(path: str | Path) -> bool:
    """Whether a store exists at ``path`` with every shard done."""
    import zarr

    return exists(path) and bool(np.all(zarr.open_group(path, mode="r")["done"][:]))


def create(path: str | Path, layout: RowLayout, *, arrays: Mapping[str, np.ndarray] | None = None,
           extra_attrs: Mapping | None = None) -> None:
    """Create an empty store (rows NaN, nothing done) atomically, replacing one at ``path``.

    arrays: extra arrays stored with it, as they are (a kill never leaves a store without them).
    extra_attrs: attrs recorded but not checked on open (e.g. how an extra array was computed).
    """
    import zarr

    with atomic.atomic_path(path) as tmp:
        g = zarr.open_group(tmp, mode="w")
        chunk_rows = max(1, max(layout.shard_counts, default=1))
        g.create_array(layout.rows, shape=layout.shape, dtype=layout.dtype,
                       chunks=(chunk_rows, *layout.row_shape), fill_value=np.nan)
        g.create_array("done", shape=(layout.num_shards,), dtype=bool, chunks=(1,), fill_value=False)
        for name, a in (arrays or {}).items():
            a = np.asarray(a)
            g.create_array(name, shape=a.shape, dtype=a.dtype)[...] = a
        g.attrs.update({**_plain(dict(layout.attrs)), **_plain(dict(extra_attrs or {})),
                        "dataset_fingerprint": layout.fingerprint, "shard_counts": list(layout.shard_counts)})


def _differences(g, layout: RowLayout) -> tuple[bool, list[str]]:
    """(another dataset?, names of the settings that differ) between store ``g`` and ``layout``."""
    other_dataset = (g.attrs.get("dataset_fingerprint") != layout.fingerprint
                     or list(g.attrs.get("shard_counts", [])) != list(layout.shard_counts))
    diffs = [k for k, v in _plain(dict(layout.attrs)).items() if g.attrs.get(k) != v]
    if layout.rows not in g or "done" not in g:
        diffs.append(f"arrays {layout.rows!r} and 'done'")
    else:
        rows = g[layout.rows]
        if tuple(rows.shape) != layout.shape or np.dtype(rows.dtype) != np.dtype(layout.dtype):
            diffs.append(f"{layout.rows} {tuple(rows.shape)} {rows.dtype}")
        if int(rows.chunks[0]) < max(layout.shard_counts, default=1) and layout.num_shards > 1:
            diffs.append("chunking does not match the shards")
    return other_dataset, diffs


def open_rows(path: str | Path, layout: RowLayout, *, on_mismatch: str = "raise",
              hint: str = "") -> "RowStore | None":
    """The store at ``path`` for writing, or None when there is none (or it was discarded).

    on_mismatch: "raise" (ValueError naming what differs and, with ``hint``, the command to
    re-run after removing it) or "discard" (remove the store and return None).
    """
    import zarr

    if on_mismatch not in MISMATCH:
        raise ValueError(f"unknown on_mismatch {on_mismatch!r}; valid: {', '.join(MISMATCH)}")
    path = Path(path)
    if not exists(path):
        return None
    g = zarr.open_group(path, mode="r+")
    other_dataset, diffs = _differences(g, layout)
    if other_dataset or diffs:
        why = ("was made for another version of this dataset" if other_dataset
               else "was made with other settings (differs in: " + ", ".join(diffs) + ")")
        if on_mismatch == "discard":
            log.info("%s %s; removing it and starting over", path, why)
            atomic.remove(path)
            return None
        raise ValueError(f"{path} {why}; remove it and re-run" + (f" {hint}" if hint else ""))
    return RowStore(path, g, layout)


class RowStore:
    """An open store (see the module docstring); rows are written a whole shard at a time."""

    def __init__(self, path: Path, group, layout: RowLayout):
        self.path, self.group, self.layout = path, group, layout

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    def done(self) -> np.ndarray:
        """(num_shards,) bool: which shards' rows are stored."""
        return np.asarray(self.group["done"][:], dtype=bool)

    def undone(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(~self.done())]

    def array(self, name: str) -> np.ndarray:
        """An extra array stored at creation (or the rows), read whole."""
        return np.asarray(self.group[name][...])

    def rows(self) -> np.ndarray:
        """All rows, (N, *row_shape) in the store's dtype; NaN in shards not done."""
        return self.array(self.layout.rows)

    def write_shard(self, shard: int, rows: np.ndarray) -> None:
        """Store one whole shard's rows, then its done flag (a kill in between redoes the shard)."""
        starts = self.layout.starts
        rows = np.asarray(rows, dtype=self.layout.dtype)
        if rows.shape != (self.layout.shard_counts[shard], *self.layout.row_shape):
            raise ValueError(f"shard {shard}: rows of shape {rows.shape}, expected "
                             f"{(self.layout.shard_counts[shard], *self.layout.row_shape)}")
        self.group[self.layout.rows][starts[shard] : starts[shard + 1]] = rows
        self.group["done"][shard] = True

    def collector(self, shards: list[int], after_shard: Callable[[int], None] | None = None) -> "ShardCollector":
        return ShardCollector(self, shards, after_shard)


class ShardCollector:
    """Takes (ids, rows) batches in any order, which may span shards, and writes each of
    ``shards`` (rows, then done flag) as soon as all its rows have arrived; ``after_shard(s)``
    is called after each write (where a crash point goes). Holds at most the partly-read
    shards' rows in memory."""

    def __init__(self, store: RowStore, shards: list[int], after_shard: Callable[[int], None] | None = None):
        self.store, self.after_shard = store, after_shard
        lay = store.layout
        self.starts, self.counts = lay.starts, lay.shard_counts
        self.shard_of = np.repeat(np.arange(lay.num_shards), lay.shard_counts)
        self.filled = {int(s): 0 for s in shards}
        self.pending: dict[int, np.ndarray] = {}  # rows of shards being read, allocated on first use

    def add(self, ids: np.ndarray, rows: np.ndarray) -> list[int]:
        """Place rows (len(ids), *row_shape) by sample id; returns the shards this batch completed."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.asarray(rows)
        lay = self.store.layout
        finished = []
        which = self.shard_of[ids]
        for s in np.unique(which):
            s = int(s)
            if s not in self.filled:
                raise ValueError(f"ids of shard {s} given to a collector of shards {sorted(self.filled)}")
            sel = which == s
            buf = self.pending.get(s)
            if buf is None:
                buf = self.pending[s] = np.zeros((self.counts[s], *lay.row_shape), dtype=lay.dtype)
            buf[ids[sel] - self.starts[s]] = rows[sel]
            self.filled[s] += int(sel.sum())
            if self.filled[s] == self.counts[s]:
                self.store.write_shard(s, self.pending.pop(s))
                finished.append(s)
                if self.after_shard is not None:
                    self.after_shard(s)
        return finished

    def unfinished(self) -> list[int]:
        """The shards not (yet) written: after the last batch, those that were not read completely."""
        return sorted(s for s, n in self.filled.items() if n != self.counts[s])


def read_rows(path: str | Path, name: str, *, dtype: str | None = None) -> np.ndarray:
    """The whole array ``name`` of the store at ``path`` as (N, *row_shape) numpy in ``dtype``
    (default: the stored dtype), read one chunk (= one shard) at a time into one preallocated
    array: peak memory is the result plus one chunk, never the result twice (a whole-array
    read of float16 followed by a float32 cast holds both)."""
    import zarr

    arr = zarr.open_group(path, mode="r")[name]
    out = np.empty(arr.shape, dtype=np.dtype(dtype or arr.dtype))
    step = max(1, int(arr.chunks[0]))
    for start in range(0, arr.shape[0], step):
        out[start : start + step] = arr[start : start + step]
    return out
