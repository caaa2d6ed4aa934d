"""A report's plots: score histograms, class shares, the overlap of selections and the grids of
top- and bottom-scored images (the numbers come from :mod:`filterx.report.page`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from filterx.core.faults import crash_point
from filterx.io.dataset import Dataset
from filterx.report.stats import representation_extremes

TILE_PX = 128
GRID_COLS = 8


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
