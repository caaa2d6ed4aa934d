"""Manifests: the hand-off from filterx to any training code.

Formats (all carry, or sit beside, a header naming the dataset, its fingerprint, the method
and the budget):

- ``jsonl``: a header line ``{"filterx_manifest": 1, "dataset": ..., "fingerprint": ...,
  "method": ..., "budget": ..., "count": ...}``, then one line per selected sample in rank
  order (best first): ``{"id", "key", "shard", "label", "score"}``.
- ``npy``: the selected ids, sorted, int64; the header goes to ``<file>.json`` beside it.
- ``txt``: one key (or original path, relative to the source root) per line, rank order; the
  header goes to ``<file>.json`` beside it.
- ``wds``: a directory with ``shards/NNNNNN.tar`` + DALI ``.idx`` files holding the selected
  samples' original members (no re-encoding), in id order, and ``manifest.jsonl``. Any
  WebDataset or DALI reader reads it; keys are still the original sample ids. It is written
  tar by tar into ``<dir>.partial`` and renamed when complete; a killed run's re-run keeps
  the finished tars.

``read_manifest`` loads any of them; ``ManifestDataset`` is a map-style torch Dataset over a
manifest for users who do not use DALI.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from filterx.io import atomic, tario
from filterx.io.dataset import SHARDS, Dataset, shard_name
from filterx.core.faults import crash_point

MANIFEST_FORMAT = 1
WDS_MANIFEST = "manifest.jsonl"
PARTIAL = ".partial"  # suffix of a wds manifest being written


@dataclass(frozen=True)
class Manifest:
    """A selection read back from disk.

    ids:     (K,) int64 selected sample ids, sorted
    ranked:  (K,) int64 the same ids in rank order (best first) where the format keeps it
    scores:  (K,) float32 scores in rank order, or None
    dataset: the dataset dir the ids index
    tars:    for ``wds`` manifests, the tars holding exactly the selected samples
    """

    ids: np.ndarray
    ranked: np.ndarray
    scores: np.ndarray | None
    header: dict
    path: Path
    tars: list[Path] | None = None

    @property
    def dataset(self) -> Path:
        return Path(self.header["dataset"])

    @property
    def fingerprint(self) -> str | None:
        return self.header.get("fingerprint")

    def open_dataset(self) -> Dataset:
        """The dataset this manifest selects from; one-line errors when it is missing or differs."""
        if not self.dataset.exists():
            raise FileNotFoundError(f"manifest {self.path} selects from {self.dataset}, which does not exist")
        ds = Dataset.open(self.dataset)
        if self.fingerprint and ds.fingerprint != self.fingerprint:
            raise ValueError(f"manifest {self.path} was made for another dataset than {ds.root} "
                             f"(fingerprint {self.fingerprint} != {ds.fingerprint})")
        if len(self.ids) and (self.ids[0] < 0 or self.ids[-1] >= ds.num_samples):
            raise ValueError(f"manifest {self.path} holds ids outside 0..{ds.num_samples - 1} of {ds.root}")
        return ds


def make_header(ds: Dataset, method: str, budget: dict, count: int, extra: dict | None = None) -> dict:
    import filterx

    header = {"filterx_manifest": MANIFEST_FORMAT, "dataset": str(ds.root), "fingerprint": ds.fingerprint,
              "method": method, "budget": budget, "count": int(count), "filterx_version": filterx.__version__}
    header.update(extra or {})
    return header


def _rows(ds: Dataset, ranked: np.ndarray, scores: np.ndarray):
    keys, shards, labels = ds.keys, ds.shards, ds.labels
    for i, s in zip(ranked.tolist(), scores.tolist()):
        yield {"id": i, "key": str(keys[i]), "shard": int(shards[i]), "label": int(labels[i]), "score": s}


def _jsonl_text(header: dict, rows) -> str:
    lines = [json.dumps(header, sort_keys=True, ensure_ascii=False)]
    lines += [json.dumps(r, sort_keys=True) for r in rows]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ManifestFormat:
    """One way to write a selection. ``write(path, ds, ranked, scores, header, **options)``;
    ``read(path) -> Manifest``; ``suffix``: the file name ending that names the format (None for
    a directory format, told apart by ``is_mine(path)``)."""

    name: str
    write: Callable
    read: Callable[[Path], "Manifest"]
    suffix: str | None = None
    is_mine: Callable[[Path], bool] | None = None


_FORMATS: dict[str, ManifestFormat] = {}


def register_format(name: str, *, write: Callable, read: Callable, suffix: str | None = None,
                    is_mine: Callable[[Path], bool] | None = None) -> ManifestFormat:
    """Register a manifest format: ``select --format NAME`` writes it, ``read_manifest`` reads it."""
    if (suffix is None) == (is_mine is None):
        raise ValueError(f"format {name!r}: give a file suffix, or is_mine() for a directory format")
    fmt = ManifestFormat(name, write, read, suffix, is_mine)
    _FORMATS[name] = fmt
    return fmt


def list_formats() -> list[str]:
    return list(_FORMATS)


def get_format(name: str) -> ManifestFormat:
    if name not in _FORMATS:
        raise ValueError(f"unknown manifest format {name!r}; valid: {', '.join(_FORMATS)}")
    return _FORMATS[name]


def format_of(path: Path) -> str | None:
    """The format a path names: a registered suffix, or a directory one of them claims."""
    for f in _FORMATS.values():
        if f.suffix is not None and path.suffix == f.suffix:
            return f.name
    return None


def write_manifest(path: str | Path, fmt: str, ds: Dataset, ranked: np.ndarray, scores: np.ndarray,
                   header: dict, **options) -> Path:
    """Write a selection (ids in rank order with their scores) as ``fmt``; atomic. ``options``
    go to the format's writer (txt: ``txt_field``; wds: ``quiet``)."""
    path = Path(path)
    get_format(fmt).write(path, ds, np.asarray(ranked, dtype=np.int64), scores, header, **options)
    return path


def _write_jsonl(path: Path, ds: Dataset, ranked, scores, header: dict, **_) -> None:
    atomic.write_text(path, _jsonl_text(header, _rows(ds, ranked, scores)))


def _write_npy(path: Path, ds: Dataset, ranked, scores, header: dict, **_) -> None:
    # the header first: the selection itself appears last, when it is complete and described
    atomic.write_text(_sidecar(path), json.dumps(header, sort_keys=True, indent=1))
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.sort(ranked))


def _write_txt(path: Path, ds: Dataset, ranked, scores, header: dict, *, txt_field: str = "key", **_) -> None:
    if txt_field not in ("key", "path"):
        raise ValueError(f"unknown txt field {txt_field!r}; valid: key, path")
    values = (ds.keys if txt_field == "key" else ds.paths)[ranked]
    atomic.write_text(_sidecar(path), json.dumps({**header, "txt_field": txt_field}, sort_keys=True, indent=1))
    atomic.write_text(path, "".join(f"{v}\n" for v in values))


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_wds(out: Path, ds: Dataset, ranked: np.ndarray, scores: np.ndarray, header: dict,
              *, shard_size: int | None = None, quiet: bool = True) -> Path:
    """Copy the selected samples' members (original bytes) into new tars under ``out``.

    Resumable and atomic as a whole: tars are written one at a time into ``<out>.partial``
    (a stable name, with a plan naming the dataset, the selected ids and the shard size); a
    re-run after a kill keeps the tars already complete and writes the rest, and the directory
    is renamed to ``out`` only when every tar and the manifest are in it. A partial directory
    from another selection is discarded.
    """
    from filterx.core.progress import progress

    ids = np.sort(ranked)
    size = shard_size or int(ds.attrs.get("shard_size", 1000))
    ds.ensure_indexes()
    plan = {"dataset_fingerprint": ds.fingerprint, "shard_size": size, "count": int(len(ids)),
            "ids_sha256": hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()}
    work = out.with_name(out.name + PARTIAL)
    plan_file = work / "plan.json"
    if work.exists() and (not plan_file.is_file() or json.loads(plan_file.read_text()) != plan):
        atomic.remove(work)
    if not work.exists():
        with atomic.atomic_path(work) as tmp:
            (tmp / SHARDS).mkdir(parents=True)
            (tmp / "plan.json").write_text(json.dumps(plan, sort_keys=True))
    atomic.clean_stale_tmp(work / SHARDS)
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    bar = progress(total=len(ids), desc="select: copy", quiet=quiet)
    for n, chunk in enumerate(chunks):
        tar = work / SHARDS / f"{shard_name(n)}.tar"
        if not tario.tar_complete(tar, (str(k) for k in ds.keys[chunk])):
            tario.write_tar(tar, _copy_samples(ds, chunk))
            crash_point("select.tar")
        bar.update(len(chunk))
    bar.close()
    atomic.write_text(work / WDS_MANIFEST, _jsonl_text({**header, "format": "wds"}, _rows(ds, ranked, scores)))
    plan_file.unlink()
    atomic.commit(work, out)
    return out


def _copy_samples(ds: Dataset, ids: np.ndarray):
    """TarSamples with every member of each id, read by offset from the dataset's tars."""
    shards = ds.shards[ids]
    for s in np.unique(shards):
        wanted = {str(k) for k in ds.keys[ids[shards == s]]}
        members: dict[str, dict[str, bytes]] = {}
        entries = [e for e in tario.read_index(ds.index_path(s)) if e.key in wanted]
        for e, data in tario.read_members(ds.shard_path(s), entries):
            members.setdefault(e.key, {})[e.ext] = data
        for key in sorted(members):
            yield tario.TarSample(key, members[key])


def read_manifest(path: str | Path) -> Manifest:
    """Load a manifest of any registered format: a directory a format claims (wds), else by
    its suffix (.npy, .txt), else jsonl."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    if path.is_dir():
        for f in _FORMATS.values():
            if f.is_mine is not None and f.is_mine(path):
                return f.read(path)
        raise ValueError(f"{path} is a directory but not a wds manifest (no {WDS_MANIFEST})")
    return get_format(format_of(path) or "jsonl").read(path)


def _read_wds(path: Path) -> Manifest:
    m = _read_jsonl(path / WDS_MANIFEST)
    tars = sorted((path / SHARDS).glob("*.tar"))
    return Manifest(m.ids, m.ranked, m.scores, m.header, path, tars)


def _read_npy(path: Path) -> Manifest:
    ids = np.load(path, allow_pickle=False)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{path}: expected a 1-D integer array of sample ids, got {ids.dtype} {ids.shape}")
    header = _read_sidecar(path)
    ids = ids.astype(np.int64)
    return Manifest(np.sort(ids), ids, None, header, path)


def _read_txt(path: Path) -> Manifest:
    header = _read_sidecar(path)
    values = [v for v in path.read_text(encoding="utf-8").splitlines() if v]
    if "dataset" not in header:
        raise ValueError(f"{path}: a txt manifest needs its header {_sidecar(path).name} to map keys to ids")
    ds = Dataset.open(header["dataset"])
    field = header.get("txt_field", "key")
    lookup = {str(v): i for i, v in enumerate(ds.keys if field == "key" else ds.paths)}
    missing = [v for v in values if v not in lookup]
    if missing:
        raise ValueError(f"{path}: {len(missing)} entries are not in {ds.root}, e.g. {missing[0]!r}")
    ranked = np.array([lookup[v] for v in values], dtype=np.int64)
    return Manifest(np.sort(ranked), ranked, None, header, path)


def _read_sidecar(path: Path) -> dict:
    side = _sidecar(path)
    return json.loads(side.read_text()) if side.is_file() else {}


def _read_jsonl(path: Path) -> Manifest:
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0])
        rows = [json.loads(line) for line in lines[1:] if line]
    except (IndexError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a filterx manifest ({exc})") from None
    if header.get("filterx_manifest") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a filterx manifest (first line has no filterx_manifest: {MANIFEST_FORMAT})")
    if header.get("count") is not None and header["count"] != len(rows):
        raise ValueError(f"{path}: header says {header['count']} samples but {len(rows)} lines follow (truncated?)")
    ranked = np.array([r["id"] for r in rows], dtype=np.int64)
    scores = np.array([r.get("score", np.nan) for r in rows], dtype=np.float32)
    return Manifest(np.sort(ranked), ranked, scores, header, path)


register_format("jsonl", write=_write_jsonl, read=_read_jsonl, suffix=".jsonl")
register_format("npy", write=_write_npy, read=_read_npy, suffix=".npy")
register_format("txt", write=_write_txt, read=_read_txt, suffix=".txt")
register_format("wds", write=lambda path, ds, ranked, scores, header, quiet=True, **_: write_wds(
    path, ds, ranked, scores, header, quiet=quiet), read=_read_wds, is_mine=lambda p: (p / WDS_MANIFEST).is_file())


class ManifestDataset:
    """A map-style torch Dataset over a manifest: item i -> (image, label, sample id).

    Images are decoded with PIL (RGB) and passed through ``transform`` (e.g. torchvision
    transforms); without one, a uint8 (3, H, W) tensor is returned. Members are read by offset,
    so workers only touch the bytes they need.
    """

    def __init__(self, manifest: str | Path | Manifest, transform=None):
        self.manifest = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
        self.ds = self.manifest.open_dataset()
        self.transform = transform
        self.ds.ensure_indexes()
        entries: dict[tuple[int, str], tario.MemberEntry] = {}
        for s in np.unique(self.ds.shards[self.manifest.ids]):
            for e in tario.read_index(self.ds.index_path(s)):
                if e.ext == "jpg":
                    entries[(int(s), e.key)] = e
        self._entries = [entries[(int(self.ds.shards[i]), str(self.ds.keys[i]))] for i in self.manifest.ids]

    def __len__(self) -> int:
        return len(self.manifest.ids)

    def __getitem__(self, i: int):
        import io

        import torch
        from PIL import Image

        sample_id = int(self.manifest.ids[i])
        e = self._entries[i]
        with open(self.ds.shard_path(int(self.ds.shards[sample_id])), "rb") as f:
            f.seek(e.offset)
            data = f.read(e.size)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        else:
            img = torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())
        return img, int(self.ds.labels[sample_id]), sample_id
