"""info: what a dataset dir holds, in one screen (``filterx info DATASET``).

``dataset_info(path)`` reads only metadata (``index.zarr`` arrays and attrs, file sizes, the
embeddings' done masks, the score arrays) and never writes. Its result is a frozen
``DatasetInfo`` whose ``to_dict()`` is plain JSON and whose ``text()`` is the screen a user
reads; ``line()`` is the one-line summary.

``DATASET/configs/`` holds the options of the commands that wrote into the dataset dir
(``embed-<encoder tag>.yaml``, ``score-<name>.yaml``, saved by ``filterx.cli``); info lists
them and reads nothing else from there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from filterx.dataset import EMBEDDINGS, SHARD_REPORT, Dataset
from filterx.score import list_scores, read_scores

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

    @property
    def indexes_present(self) -> bool:
        return not self.missing_indexes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["root"] = str(self.root)
        d["indexes_present"] = self.indexes_present
        for e, emb in zip(d["embeddings"], self.embeddings):
            e["complete"] = emb.complete
        return json.loads(json.dumps(d))

    def line(self) -> str:
        return (f"{self.root}: {self.samples} samples, {self.num_classes} classes "
                f"({len(self.empty_classes)} empty), {self.num_shards} shards ({_size(self.shard_bytes)}), "
                f"{len(self.embeddings)} embedding store(s), {len(self.scores)} score array(s)")

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
    shard_bytes, missing_tars, missing_idx = 0, [], []
    for s in range(ds.num_shards):
        for p, missing in ((ds.shard_path(s), missing_tars), (ds.index_path(s), missing_idx)):
            if p.is_file():
                shard_bytes += p.stat().st_size
            else:
                missing.append(s)
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
        filterx_version=ds.attrs.get("filterx_version"), fingerprint=ds.fingerprint, configs=_configs(ds))
