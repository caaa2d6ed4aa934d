"""report: plots and a summary of the scores stored with a dataset (``filterx report``).

``make_report(dataset, out_dir)`` selects the top ``fraction`` of each stored score array (the
same rule as ``filterx select``: score descending, ties by lower id, NaN never) and writes

    OUT/report.md, report.html       a table per method and the plots below
    OUT/report.json                  the same numbers for scripts (and the mark of a report dir)
    OUT/score_histograms.png         score distribution per method, the selection cut marked
    OUT/selection_overlap.png        Jaccard overlap of the methods' selections (2+ methods)
    OUT/class_share-<name>.png       per-class share of the selection vs the pool
    OUT/images-<name>.png            the top- and bottom-scored images

The directory appears complete or not at all (built under a temporary name, then renamed).
The array functions (``selection_overlap``, ``class_shares``, ``representation_extremes``,
``selection_precision``: :mod:`filterx.report.stats`) hold the numbers; the plotting code
(:mod:`filterx.report.plots`) only draws them; :mod:`filterx.report.render` writes the summary
and the pages.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from filterx.io import atomic
from filterx.io.dataset import ClassInfo, Dataset
from filterx.io.scores import list_scores, read_scores
from filterx.report.plots import plot_class_shares, plot_image_grid, plot_overlap, plot_score_histograms, \
    read_thumbnails
from filterx.report.render import (
    OVERLAP, REPORT_MARK, SCORE_HISTOGRAMS, MethodRow, ReportSummary, render_html, render_markdown,
)
from filterx.report.stats import class_shares, representation_extremes, selection_overlap, selection_precision
from filterx.stages.select import rank_ids, select_ids

log = logging.getLogger(__name__)



def _file_stem(name: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "scores"
    base, n = stem, 1
    while stem in taken:
        n += 1
        stem = f"{base}-{n}"
    taken.add(stem)
    return stem


def _relevant_classes(ds: Dataset, spec) -> tuple[ClassInfo, ...]:
    """The pool classes a relevant-classes spec names. A preset's entries the pool lacks are
    left out and named in a warning (a preset is not written for this pool); names the user
    wrote for classes the pool lacks are an error."""
    if spec is None:
        return ()
    from filterx.io.classes import absent_entries, match_classes

    matches = match_classes(spec, ds.classes, absent="preset")
    missing = absent_entries(matches)
    if missing:
        log.warning("%d of the relevant classes are not in %s and are left out: %s%s", len(missing), ds.root,
                    ", ".join(missing[:10]), ", ..." if len(missing) > 10 else "")
    found = {c.index: c for m in matches for c in m.classes}
    return tuple(found[i] for i in sorted(found))


def display_names(classes: Sequence[ClassInfo]) -> list[str]:
    """A label per class for plots: its name, with the wnid added where names repeat
    (ImageNet has two "crane" and two "maillot" classes)."""
    counts: dict[str, int] = {}
    for c in classes:
        counts[c.name] = counts.get(c.name, 0) + 1
    return [f"{c.name} ({c.wnid or c.index})" if counts[c.name] > 1 else c.name for c in classes]


def _check_out_dir(out: Path) -> None:
    # The finished report replaces out_dir as a whole: refuse to replace anything that is not
    # an earlier report, so that `-o .` or `-o ~/data` cannot delete a user's files.
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT_MARK).is_file())):
        raise ValueError(f"output {str(out)!r} exists and is not a filterx report dir; "
                         "give a new or empty directory (an earlier report there is replaced)")


def make_report(dataset: str | Path, out_dir: str | Path, *, methods: Sequence[str] | None = None,
                fraction: float = 0.1, grid: int = 16,
                relevant_classes: str | Sequence[str] | None = None) -> ReportSummary:
    """Write plots and a summary of ``dataset``'s stored scores to ``out_dir`` (see module doc).

    methods: names of stored score arrays (``filterx info`` lists them); None = all.
    fraction: the share of each method's scored samples its selection keeps, in (0, 1].
    grid: how many top- and how many bottom-scored images to show per method (0 = none).
    relevant_classes: a class spec (names, wnids, ``@file``, ``@office31``; see
    ``filterx.io.classes``) whose samples count as relevant: each selection's precision is
    reported against them, and the histograms split them out.
    """
    t0 = time.perf_counter()
    ds = Dataset.open(dataset)
    stored = list_scores(ds)
    if not stored:
        raise ValueError(f"{ds.root} has no stored scores; run: filterx score --method M --source {ds.root} ...")
    names = list(dict.fromkeys(methods)) if methods else stored
    unknown = [m for m in names if m not in stored]
    if unknown:
        raise ValueError(f"{ds.root} has no scores named {', '.join(map(repr, unknown))}; "
                         f"stored: {', '.join(stored)}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if grid < 0:
        raise ValueError(f"grid must be >= 0 (images per panel), got {grid}")
    out = Path(out_dir).expanduser()
    _check_out_dir(out)
    rel_classes = _relevant_classes(ds, relevant_classes)
    relevant = np.isin(ds.labels, [c.index for c in rel_classes]) if relevant_classes is not None else None
    rel_index = {c.index for c in rel_classes}

    labels, class_names = ds.labels, display_names(ds.classes)
    taken: set[str] = set()
    runs = []  # (name, attrs, scores, selected ids, file stem)
    for name in names:
        scores, attrs = read_scores(ds, name)
        runs.append((name, attrs, scores, select_ids(scores, fraction=fraction), _file_stem(name, taken)))

    with atomic.run_lock(out.parent, f"report-{out.name}"), atomic.atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        files = [SCORE_HISTOGRAMS]
        plot_score_histograms(tmp / SCORE_HISTOGRAMS, [(n, a, s, sel) for n, a, s, sel, _ in runs],
                                    fraction, relevant)
        if len(runs) >= 2:
            files.append(OVERLAP)
            plot_overlap(tmp / OVERLAP, [r[0] for r in runs],
                               selection_overlap([r[3] for r in runs]), fraction)
        rows = []
        for name, attrs, scores, selected, stem in runs:
            scored_mask = ~np.isnan(scores)
            pool_share, sel_share = class_shares(labels[scored_mask], labels[selected], ds.num_classes)
            mine = [f"class_share-{stem}.png"]
            plot_class_shares(tmp / mine[0], name, pool_share, sel_share, class_names, fraction, rel_index)
            if grid:
                ranked = rank_ids(scores)
                top, bottom = ranked[:grid], ranked[::-1][:grid]
                mine.append(f"images-{stem}.png")
                plot_image_grid(tmp / mine[-1], name, ds, top, bottom, scores, class_names)
            files.extend(mine)
            present = np.unique(labels[scored_mask & (labels >= 0)])
            kept = np.unique(labels[selected][labels[selected] >= 0])
            rows.append(MethodRow(
                name, attrs.get("method"), dict(attrs.get("params") or {}), (attrs.get("encoder") or {}).get("tag"),
                int(scored_mask.sum()), int(len(selected)),
                float(scores[selected[-1]]) if len(selected) else None, int(len(kept)),
                int(len(np.setdiff1d(present, kept))),
                None if relevant is None else selection_precision(selected, relevant),
                None if relevant is None else float(relevant[scored_mask].mean()) if scored_mask.any() else None,
                tuple(mine)))
        files = [REPORT_MARK, "report.md", "report.html", *files]
        summary = ReportSummary(out.resolve(), ds.root, fraction, tuple(rows), tuple(files),
                                tuple(c.name for c in rel_classes),
                                time.perf_counter() - t0)
        (tmp / "report.md").write_text(render_markdown(summary, ds), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(summary, ds), encoding="utf-8")
        (tmp / REPORT_MARK).write_text(json.dumps(summary.to_dict(), indent=1), encoding="utf-8")
    return summary


# What the README and tests import from here (the plots, pages and numbers have their own modules).
__all__ = [
    "MethodRow", "OVERLAP", "REPORT_MARK", "ReportSummary", "SCORE_HISTOGRAMS", "class_shares", "display_names",
    "make_report", "read_thumbnails", "representation_extremes", "selection_overlap", "selection_precision",
]
