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
``selection_precision``) hold the numbers; the plotting code only draws them.
"""

from __future__ import annotations

import html
import io
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

import filterx
from filterx.io import atomic
from filterx.io.dataset import Dataset
from filterx.core.faults import crash_point
from filterx.io.scores import list_scores, read_scores
from filterx.io.dataset import ClassInfo
from filterx.stages.select import rank_ids, select_ids

log = logging.getLogger(__name__)

REPORT_MARK = "report.json"
SCORE_HISTOGRAMS = "score_histograms.png"
OVERLAP = "selection_overlap.png"
MAX_CLASS_BARS = 30
TILE_PX = 128
GRID_COLS = 8


# ---------------------------------------------------------------- numbers

def selection_overlap(selections: Sequence[np.ndarray]) -> np.ndarray:
    """(M, M) float64 Jaccard overlap |A ∩ B| / |A ∪ B| of M selections (arrays of sample ids).

    Two empty selections count as identical (1.0).
    """
    sets = [np.unique(np.asarray(s, dtype=np.int64)) for s in selections]
    m = len(sets)
    out = np.ones((m, m), dtype=np.float64)
    for i in range(m):
        for j in range(i + 1, m):
            inter = len(np.intersect1d(sets[i], sets[j], assume_unique=True))
            union = len(sets[i]) + len(sets[j]) - inter
            out[i, j] = out[j, i] = inter / union if union else 1.0
    return out


def class_shares(pool_labels: np.ndarray, selected_labels: np.ndarray,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """((C,), (C,)) float64: each class's share of the pool and of the selection.

    ``pool_labels`` are the labels of the scored samples, ``selected_labels`` those of the
    selected ones (int, -1 = unlabelled, left out of both). Shares sum to 1 (0 when empty).
    """
    def share(labels):
        labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.float64)
        return counts / max(counts.sum(), 1.0)

    return share(pool_labels), share(selected_labels)


def representation_extremes(pool_share: np.ndarray, selected_share: np.ndarray,
                            top: int = MAX_CLASS_BARS) -> np.ndarray:
    """Class indices to plot, most over-represented first: all classes when there are at most
    ``top``, else the ``top // 2`` most over- and ``top - top // 2`` most under-represented
    (by selected share minus pool share; ties by class index). Classes absent from both the
    pool and the selection are never shown."""
    diff = np.asarray(selected_share, dtype=np.float64) - np.asarray(pool_share, dtype=np.float64)
    present = np.flatnonzero((np.asarray(pool_share) > 0) | (np.asarray(selected_share) > 0))
    order = present[np.lexsort((present, -diff[present]))]  # over-represented first
    if len(order) <= top:
        return order
    over, under = top // 2, top - top // 2
    return np.concatenate([order[:over], order[len(order) - under:]])


def selection_precision(selected: np.ndarray, relevant: np.ndarray) -> float:
    """Share of the selected ids whose sample is relevant (``relevant``: (N,) bool); NaN if none."""
    selected = np.asarray(selected, dtype=np.int64)
    return float(np.asarray(relevant, dtype=bool)[selected].mean()) if len(selected) else float("nan")


# ---------------------------------------------------------------- per-method rows

@dataclass(frozen=True)
class MethodRow:
    """What one score array selects at the report's fraction."""

    name: str
    method: str | None
    params: dict
    encoder_tag: str | None
    scored: int
    selected: int
    cut: float | None  # the lowest selected score
    classes_kept: int  # classes of the scored pool with at least one selected sample
    classes_removed: int  # classes of the scored pool with none selected
    precision: float | None  # share of the selection in the relevant classes
    expected_precision: float | None  # the relevant classes' share of the scored pool (random's)
    plots: tuple[str, ...]  # file names in the report dir


@dataclass(frozen=True)
class ReportSummary:
    out_dir: Path
    dataset: Path
    fraction: float
    rows: tuple[MethodRow, ...]
    files: tuple[str, ...]  # every file written, relative to out_dir
    relevant_classes: tuple[str, ...]
    seconds: float

    def to_dict(self) -> dict:
        return json.loads(json.dumps({**asdict(self), "out_dir": str(self.out_dir), "dataset": str(self.dataset)}))

    def line(self) -> str:
        best = ""
        rated = [r for r in self.rows if r.precision is not None and not np.isnan(r.precision)]
        if rated:
            top = max(rated, key=lambda r: r.precision)
            best = (f"; best precision on the relevant classes: {top.name} {top.precision:.3f} "
                    f"(random: {top.expected_precision:.3f})")
        pngs = sum(f.endswith(".png") for f in self.files)
        scored = sum(r.scored for r in self.rows)
        return (f"report on {len(self.rows)} score array(s) of {self.dataset} ({scored} scores, "
                f"top {self.fraction:.1%} selected) written to {self.out_dir}: report.md, report.html, "
                f"{REPORT_MARK} and {pngs} plots in {self.seconds:.1f}s "
                f"({scored / max(self.seconds, 1e-9):.0f} scores/s){best}")


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


# ---------------------------------------------------------------- plots
# Figures are made with matplotlib's object API (Figure + Agg on save), never pyplot, so a
# report changes no global backend state and can run in threads or notebooks.

def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> None:
    fig.savefig(path)
    crash_point("report.plot")


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` wrapped to fit ``width_in`` inches at ``fontsize`` points (DejaVu Sans averages
    about 0.55 em a character), each of its lines separately."""
    import textwrap

    chars = max(20, int(0.9 * width_in * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _histogram_range(values: np.ndarray, cut: float | None) -> tuple[float, float, bool]:
    """(lo, hi, clipped): the x range of a histogram. Long tails (influence, logits) would squash
    the bulk into a few bins, so the range shrinks to the 1-99 percentiles (always keeping the
    cut) when the full range is over twice as wide."""
    lo, hi = float(values.min()), float(values.max())
    plo, phi = (float(x) for x in np.percentile(values, [1, 99]))
    clipped = phi > plo and (hi - lo) > 2 * (phi - plo)
    if clipped:
        lo, hi = plo, phi
        if cut is not None:
            lo, hi = min(lo, cut), max(hi, cut)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi, clipped


def plot_score_histograms(path: Path, runs: list, fraction: float, relevant: np.ndarray | None) -> None:
    """One panel per (name, attrs, scores (N,), selected ids): histogram with the cut marked."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    ncols = min(3, len(runs))
    nrows = -(-len(runs) // ncols)
    width = max(5.4 * ncols, 11.0)
    fig = _figure(width, 3.9 * nrows + 1.2)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    any_clipped = False
    for ax, (name, attrs, scores, selected) in zip(axes.flat, runs):
        method = attrs.get("method")
        title = name if not method or name.startswith(method) else f"{name} ({method})"
        valid = ~np.isnan(scores)
        v = scores[valid].astype(np.float64)
        if not v.size:
            ax.set_title(title, fontsize=12)
            ax.text(0.5, 0.5, "no scored samples", ha="center", va="center", transform=ax.transAxes)
            continue
        cut = float(scores[selected[-1]]) if len(selected) else None
        lo, hi, clipped = _histogram_range(v, cut)
        any_clipped |= clipped
        bins = np.linspace(lo, hi, int(np.clip(2 * np.sqrt(v.size), 10, 60)) + 1)
        shown = np.clip(v, lo, hi)  # clipped tails pile up in the edge bins, still counted
        if relevant is not None:
            rel = relevant[valid]
            ax.hist([shown[rel], shown[~rel]], bins=bins, stacked=True, color=["tab:orange", "0.6"])
        else:
            ax.hist(shown, bins=bins, color="0.55")
        if cut is not None:
            ax.axvspan(cut, hi, color="tab:green", alpha=0.12, lw=0)
            ax.axvline(cut, color="tab:red", ls="--", lw=1.6)
            title += f"\ncut ≥ {cut:.3g} keeps {len(selected)} of {v.size}"
        else:
            title += f"\nthe top {fraction:.0%} of {v.size} is no sample"
        if clipped:
            title += " (tails clipped)"
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("score (higher = kept first)", fontsize=10)
        ax.set_ylabel("samples", fontsize=10)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=9)
    handles = [Patch(color="tab:orange", label="relevant classes"), Patch(color="0.6", label="other classes")] \
        if relevant is not None else [Patch(color="0.55", label="scored samples")]
    handles += [Line2D([], [], color="tab:red", ls="--", lw=1.6, label=f"cut of the top {fraction:.0%} selection"),
                Patch(color="tab:green", alpha=0.25, label="kept")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=10, frameon=False)
    note = ("\npanels marked (tails clipped): x limited to the 1-99 percentiles, outliers counted in the edge bins"
            if any_clipped else "")
    fig.suptitle(_wrap(f"Score distribution per method and the cut of the top {fraction:.0%} selection{note}",
                       width, 14), fontsize=14)
    _save(fig, path)


def plot_class_shares(path: Path, name: str, pool_share: np.ndarray, selected_share: np.ndarray,
                      class_names: list[str], fraction: float, relevant: set[int]) -> None:
    """Horizontal bars: the pool's and the selection's share of each shown class (see
    ``representation_extremes``), most over-represented at the top, ratio written beside."""
    idx = representation_extremes(pool_share, selected_share)
    n, present = len(idx), int(((pool_share > 0) | (selected_share > 0)).sum())
    fig = _figure(10.5, 1.9 + 0.34 * max(n, 1))
    ax = fig.subplots()
    y = np.arange(n)
    pool, sel = pool_share[idx] * 100, selected_share[idx] * 100
    ax.barh(y - 0.2, pool, height=0.4, color="0.65", label="pool (scored samples)")
    ax.barh(y + 0.2, sel, height=0.4, color="tab:blue", label=f"top {fraction:.0%} selection")
    right = float(max(pool.max(initial=0), sel.max(initial=0))) or 1.0
    for yi, p, q in zip(y, pool, sel):
        note = "none kept" if q == 0 else ("only in selection" if p == 0 else f"×{q / p:.2g}")
        ax.text(max(p, q) + right * 0.01, yi, note, va="center", fontsize=8, color="0.25")
    ax.set_xlim(0, right * 1.18)
    ax.set_yticks(y, labels=[_short(class_names[i], 40) for i in idx], fontsize=9)
    for tick, i in zip(ax.get_yticklabels(), idx):
        if i in relevant:
            tick.set_color("tab:orange")
            tick.set_fontweight("bold")
    ax.set_ylim(n - 0.5, -0.5)  # most over-represented at the top, no empty margin
    if n < present:
        ax.axhline(n // 2 - 0.5, color="0.3", lw=0.8, ls=":")  # over- above, under-represented below
    ax.set_xlabel("share of samples (%)", fontsize=10)
    ax.legend(fontsize=9, loc="lower right")
    which = (f"all {present} classes" if n == present else
             f"the {n // 2} most over- and {n - n // 2} most under-represented of {present} classes")
    rel = "; relevant classes in orange" if relevant else ""
    ax.set_title(_wrap(f"{name}: class shares, top {fraction:.0%} selection vs pool\n"
                       f"({which}, most over-represented first{rel})", 10.0, 12), fontsize=12)
    _save(fig, path)


def plot_overlap(path: Path, names: list[str], overlap: np.ndarray, fraction: float) -> None:
    """Heatmap of the (M, M) Jaccard matrix with the value in every cell."""
    m = len(names)
    side = max(5.5, 0.75 * m + 2.5)
    fig = _figure(side + 1.5, side + 0.5)
    ax = fig.subplots()
    im = ax.imshow(overlap, vmin=0.0, vmax=1.0, cmap="viridis")
    labels = [_short(n, 28) for n in names]
    ax.set_xticks(range(m), labels=labels, rotation=40, ha="right", rotation_mode="anchor", fontsize=10)
    ax.set_yticks(range(m), labels=labels, fontsize=10)
    size = max(7, 12 - m // 3)
    for i in range(m):
        for j in range(m):
            ax.text(j, i, f"{overlap[i, j]:.2f}", ha="center", va="center", fontsize=size,
                    color="white" if overlap[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label="Jaccard overlap")
    # two independent random selections of a fraction f overlap by f / (2 - f) in expectation
    ax.set_title(_wrap(f"Overlap of the top {fraction:.0%} selections (Jaccard |A∩B| / |A∪B|)\n"
                       f"1 = the same samples; two independent random selections: ≈{fraction / (2 - fraction):.2f}",
                       side + 1.0, 12), fontsize=12)
    _save(fig, path)


def read_thumbnails(ds: Dataset, ids: np.ndarray, size: int = TILE_PX) -> list[np.ndarray | None]:
    """(h, w, 3) uint8 thumbnails (longest side <= ``size``) of samples ``ids``, decoded with PIL
    from the tars by offset; None where the bytes cannot be read or decoded."""
    from PIL import Image

    from filterx.io import tario

    ids = np.asarray(ids, dtype=np.int64)
    found: dict[int, np.ndarray] = {}
    for s in np.unique(ds.shards[ids]):
        wanted = {str(ds.keys[i]): int(i) for i in ids[ds.shards[ids] == s]}
        try:
            try:
                entries = tario.read_index(ds.index_path(s))
            except (OSError, ValueError, IndexError):  # no or bad DALI index: read the tar headers
                entries = tario.scan_tar(ds.shard_path(s))
            jpgs = [e for e in entries if e.ext == "jpg" and e.key in wanted]
            for e, data in tario.read_members(ds.shard_path(s), jpgs):
                try:
                    img = Image.open(io.BytesIO(data))
                    img.draft("RGB", (size, size))  # DCT-domain downscale: decode only what a tile needs
                    img = img.convert("RGB")
                    img.thumbnail((size, size))
                    found[wanted[e.key]] = np.asarray(img)
                except (OSError, ValueError):
                    continue
        except (OSError, ValueError):
            continue
    return [found.get(int(i)) for i in ids]


def plot_image_grid(path: Path, name: str, ds: Dataset, top: np.ndarray, bottom: np.ndarray,
                    scores: np.ndarray, class_names: list[str]) -> None:
    """Two titled panels of tiles (the ``top`` ids, then the ``bottom`` ids), each tile labelled
    with its class name and score."""
    thumbs = read_thumbnails(ds, np.concatenate([top, bottom]))
    cols = max(1, min(GRID_COLS, max(len(top), len(bottom))))
    rows = max(1, -(-max(len(top), len(bottom)) // cols))
    tile = 1.6
    width = max(cols * tile + 0.4, 7.0)  # room for the titles when there are few tiles
    fig = _figure(width, 2 * rows * (tile + 0.35) + 1.4)
    panels = fig.subfigures(2, 1, hspace=0.04)
    labels = ds.labels
    for panel, ids, pics, title in (
            (panels[0], top, thumbs[: len(top)], f"top {len(top)}: highest scores (kept first), best first"),
            (panels[1], bottom, thumbs[len(top):], f"bottom {len(bottom)}: lowest scores (dropped first), "
                                                   "lowest first")):
        panel.set_facecolor("#eef5ee" if panel is panels[0] else "#f7ecec")
        panel.suptitle(_wrap(title, width, 13), fontsize=13, fontweight="bold")
        axes = panel.subplots(rows, cols, squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if k >= len(ids):
                continue
            i = int(ids[k])
            pic = pics[k]
            if pic is None:
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            else:
                ax.imshow(pic)
            cls = class_names[labels[i]] if 0 <= labels[i] < len(class_names) else "unlabelled"
            ax.set_title(f"{_short(cls, 22)}\n{scores[i]:.3g}", fontsize=8, pad=2)
    fig.suptitle(_wrap(f"{name}: top- and bottom-scored images (class, score)", width, 15), fontsize=15)
    _save(fig, path)


# ---------------------------------------------------------------- markdown and html

def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if v is not None) or "-"


def _table(summary: ReportSummary) -> tuple[list[str], list[list[str]]]:
    head = ["scores", "method", "scored", "selected", "cut (lowest kept)", "classes kept", "classes removed"]
    if summary.relevant_classes:
        head += ["precision", "x random"]
    rows = []
    for r in summary.rows:
        row = [r.name, r.method or "-", str(r.scored), str(r.selected), _fmt(r.cut, 4), str(r.classes_kept),
               str(r.classes_removed)]
        if summary.relevant_classes:
            ratio = None if not r.expected_precision or r.precision is None else r.precision / r.expected_precision
            row += [_fmt(r.precision), _fmt(ratio, 2)]
        rows.append(row)
    return head, rows


def _intro(summary: ReportSummary, ds: Dataset) -> list[str]:
    lines = [f"Dataset {ds.root} (fingerprint {ds.fingerprint}): {ds.num_samples} samples, "
             f"{ds.num_classes} classes. Each selection keeps the top {summary.fraction:.1%} of the samples "
             f"its method scored (ties by lower id, unscored never), as filterx select --fraction "
             f"{summary.fraction:g} does. filterx {filterx.__version__}."]
    if summary.relevant_classes:
        shown = ", ".join(summary.relevant_classes[:12]) + (", ..." if len(summary.relevant_classes) > 12 else "")
        lines.append(f"Relevant classes ({len(summary.relevant_classes)}): {shown}. Precision = share of a "
                     "selection in them; \"x random\" = precision / their share of the scored pool.")
    return lines


def render_markdown(summary: ReportSummary, ds: Dataset) -> str:
    head, rows = _table(summary)
    md = [f"# filterx report: {ds.name}", ""]
    for para in _intro(summary, ds):
        md += [para, ""]
    md += ["## Selections", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    md += ["", "## Score distributions", "", "![score histograms](score_histograms.png)", ""]
    if OVERLAP in summary.files:
        md += ["## Overlap between the selections", "", "![selection overlap](selection_overlap.png)", ""]
    for r in summary.rows:
        md += [f"## {r.name}", "", f"{r.method or '?'} ({_params(r.params)}); encoder {r.encoder_tag or '-'}", ""]
        md += [f"![{r.name}: {p.split('-')[0].replace('_', ' ')}]({p})" for p in r.plots] + [""]
    return "\n".join(md)


def render_html(summary: ReportSummary, ds: Dataset) -> str:
    e = html.escape
    head, rows = _table(summary)
    body = [f"<h1>filterx report: {e(ds.name)}</h1>", *(f"<p>{e(p)}</p>" for p in _intro(summary, ds)),
            "<h2>Selections</h2>", "<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
    body += ["</table>", "<h2>Score distributions</h2>", '<img src="score_histograms.png" alt="score histograms">']
    if OVERLAP in summary.files:
        body += ["<h2>Overlap between the selections</h2>",
                 '<img src="selection_overlap.png" alt="selection overlap">']
    for r in summary.rows:
        body += [f"<h2>{e(r.name)}</h2>",
                 f"<p>{e(r.method or '?')} ({e(_params(r.params))}); encoder {e(r.encoder_tag or '-')}</p>"]
        body += [f'<img src="{e(p)}" alt="{e(r.name)}">' for p in r.plots]
    style = ("body{font-family:sans-serif;max-width:1500px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}"
             "td:first-child,td:nth-child(2),th{text-align:left}img{max-width:100%;display:block;margin:1em 0}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>filterx report: {e(ds.name)}</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
