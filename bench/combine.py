"""``python -m bench.combine RESULT.json RESULT.json ... [--ratio-to ROW] [--vary KEY,...]``

One suite's results files from runs at different seeds, as one table: per row (the rows
every file holds, matched on their text columns, e.g. method and encoder) and numeric
column, the mean over the runs with its min-max range. ``--ratio-to ROW`` adds a second
table: each cell divided by that row's cell of the same run (the selection suite's
``random (expected)``), as the mean ratio and the lowest one of any run, which is what a
claim such as "every method at least twice random" has to hold at.

The files must be runs of one suite with the same ``--quick``, at distinct seeds, and with
the same options apart from ``seed`` and the keys named by ``--vary`` (the selection suite's
``encoders`` chooses which rows run; rows not in every file are left out and listed).
Combined files go to ``--out`` as ``<suite>[-quick]_seeds-<S1>-<S2>..._<date>.{json,md}``
and hold every input file's name, commit, machine and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import inspect
import json
import shlex
import statistics
import sys
from pathlib import Path

from bench.suite import DEFAULT_OUT, SUITES, format_markdown_table, format_table

SEED = "seed"


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable results file ({exc})") from None
    missing = [k for k in ("suite", "quick", "options", "machine", "rows") if k not in doc]
    if missing:
        raise ValueError(f"{path}: not a bench results file (no {', '.join(missing)})")
    return doc


def _default_seed(suite: str):
    """The seed a run used when its command gave none: the suite's run() default."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r} in the results; known: {', '.join(SUITES)}")
    run = importlib.import_module(SUITES[suite].module).run
    param = inspect.signature(run).parameters.get(SEED)
    if param is None:
        raise ValueError(f"suite {suite} takes no {SEED} option: its runs cannot differ by seed")
    return param.default


def _key(row: dict) -> tuple:
    return tuple((k, v) for k, v in row.items() if isinstance(v, str))


def _numeric(row: dict) -> dict:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def check_runs(docs: list[dict], names: list[str], vary: tuple[str, ...]) -> list:
    """Refuse files that are not runs of one setup at distinct seeds; return the seeds."""
    if len(docs) < 2:
        raise ValueError("combine needs two or more results files")
    first = docs[0]
    for doc, name in zip(docs[1:], names[1:]):
        for field in ("suite", "quick"):
            if doc[field] != first[field]:
                raise ValueError(f"{name}: {field} {doc[field]!r}, but {names[0]} has {first[field]!r}")
    default = _default_seed(first["suite"])
    seeds = [doc["options"].get(SEED, default) for doc in docs]
    ignored = {SEED, *vary}
    base = {k: v for k, v in first["options"].items() if k not in ignored}
    for doc, name in zip(docs[1:], names[1:]):
        other = {k: v for k, v in doc["options"].items() if k not in ignored}
        if other != base:
            diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
            raise ValueError(f"{name}: options {', '.join(diff)} differ from {names[0]}'s "
                             f"({other} against {base}); pass --vary {','.join(diff)} if they only choose rows")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
    if repeated:
        raise ValueError(f"seed {', '.join(map(str, repeated))} is in more than one file: "
                         "averaging a seed with itself would narrow the range")
    return seeds


def combine_rows(docs: list[dict], ratio_to: str | None = None) -> tuple[list[dict], list[dict], list[str]]:
    """(mean rows, ratio rows, the text columns of the rows left out). A mean row's numeric cells are
    {"mean", "min", "max", "values"} (one value per run, in file order); a ratio row's are
    the same for cell / the ratio row's cell of that run. Rows are in the first file's order."""
    keyed = [{_key(r): r for r in doc["rows"]} for doc in docs]
    common = [k for k in keyed[0] if all(k in kd for kd in keyed[1:])]
    left_out = [dict(k) for k in dict.fromkeys(k for kd in keyed for k in kd if k not in common)]

    def cells(values_per_run: list[dict]) -> dict:
        cols = [c for c in values_per_run[0] if all(c in v for v in values_per_run[1:])]
        out = {}
        for c in cols:
            vals = [v[c] for v in values_per_run]
            out[c] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals), "values": vals}
        return out

    means = [{**dict(k), "runs": len(docs), **cells([_numeric(kd[k]) for kd in keyed])} for k in common]
    ratios = []
    if ratio_to is not None:
        ref = [next((r for r in doc["rows"] if ratio_to in [v for _, v in _key(r)]), None) for doc in docs]
        if any(r is None for r in ref):
            raise ValueError(f"--ratio-to {ratio_to!r}: no row with that text in every file")
        ref_num = [_numeric(r) for r in ref]
        for k in common:
            per_run = []
            for kd, rn in zip(keyed, ref_num):
                num = _numeric(kd[k])
                per_run.append({c: num[c] / rn[c] for c in num if rn.get(c)})
            ratios.append({**dict(k), "runs": len(docs), **cells(per_run)})
    return means, ratios, left_out


def left_out_summary(means: list[dict], left_out: list[dict]) -> str:
    """One line for the rows left out: per text column, the values only they have (the
    encoders a file did not run), else the rows themselves."""
    if not left_out:
        return ""
    parts = []
    for col in dict.fromkeys(k for r in left_out for k in r):
        only = sorted({r[col] for r in left_out if col in r} - {r.get(col) for r in means})
        if only:
            parts.append(f"{col} {', '.join(only)}")
    what = "; ".join(parts) if parts else "; ".join(" / ".join(r.values()) for r in left_out)
    return f"{len(left_out)} rows not in every file, left out ({what})"


def _mean_cell(cell) -> str:
    if not isinstance(cell, dict):
        return cell
    return f"{cell['mean']:.2f} ({cell['min']:.2f}-{cell['max']:.2f})"


def _ratio_cell(cell) -> str:
    if not isinstance(cell, dict):
        return cell
    return f"{cell['mean']:.1f}x (min {cell['min']:.1f}x)"


def as_text(rows: list[dict], cell, skip=("seconds",)) -> list[dict]:
    return [{k: cell(v) for k, v in r.items() if k not in skip} for r in rows]


def _sources(docs: list[dict], names: list[str], seeds: list) -> list[dict]:
    return [{"file": Path(n).name, SEED: s, "commit": d["machine"].get("git_commit"),
             "cpu": d["machine"].get("cpu"), "gpu": d["machine"].get("gpu"),
             "date": d["machine"].get("date"), "command": d.get("command")}
            for d, n, s in zip(docs, names, seeds)]


def write_combined(out_dir: Path, doc: dict, when: dt.datetime) -> tuple[Path, Path]:
    """``<suite>[-quick]_seeds-..._<YYYYMMDD-HHMM>.{json,md}``; never overwrites a file."""
    from filterx.io import atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = "-".join(str(s["seed"]) for s in doc["sources"])
    stem0 = f"{doc['suite']}{'-quick' if doc['quick'] else ''}_seeds-{seeds}_{when:%Y%m%d-%H%M}"
    stem, k = stem0, 1
    while (out_dir / f"{stem}.json").exists():
        k += 1
        stem = f"{stem0}-{k}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic.write_text(json_path, json.dumps(doc, indent=1) + "\n")
    md = [f"# {doc['suite']}: mean over {len(doc['sources'])} seeds (min-max)", "",
          f"- command: `{doc['command']}`", "- runs:"]
    md += [f"  - `{s['file']}`: seed {s['seed']}, commit {s['commit']}, {s['cpu']}"
           f"{', ' + s['gpu'] if s['gpu'] else ''}, {s['date']}" for s in doc["sources"]]
    md += ["", format_markdown_table(as_text(doc["rows"], _mean_cell)), ""]
    if doc["ratios"]:
        md += [f"Divided by `{doc['ratio_to']}` of the same run: mean ratio (lowest of any run)", "",
               format_markdown_table(as_text(doc["ratios"], _ratio_cell)), ""]
    if doc["left_out"]:
        md += [left_out_summary(doc["rows"], doc["left_out"]) + ".", ""]
    atomic.write_text(md_path, "\n".join(md))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.combine", description=__doc__.split("\n\n")[1])
    ap.add_argument("files", nargs="+", type=Path, metavar="RESULT.json")
    ap.add_argument("--ratio-to", default=None, metavar="ROW",
                    help="a row's text (e.g. 'random (expected)'): add each cell divided by that row's")
    ap.add_argument("--vary", default="", metavar="KEY,...",
                    help="options besides seed that may differ between the files (they choose rows)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    ap.add_argument("--no-write", action="store_true", help="print the tables only")
    args = ap.parse_args(argv)
    names = [str(f) for f in args.files]
    try:
        docs = [_read(f) for f in args.files]
        seeds = check_runs(docs, names, tuple(k.strip() for k in args.vary.split(",") if k.strip()))
        means, ratios, left_out = combine_rows(docs, args.ratio_to)
    except ValueError as exc:
        print(f"python -m bench.combine: error: {exc}", file=sys.stderr)
        return 2
    print(f"{docs[0]['suite']}: mean over seeds {', '.join(map(str, seeds))} (min-max)")
    print(format_table(as_text(means, _mean_cell)))
    if ratios:
        print(f"\ndivided by '{args.ratio_to}' of the same run: mean ratio (lowest of any run)")
        print(format_table(as_text(ratios, _ratio_cell)))
    if left_out:
        print("\n" + left_out_summary(means, left_out))
    if not args.no_write:
        command = shlex.join(["python", "-m", "bench.combine", *(sys.argv[1:] if argv is None else argv)])
        doc = {"suite": docs[0]["suite"], "quick": docs[0]["quick"], "command": command,
               "sources": _sources(docs, names, seeds), "ratio_to": args.ratio_to,
               "rows": means, "ratios": ratios, "left_out": left_out}
        for path in write_combined(args.out, doc, dt.datetime.now()):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
