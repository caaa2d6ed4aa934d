"""select: stored scores -> a manifest of the samples to keep.

Budget: exactly one of ``fraction`` (of the scored samples), ``count``, or ``threshold``
(keep every score >= threshold). Order: score descending, ties broken by the lower sample id,
NaN (unscored) never selected, so the same scores always give the same selection.
``per_class_cap`` keeps at most that many samples of any one class, walking down the ranking
until the budget is met or the ranking is exhausted; unlabelled samples (label -1) belong to
no class and are not capped (capping them as one class would shrink the selection of an
unlabelled pool to the cap).

Rank fusion (``combine``): several stored score arrays, each turned into normalised ranks over
the samples every one of them scores (0 = best, 1 = worst; tied scores share their average
rank, so a method that ties many samples, such as a class mask, adds no id order of its own),
combined per sample by their mean (``rank-mean``), their best (``rank-min``: the union of the
scores' top lists) or their worst (``rank-max``: their intersection, a sample kept only as far
as every score ranks it high, as DataComp intersects its filters); the fused score is 1 minus
that, so higher still means keep first, and select ranks it as any other score (ties by the
lower id). A sample some method left unscored (NaN) is NaN in the fused score: never
selected.

A NaN threshold is refused (no score is >= NaN). A budget that selects nothing (a threshold
above every score, a fraction that rounds to no sample, a pool with no scored sample) still
writes its empty manifest, with a warning saying why (logged, and in the summary).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from filterx.io import atomic, manifest
from filterx.io.dataset import Dataset
from filterx.io.scores import read_scores

log = logging.getLogger(__name__)


def rank_ids(scores: np.ndarray) -> np.ndarray:
    """Ids of the scored (non-NaN) samples, best first; ties by ascending id."""
    scores = np.asarray(scores, dtype=np.float64)
    ids = np.flatnonzero(~np.isnan(scores))
    order = np.lexsort((ids, -scores[ids]))
    return ids[order]


COMBINE = ("rank-mean", "rank-min", "rank-max")


def normalised_ranks(scores: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """(N,) float64 rank of each ``scored`` sample among the scored ones, higher score first,
    scaled to [0, 1] (0 = best; a single scored sample is 0); ties take their average rank;
    NaN where not ``scored``."""
    from scipy.stats import rankdata

    out = np.full(len(scores), np.nan)
    n = int(scored.sum())
    if n:
        r = rankdata(-np.asarray(scores, dtype=np.float64)[scored], method="average") - 1
        out[scored] = r / max(n - 1, 1)
    return out


def fuse_ranks(arrays: list[np.ndarray], combine: str) -> np.ndarray:
    """(N,) float64 fused score of several (N,) score arrays, higher = keep first, in [0, 1].

    Ranks are taken over the samples every array scores; the rest are NaN. ``rank-mean``:
    1 - the mean normalised rank; ``rank-min``: 1 - the best normalised rank; ``rank-max``:
    1 - the worst, so the samples at or above a fused score t are exactly those every array
    ranks within its best 1 - t.
    """
    if combine not in COMBINE:
        raise ValueError(f"unknown --combine {combine!r}; valid: {', '.join(COMBINE)}")
    if len(arrays) < 2:
        raise ValueError(f"--combine {combine} needs several score arrays, got {len(arrays)}")
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    scored = np.logical_and.reduce([~np.isnan(a) for a in arrays])
    ranks = np.stack([normalised_ranks(a, scored) for a in arrays])
    combined = {"rank-mean": np.mean, "rank-min": np.min, "rank-max": np.max}[combine](ranks, axis=0)
    return 1.0 - combined


def split_methods(method: str, combine: str | None) -> list[str]:
    """The score names of ``--method`` (comma-separated for fusion), checked against ``combine``."""
    names = [m.strip() for m in method.split(",")]
    if any(not m for m in names):
        raise ValueError(f"--method {method!r} has an empty name; give NAME or NAME,NAME,...")
    if len(set(names)) < len(names):
        raise ValueError(f"--method {method!r} names a score twice; name each once")
    if combine is None and len(names) > 1:
        raise ValueError(f"--method {method!r} names {len(names)} scores; fuse them with "
                         f"--combine ({', '.join(COMBINE)}) or name one")
    if combine is not None and len(names) < 2:
        raise ValueError(f"--combine {combine} needs several scores (--method A,B[,C]), got only {method!r}")
    if combine is not None and combine not in COMBINE:
        raise ValueError(f"unknown --combine {combine!r}; valid: {', '.join(COMBINE)}")
    return names


def budget_count(num_scored: int, *, fraction: float | None = None, count: int | None = None) -> int:
    """How many samples a fraction or count budget keeps (fraction of the scored samples)."""
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
        return int(round(fraction * num_scored))
    if count is None or count < 1:
        raise ValueError(f"--count must be >= 1, got {count}")
    if count > num_scored:
        raise ValueError(f"--count {count} is more than the {num_scored} scored samples")
    return count


def select_ids(scores: np.ndarray, *, fraction: float | None = None, count: int | None = None,
               threshold: float | None = None, labels: np.ndarray | None = None,
               per_class_cap: int | None = None) -> np.ndarray:
    """Selected sample ids in rank order (best first). Exactly one budget must be given."""
    given = [b is not None for b in (fraction, count, threshold)]
    if sum(given) != 1:
        raise ValueError("give exactly one of --fraction, --count, --threshold")
    if threshold is not None and math.isnan(threshold):
        raise ValueError("--threshold must be a number, got nan: no score is >= NaN, so it would select nothing")
    ranked = rank_ids(scores)
    if threshold is not None:
        ranked = ranked[np.asarray(scores)[ranked] >= threshold]
        limit = len(ranked)
    else:
        limit = budget_count(len(ranked), fraction=fraction, count=count)
    if per_class_cap is None:
        return ranked[:limit]
    if per_class_cap < 1:
        raise ValueError(f"--per-class-cap must be >= 1, got {per_class_cap}")
    if labels is None:
        raise ValueError("--per-class-cap needs sample labels")
    lab = np.asarray(labels)[ranked]
    # rank of each sample within its class along the ranking: keep those under the cap;
    # label -1 (unlabelled) is no class, so it is never capped
    order = np.argsort(lab, kind="stable")
    sorted_lab = lab[order]
    first = np.searchsorted(sorted_lab, sorted_lab, side="left")
    within = np.empty(len(lab), dtype=np.int64)
    within[order] = np.arange(len(lab)) - first
    return ranked[(within < per_class_cap) | (lab < 0)][:limit]


def why_nothing_selected(scores: np.ndarray, *, fraction: float | None = None, count: int | None = None,
                         threshold: float | None = None) -> str:
    """Why a budget selects no sample of ``scores`` (N,) float: one sentence for the user."""
    scores = np.asarray(scores, dtype=np.float64)
    scored = scores[~np.isnan(scores)]
    if scored.size == 0:
        return f"no sample is scored (all {scores.size} scores are NaN); nothing selected"
    if threshold is not None:
        return (f"threshold {threshold:g} is above the highest score {float(scored.max()):.6g}; "
                "nothing selected")
    if fraction is not None:
        return (f"fraction {fraction:g} of the {scored.size} scored samples rounds to 0 samples; "
                "nothing selected")
    return f"the budget (count {count}) selects nothing"


@dataclass(frozen=True)
class SelectConfig:
    source: Path
    method: str  # name of the stored score array; with ``combine``, several names "a,b,..."
    output: Path
    fraction: float | None = None
    count: int | None = None
    threshold: float | None = None
    per_class_cap: int | None = None
    fmt: str | None = None  # inferred from the output name when None
    txt_field: str = "key"
    encoder_tag: str | None = None  # refuse scores made with another encoder
    quiet: bool = False
    combine: str | None = None  # rank fusion of several methods: one of COMBINE


@dataclass(frozen=True)
class SelectSummary:
    output: Path
    fmt: str
    selected: int
    scored: int
    classes_kept: int
    classes_removed: int
    images_removed: int
    seconds: float
    warnings: tuple[str, ...] = ()  # also logged: e.g. why nothing was selected

    def line(self) -> str:
        return (f"selected {self.selected} of {self.scored} scored samples "
                f"({self.selected / max(self.scored, 1):.1%}) into {self.output} ({self.fmt}) in "
                f"{self.seconds:.1f}s ({self.selected / max(self.seconds, 1e-9):.0f} samples/s); "
                f"classes kept: {self.classes_kept}, removed entirely: {self.classes_removed}; "
                f"images removed: {self.images_removed}")


def infer_format(output: Path, fmt: str | None) -> str:
    if fmt is not None:
        manifest.get_format(fmt)  # names the valid ones
        return fmt
    named = manifest.format_of(output)
    if named:
        return named
    if output.suffix == "":
        return "wds"
    suffixes = [f.suffix for f in map(manifest.get_format, manifest.list_formats()) if f.suffix]
    files = ", ".join(suffixes[:-1]) + " or " + suffixes[-1] if len(suffixes) > 1 else "".join(suffixes)
    raise ValueError(f"cannot tell the format of {output.name!r}; name it {files}, "
                     f"a directory for wds, or pass --format ({', '.join(manifest.list_formats())})")


def select(cfg: SelectConfig) -> SelectSummary:
    """Select from ``cfg.source``'s stored scores ``cfg.method`` and write the manifest."""
    t0 = time.perf_counter()
    out = Path(cfg.output)
    fmt = infer_format(out, cfg.fmt)
    if fmt != "wds" and out.is_dir():
        raise ValueError(f"-o {out} is a directory, and a {fmt} manifest is a file: name a file "
                         f"(e.g. {out / ('subset.' + fmt)}), or pass --format wds to write a directory")
    names = split_methods(cfg.method, cfg.combine)
    ds = Dataset.open(cfg.source)
    stored = [read_scores(ds, name) for name in names]
    for name, (_, attrs) in zip(names, stored):
        used = (attrs.get("encoder") or {}).get("tag")
        if cfg.encoder_tag and used and used != cfg.encoder_tag:
            raise ValueError(f"scores {name!r} in {ds.root} were made with encoder {used}, "
                             f"not the requested {cfg.encoder_tag}; re-run filterx score with that encoder")
    recorded = [{k: attrs.get(k) for k in ("method", "params", "seed", "encoder", "candidates")} for _, attrs in stored]
    if cfg.combine is None:
        scores, extra = stored[0][0], {"scores": recorded[0]}
    else:
        scores = fuse_ranks([s for s, _ in stored], cfg.combine)
        extra = {"methods": names, "combine": cfg.combine, "scores": dict(zip(names, recorded))}
    ranked = select_ids(scores, fraction=cfg.fraction, count=cfg.count, threshold=cfg.threshold,
                        labels=ds.labels, per_class_cap=cfg.per_class_cap)
    scored = int((~np.isnan(scores)).sum())
    warnings = []
    if len(ranked) == 0:
        warnings.append(f"scores {cfg.method!r}: " + why_nothing_selected(
            scores, fraction=cfg.fraction, count=cfg.count, threshold=cfg.threshold))
    elif cfg.per_class_cap is not None and cfg.threshold is None:
        wanted = budget_count(scored, fraction=cfg.fraction, count=cfg.count)
        if len(ranked) < wanted:
            warnings.append(f"--per-class-cap {cfg.per_class_cap} leaves {len(ranked)} samples, "
                            f"fewer than the {wanted} the budget asks for")
    for w in warnings:
        log.warning("%s", w)
    budget = {k: v for k, v in (("fraction", cfg.fraction), ("count", cfg.count), ("threshold", cfg.threshold)) if v is not None}
    header = manifest.make_header(ds, ",".join(names), budget, len(ranked),
                                  {"per_class_cap": cfg.per_class_cap, **extra})
    with _output_lock(out):
        manifest.write_manifest(out, fmt, ds, ranked, scores[ranked], header, txt_field=cfg.txt_field,
                                quiet=cfg.quiet)
    pool = ds.labels[~np.isnan(scores)]
    kept = np.unique(ds.labels[ranked][ds.labels[ranked] >= 0])
    present = np.unique(pool[pool >= 0])
    return SelectSummary(Path(cfg.output), fmt, len(ranked), scored, len(kept),
                         len(np.setdiff1d(present, kept)), scored - len(ranked), time.perf_counter() - t0,
                         tuple(warnings))


def _output_lock(out: Path):
    """The run lock of the manifest ``out`` (a lock file in its directory); a refusal names
    the output, not the directory the lock file lives in."""
    return atomic.run_lock(out.parent, f"select-{out.name}", output=out)
