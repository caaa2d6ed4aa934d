"""info: what a dataset dir holds, in one screen (``filterx info DATASET``).

``dataset_info(path)`` reads only metadata (``index.zarr`` arrays and attrs, file sizes, the
embeddings' done masks, the score arrays) and never writes. Its result is a frozen
``DatasetInfo`` whose ``to_dict()`` is plain JSON and whose ``text()`` is the screen a user
reads; ``line()`` is the one-line summary.

Shards are checked cheaply, without reading their data: a tar whose size does not match what
its DALI index says (the end of its last member, padded as tar pads; see
``filterx.io.tario.tar_size_bounds``) or whose index lists another number of samples than
``index.zarr`` is reported as damaged (``DatasetInfo.damaged_shards``); a shard without an
index is checked by reading its tar headers instead. ``DatasetInfo.healthy`` is False when a
tar is missing or damaged (``filterx info`` then warns and exits 1).

``DATASET/configs/`` holds the options of the commands that wrote into the dataset dir
(``embed-<encoder tag>.yaml``, ``score-<name>.yaml``, saved by ``filterx.cli.commands``); info lists
them and reads nothing else from there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from filterx.io import tario
from filterx.io.dataset import EMBEDDINGS, SHARD_REPORT, Dataset
from filterx.io.scores import list_scores, read_scores

TOP_CLASSES = 10
CONFIGS = "configs"  # saved command options, see the module doc


@dataclass(frozen=True)
class ClassCount:
    name: str
    count: int


@dataclass(frozen=True)
class EmbeddingsInfo:
    """One ``embeddings/<tag>.zarr`` store: ``shape`` (N, D); ``shards_done`` of ``num_shards``."""

    tag: str
    arch: str | None
    resolution: int | None
    shape: tuple[int, int]
    dtype: str
    shards_done: int
    num_shards: int

    @property
    def complete(self) -> bool:
        return self.shards_done == self.num_shards


@dataclass(frozen=True)
class ScoreInfo:
    """One ``scores.zarr/<name>`` array; min/median/max over the scored (non-NaN) samples."""

    name: str
    method: str | None
    params: dict
    encoder_tag: str | None
    seed: int | None
    scored: int
    nan: int
    min: float | None
    median: float | None
    max: float | None
    same_dataset: bool | None  # scores made for this dataset's fingerprint (None: not recorded)


@dataclass(frozen=True)
class DamagedShard:
    """A shard that readers will fail on. ``problem``: "truncated" (the tar is shorter than its
    index says), "oversized" (longer: the index is not this tar's), "index" (the index is
    unreadable or lists another number of samples than index.zarr), "unreadable" (no index,
    and the tar's headers cannot be read to the end)."""

    shard: int
    problem: str
    detail: str


@dataclass(frozen=True)
class DatasetInfo:
    root: Path
    samples: int
    num_classes: int
    empty_classes: tuple[str, ...]
    top_classes: tuple[ClassCount, ...]  # the most frequent classes, most first
    num_shards: int
    shard_sizes: tuple[int, ...]  # samples per shard
    shard_bytes: int  # tars + DALI indexes
    total_bytes: int  # everything under the dataset dir
    missing_tars: tuple[int, ...]
    missing_indexes: tuple[int, ...]  # shards without a DALI index file
    embeddings: tuple[EmbeddingsInfo, ...]
    scores: tuple[ScoreInfo, ...]
    skipped_inputs: int | None  # from shard_report.json; None when there is none
    source_root: str | None
    filterx_version: str | None
    fingerprint: str
    configs: tuple[str, ...] = ()  # saved options under configs/, by file name
    damaged_shards: tuple[DamagedShard, ...] = ()

    @property
    def indexes_present(self) -> bool:
        return not self.missing_indexes

    @property
    def healthy(self) -> bool:
        """Every tar is there and matches its index (a missing index alone is rebuilt by the
        commands that read the tars)."""
        return not (self.missing_tars or self.damaged_shards)

    def warning(self) -> str | None:
        """One line on what is wrong with the shards; None when they are healthy."""
        if self.healthy:
            return None
        bad = sorted({d.shard for d in self.damaged_shards} | set(self.missing_tars))
        what = ", ".join(filter(None, (
            f"{len(self.damaged_shards)} damaged" if self.damaged_shards else "",
            f"{len(self.missing_tars)} missing" if self.missing_tars else "")))
        return (f"WARNING: {len(bad)} of {self.num_shards} shards unreadable ({what}: shards {_ints(tuple(bad))}); "
                f"readers will fail on them: restore them or re-shard the dataset")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["root"] = str(self.root)
        d["indexes_present"] = self.indexes_present
        d["healthy"] = self.healthy
        for e, emb in zip(d["embeddings"], self.embeddings):
            e["complete"] = emb.complete
        return json.loads(json.dumps(d))

    def line(self) -> str:
        return (f"{self.root}: {self.samples} samples, {self.num_classes} classes "
                f"({len(self.empty_classes)} empty), {self.num_shards} shards ({_size(self.shard_bytes)}), "
                f"{len(self.embeddings)} embedding store(s), {len(self.scores)} score array(s)"
                + ("" if self.healthy else f"; {len(self.damaged_shards) + len(self.missing_tars)} SHARDS UNREADABLE"))

    def text(self) -> str:
        sizes = self.shard_sizes or (0,)
        lines = [
            f"dataset      {self.root}",
            f"fingerprint  {self.fingerprint}   filterx {self.filterx_version}   source {self.source_root}",
            f"samples      {self.samples}"
            + ("" if self.skipped_inputs is None else f"   ({self.skipped_inputs} inputs skipped by shard)"),
            f"classes      {self.num_classes} ({len(self.empty_classes)} empty"
            + (f": {', '.join(self.empty_classes[:10])}{', ...' if len(self.empty_classes) > 10 else ''})"
               if self.empty_classes else ")"),
            "  top        " + ", ".join(f"{c.name} ({c.count})" for c in self.top_classes),
            f"shards       {self.num_shards}, {_span(min(sizes), max(sizes))} samples each, {_size(self.shard_bytes)} "
            f"(dataset dir {_size(self.total_bytes)}); DALI indexes: "
            + ("all present" if self.indexes_present else f"missing for shards {_ints(self.missing_indexes)}"),
        ]
        if self.missing_tars:
            lines.append(f"  MISSING tars for shards {_ints(self.missing_tars)}")
        for d in self.damaged_shards:
            lines.append(f"  DAMAGED shard {d.shard}: {d.problem}, {d.detail}")
        lines.append(f"embeddings   {len(self.embeddings) or 'none'}")
        for e in self.embeddings:
            lines.append(f"  {e.tag:<32} {e.shape[0]}x{e.shape[1]} {e.dtype}, "
                         f"{e.shards_done}/{e.num_shards} shards done")
        lines.append(f"scores       {len(self.scores) or 'none'}")
        if self.scores:
            w = max(len(s.name) for s in self.scores)
            for s in self.scores:
                stats = ("" if s.min is None else
                         f" min {s.min:.4g} median {s.median:.4g} max {s.max:.4g}")
                params = ", ".join(f"{k}={v}" for k, v in s.params.items() if v is not None)
                stale = "  (MADE FOR ANOTHER DATASET: re-run filterx score)" if s.same_dataset is False else ""
                lines.append(f"  {s.name:<{w}} {s.method}: {s.scored} scored, {s.nan} NaN;{stats}; "
                             f"seed {s.seed}, encoder {s.encoder_tag or '-'}" + (f"; {params}" if params else "")
                             + stale)
        if self.configs:
            lines.append(f"configs      {self.root / CONFIGS}: {', '.join(self.configs)}")
        if not self.healthy:
            lines.append(self.warning())
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _ints(values: tuple[int, ...], limit: int = 8) -> str:
    return ", ".join(map(str, values[:limit])) + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def shard_damage(tar: Path, index: Path | None, samples: int) -> tuple[str, str] | None:
    """What is wrong with one shard's tar of ``samples`` samples, by its size against its DALI
    index (``index``; None: there is none, read the tar's headers instead): (problem, detail)
    as in ``DamagedShard``, or None."""
    if index is None:
        try:
            found = len({e.key for e in tario.scan_tar(tar)})
        except ValueError as exc:
            return "unreadable", f"no DALI index and {str(exc).partition(': ')[2]}"
        return None if found == samples else (
            "index", f"no DALI index and its tar holds {found} samples, index.zarr says {samples}")
    try:
        count, end = tario.index_extent(index)
    except (OSError, ValueError) as exc:
        return "index", f"unreadable DALI index ({exc})"
    if count != samples:
        return "index", f"its DALI index lists {count} samples, index.zarr {samples}"
    size = tar.stat().st_size
    least, most = tario.tar_size_bounds(end)
    if size < least:
        return "truncated", f"{size} bytes of the {least} or more its index needs"
    if size > most:
        return "oversized", f"{size} bytes, more than the {most} at most its index accounts for"
    return None


def _embeddings(ds: Dataset) -> tuple[EmbeddingsInfo, ...]:
    import zarr

    out = []
    folder = ds.root / EMBEDDINGS
    for path in sorted(folder.glob("*.zarr")) if folder.is_dir() else []:
        if not (path / "zarr.json").is_file() or ".tmp-" in path.name:
            continue
        g = zarr.open_group(path, mode="r")
        emb, done = g["emb"], np.asarray(g["done"][:], dtype=bool)
        out.append(EmbeddingsInfo(str(g.attrs.get("encoder_tag", path.stem)), g.attrs.get("arch"),
                                  g.attrs.get("resolution"), tuple(int(x) for x in emb.shape), str(emb.dtype),
                                  int(done.sum()), int(done.size)))
    return tuple(out)


def _configs(ds: Dataset) -> tuple[str, ...]:
    folder = ds.root / CONFIGS
    if not folder.is_dir():
        return ()
    return tuple(sorted(p.name for p in folder.glob("*.yaml") if p.is_file() and ".tmp-" not in p.name))


def score_info(ds: Dataset, name: str) -> ScoreInfo:
    """Summary of one stored score array (its attrs and the distribution of its values)."""
    scores, attrs = read_scores(ds, name)
    valid = scores[~np.isnan(scores)]
    stats = (None, None, None) if not valid.size else (
        float(valid.min()), float(np.median(valid)), float(valid.max()))
    # target-train scores record the source's fingerprint, not the target's they are stored with
    made_for = attrs.get("source_fingerprint") if attrs.get("candidates", "source") == "source" else \
        (attrs.get("target") or {}).get("fingerprint")
    return ScoreInfo(name, attrs.get("method"), dict(attrs.get("params") or {}),
                     (attrs.get("encoder") or {}).get("tag"), attrs.get("seed"),
                     int(valid.size), int(scores.size - valid.size), *stats,
                     None if made_for is None else made_for == ds.fingerprint)


def dataset_info(path: str | Path, *, top: int = TOP_CLASSES) -> DatasetInfo:
    """Everything ``filterx info`` shows about the dataset dir ``path`` (read-only).

    FileNotFoundError (one line) when ``path`` is missing or is not a dataset dir.
    """
    ds = Dataset.open(path)
    labels = ds.labels
    per_class = np.bincount(labels[labels >= 0], minlength=ds.num_classes)
    names = [c.name for c in ds.classes]
    order = np.lexsort((np.arange(len(per_class)), -per_class))  # most first, ties by index
    top_classes = tuple(ClassCount(names[i], int(per_class[i])) for i in order[:top] if per_class[i] > 0)
    shard_bytes, missing_tars, missing_idx, damaged = 0, [], [], []
    for s in range(ds.num_shards):
        for p, missing in ((ds.shard_path(s), missing_tars), (ds.index_path(s), missing_idx)):
            if p.is_file():
                shard_bytes += p.stat().st_size
            else:
                missing.append(s)
        if ds.shard_path(s).is_file():
            index = None if missing_idx and missing_idx[-1] == s else ds.index_path(s)
            if (damage := shard_damage(ds.shard_path(s), index, ds.shard_counts[s])) is not None:
                damaged.append(DamagedShard(s, *damage))
    report = ds.root / SHARD_REPORT
    skipped = None
    if report.is_file():
        try:
            skipped = int(json.loads(report.read_text(encoding="utf-8")).get("skipped", 0))
        except (ValueError, TypeError):
            skipped = None
    return DatasetInfo(
        root=ds.root, samples=ds.num_samples, num_classes=ds.num_classes,
        empty_classes=tuple(names[i] for i in np.flatnonzero(per_class == 0)), top_classes=top_classes,
        num_shards=ds.num_shards, shard_sizes=tuple(ds.shard_counts), shard_bytes=shard_bytes,
        total_bytes=_dir_bytes(ds.root), missing_tars=tuple(missing_tars), missing_indexes=tuple(missing_idx),
        embeddings=_embeddings(ds), scores=tuple(score_info(ds, n) for n in list_scores(ds)),
        skipped_inputs=skipped, source_root=ds.attrs.get("source_root"),
        filterx_version=ds.attrs.get("filterx_version"), fingerprint=ds.fingerprint, configs=_configs(ds),
        damaged_shards=tuple(damaged))
