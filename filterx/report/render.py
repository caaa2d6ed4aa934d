"""A report's pages: the summary of what each score array selects (``ReportSummary``, also
report.json) and its report.md / report.html (:mod:`filterx.report.page` writes them)."""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import filterx
from filterx.io.dataset import Dataset

REPORT_MARK = "report.json"
SCORE_HISTOGRAMS = "score_histograms.png"
OVERLAP = "selection_overlap.png"


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
