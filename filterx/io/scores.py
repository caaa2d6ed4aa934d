"""The scores store of a dataset dir, aligned to sample ids:

    DATASET/scores.zarr/<name>      (N,) float32, NaN where not scored; attrs say how it was made
    DATASET/scores.zarr/.work-<name>/   a resumable run's work toward <name> (hidden)

Readers (select, report, info, other code) need only this module, not the score stage.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from filterx.io import atomic
from filterx.io.dataset import Dataset

WORK_PREFIX = ".work-"  # scores.zarr/.work-<name>: a resumable run's work (filterx.scorers.lastblock)


def work_path(ds: Dataset, name: str) -> Path:
    """Where a resumable ``score`` keeps its work toward ``scores.zarr/<name>`` (hidden from list_scores)."""
    _check_name(name)
    return ds.scores_path / f"{WORK_PREFIX}{name}"


def write_scores(ds: Dataset, name: str, scores: np.ndarray, attrs: dict) -> Path:
    """Store (N,) float32 ``scores`` as ``scores.zarr/<name>`` atomically (replacing an old one)."""
    import zarr

    _check_name(name)
    root = ensure_scores_root(ds)
    atomic.clean_stale_tmp(root)
    out = root / name
    with atomic.atomic_path(out) as tmp:
        arr = zarr.create_array(tmp, shape=scores.shape, dtype="float32", chunks=(max(1, min(len(scores), 1 << 20)),),
                                fill_value=np.nan)
        arr[:] = scores
        arr.attrs.update(attrs)
    return out


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid score name {name!r}: a non-empty name without '/' that does not start with '.'")


def ensure_scores_root(ds: Dataset) -> Path:
    """``scores.zarr``, created (atomically) if missing."""
    import zarr

    root = ds.scores_path
    if not (root / "zarr.json").is_file():
        with atomic.atomic_path(root) as tmp:
            zarr.open_group(tmp, mode="w").attrs["filterx_scores"] = 1
    return root


def list_scores(ds: Dataset) -> list[str]:
    """Names of the score arrays stored with ``ds`` (not work stores or temporaries: hidden names)."""
    root = ds.scores_path
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if (p / "zarr.json").is_file() and not p.name.startswith(".") and atomic.TMP_MARK not in p.name)


def read_scores(ds: Dataset, name: str) -> tuple[np.ndarray, dict]:
    """((N,) float32 scores, attrs) of ``scores.zarr/<name>``; errors list the stored names."""
    import zarr

    if name not in list_scores(ds):
        have = ", ".join(list_scores(ds)) or "none yet"
        raise ValueError(f"{ds.root} has no scores named {name!r} (stored: {have}); "
                         f"run: filterx score --method {name} --source {ds.root} ...")
    arr = zarr.open_array(ds.scores_path / name, mode="r")
    scores = np.asarray(arr[:], dtype=np.float32)
    if scores.shape != (ds.num_samples,):
        raise ValueError(f"scores {name!r} have {scores.shape[0]} rows but {ds.root} has {ds.num_samples} samples")
    return scores, dict(arr.attrs)


def write_table(path: Path, rows: list[dict]) -> None:
    """Write row dicts as CSV atomically (columns in first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
