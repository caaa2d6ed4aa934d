"""The benchmark runner: a registry of suites, the machine description, tables, results files.

A suite is a module with ``run(quick: bool, **options) -> list[dict]`` (one dict per table
row). ``python -m bench`` imports each requested suite, runs it, prints its rows as a table and
writes ``<suite>[-quick]_<machine>_<N>c_<YYYYMMDD-HHMM>.json`` plus a Markdown rendering
(machine, command line, rows). A suite that is missing or raises is reported in the summary
and the run goes on with the next one.

Measurements that need their own peak memory run in a child process (``run_child``): a
child's peak RSS is its own, not the runner's, and one decoder's buffers or thread pools
cannot change the next one's timing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import inspect
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
_RESULT_MARK = "@@BENCH_RESULT@@ "


@dataclass(frozen=True)
class Suite:
    name: str
    module: str
    description: str


SUITES: dict[str, Suite] = {}


def register_suite(name: str, module: str, description: str) -> Suite:
    if name in SUITES:
        raise ValueError(f"suite {name!r} is already registered (module {SUITES[name].module})")
    SUITES[name] = Suite(name, module, description)
    return SUITES[name]


register_suite("decode", "bench.bench_decode",
               "JPEG decode + eval transform img/s at 224 and 112, x vs PIL full decode")
register_suite("embed", "bench.bench_embed",
               "decode + ResNet embedding img/s against decode alone (share of the decode ceiling)")
register_suite("kernels", "bench.bench_kernels", "Triton kernels against their plain-torch twins")
register_suite("influence", "bench.bench_influence",
               "influence scoring: candidates/s and s_test solve time per solver")
register_suite("trainer", "bench.bench_trainer", "pre-training step throughput")
register_suite("scorers", "bench.bench_scorers", "each scorer's samples/s on precomputed embeddings")
register_suite("kmeans", "bench.bench_kmeans", "FAISS k-means against filterx's torch k-means")
register_suite("selection", "bench.bench_selection",
               "precision of each method's selection at 6% and 12% on pools with a known relevant "
               "part (easy, medium, hard), per encoder, against scikit-learn references")
register_suite("emoji", "bench.bench_emoji",
               "the selection suite on real images new to filterx: emoji of four artists, a target "
               "category drawn by a fifth; precision at 6% and 12% per method and encoder")
register_suite("ray", "bench.bench_ray",
               "shard and embed with --runner ray against --runner local on this machine (ratio, one run)")
register_suite("scale", "bench.bench_scale",
               "every stage's wall time and peak RSS at N = 10k, 100k, 1.28M (synthetic embeddings)")
register_suite("gpu", "bench.bench_gpu",
               "the first-GPU check (< 8 min): nvJPEG decode, embed, k-means, Triton kernels, "
               "pretrain + NCCL collectives")


# ---------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # absent, or broken: either way it did not take part
        return None
    return str(getattr(mod, "__version__", "unknown"))


def _git_commit() -> str | None:
    """HEAD's short hash, with "+changes" when tracked files differ from it (the code measured
    is then not that commit's)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO_ROOT,
                                 capture_output=True, timeout=30).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return (commit + ("+changes" if changed else "")) if commit else None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_description() -> dict:
    """What the figures were measured on: CPU, cores, RAM, GPU, library versions, date, load."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    libjpeg = None
    try:
        from PIL import features

        libjpeg = features.version("libjpeg_turbo")
    except Exception:
        pass
    return {
        "cpu": _cpu_model(),
        "cores": usable_cores(),
        "ram_gib": _ram_gib(),
        "gpu": gpus[0] if gpus else None,
        "gpu_count": len(gpus),
        "cuda": torch.version.cuda if gpus else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "dali": _version("nvidia.dali"),
        "faiss": _version("faiss"),
        "pillow": _version("PIL"),
        "libjpeg_turbo": libjpeg,
        "numpy": _version("numpy"),
        "git_commit": _git_commit(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def slug(text: str) -> str:
    """A file-name part: lower case, each run of other characters one "-" ("Animals & Nature"
    -> "animals-nature")."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_slug(machine: dict) -> str:
    """File-name part naming the machine: the GPU model if there is one, else the CPU model."""
    name = machine.get("gpu") or machine.get("cpu") or "unknown"
    return slug(re.sub(r"\((r|tm)\)|@.*$|\bcpu\b", " ", name, flags=re.IGNORECASE)) or "unknown"


@contextlib.contextmanager
def workdir(work: str | None, prefix: str):
    """The directory a suite works in: ``work`` (made if missing, kept after), or a temporary
    one named ``prefix``..., removed after."""
    if work:
        path = Path(work).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)


def results_stem(suite: str, machine: dict, quick: bool, when: dt.datetime) -> str:
    """``<suite>[-quick]_<machine>_<N>c_<YYYYMMDD-HHMM>``."""
    return (f"{suite}{'-quick' if quick else ''}_{machine_slug(machine)}_{machine['cores']}c_"
            f"{when.strftime('%Y%m%d-%H%M')}")


# ---------------------------------------------------------------- child processes


def run_child(target: str, kwargs: dict, timeout: float = 600.0) -> dict:
    """Call ``module:function(**kwargs)`` in a fresh Python process and return its dict result,
    with ``peak_rss_mb`` added: the largest resident set of the child or of any process it
    started and waited for (DataLoader workers; see ``peak_rss_kb``).

    ``kwargs`` and the result must be JSON-serialisable. Raises RuntimeError with the child's
    stderr tail if it fails.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    code = "from bench.suite import _child_main; _child_main()"
    proc = subprocess.run([sys.executable, "-c", code, target], input=json.dumps(kwargs),
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    results = [line[len(_RESULT_MARK):] for line in proc.stdout.splitlines()
               if line.startswith(_RESULT_MARK)]
    if proc.returncode != 0 or not results:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{target}({kwargs}) failed with exit code {proc.returncode}:\n{tail}")
    return json.loads(results[-1])


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    """This process's resident set now (MiB): a measurement's baseline after its imports
    (importing a CUDA build of torch alone is ~0.7 GiB)."""
    kb = _status_kb("VmRSS")
    return round((kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024, 1)


def peak_rss_kb() -> int:
    """Peak resident set (KiB) of this process or of any child it has waited for.

    This process's own peak is VmHWM, the high-water mark of its address space: getrusage's
    ru_maxrss would also carry the RSS of the runner it was forked from (Linux keeps the
    pre-exec peak), which made every row show the runner's size.
    """
    own = _status_kb("VmHWM")
    if own is None:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def _child_main() -> None:
    target = sys.argv[1]
    module, _, func = target.partition(":")
    kwargs = json.loads(sys.stdin.read())
    result = dict(getattr(importlib.import_module(module), func)(**kwargs))
    result["peak_rss_mb"] = round(peak_rss_kb() / 1024, 1)
    sys.stdout.write(_RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def _log(line: str) -> None:
    print(line, flush=True)


def round_robin(jobs: dict[str, tuple[str, dict]], repeats: int,
                log: Callable[[str], None] = _log) -> dict[str, list[dict]]:
    """Run every job ``repeats`` times, interleaved (all jobs once, then all again, ...).

    On a shared or throttling machine the load drifts over minutes; interleaving spreads the
    drift over all jobs alike, so ratios between them stay fair. A job that fails is recorded
    as ``{"error": message}`` and the others go on.
    """
    out: dict[str, list[dict]] = {k: [] for k in jobs}
    for rep in range(repeats):
        for key, (target, kwargs) in jobs.items():
            # each round in the same order: a row's ratio pairs it with its own round's
            # reference, taken shortly before it (see paired_ratio)
            t0 = time.perf_counter()
            try:
                res = run_child(target, kwargs)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                res = {"error": str(exc).splitlines()[-1][:300]}
            out[key].append(res)
            log(f"  [{rep + 1}/{repeats}] {key}: "
                + (f"{res['img_s']:.1f} img/s" if "img_s" in res else res.get("error", "done"))
                + f" ({time.perf_counter() - t0:.1f}s)")
    return out


def summarize_runs(runs: list[dict], key: str = "img_s") -> dict:
    """Median, min and max of ``key`` over the successful runs; peak memory = max over runs,
    and ``rss_added_mb`` = peak minus the RSS after imports where the runs report
    ``base_rss_mb``."""
    ok = [r for r in runs if key in r]
    if not ok:
        errors = [r.get("error", "?") for r in runs]
        return {key: None, "error": errors[-1] if errors else "not run"}
    vals = [r[key] for r in ok]
    out = {key: statistics.median(vals), f"{key}_min": min(vals), f"{key}_max": max(vals),
           "runs": len(ok), "peak_rss_mb": max(r.get("peak_rss_mb", 0.0) for r in ok)}
    if all("base_rss_mb" in r for r in ok):
        out["rss_added_mb"] = max(r["peak_rss_mb"] - r["base_rss_mb"] for r in ok)
    return out


def option_tuple(value, cast=str) -> tuple:
    """A suite option given as a list or a comma-separated string (``--opt res=112,224``)."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(cast(v) for v in value)
    return tuple(cast(v) for v in str(value).split(",") if v.strip())


def paired_ratio(runs: list[dict], ref_runs: list[dict], key: str = "img_s") -> float | None:
    """Median over rounds of ``runs[i][key] / ref_runs[i][key]`` (rounds where both succeeded).

    Pairing each run with the reference of the same round compares figures taken a minute
    apart rather than medians taken over the whole run, so a load that drifts between rounds
    cancels out of the ratio.
    """
    ratios = [r[key] / b[key] for r, b in zip(runs, ref_runs)
              if r.get(key) and b.get(key)]
    return statistics.median(ratios) if ratios else None


# ---------------------------------------------------------------- tables and files


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01 or a == 0:
            return f"{v:.2f}"
        return f"{v:.2e}"
    return str(v)


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def format_table(rows: list[dict]) -> str:
    """Rows (dicts, keys may differ between rows) as an aligned plain-text table."""
    if not rows:
        return "(no rows)"
    cols = _columns(rows)
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def format_markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)).replace("|", "/") for c in cols) + " |"
              for r in rows]
    return "\n".join(lines)


class Rows(list):
    """What a suite's ``run`` may return instead of a plain list: its rows plus ``notes``,
    lines about the setup (sizes, what was not run) printed under the table and written to
    the results files."""

    def __init__(self, rows=(), notes=()):
        super().__init__(rows)
        self.notes = [str(n) for n in notes]


@dataclass
class SuiteResult:
    suite: Suite
    status: str  # "ok" | "missing" | "failed"
    rows: list[dict] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    files: tuple[Path, ...] = ()
    options: dict = field(default_factory=dict)  # the options its run() received
    notes: list = field(default_factory=list)  # Rows.notes, when the suite gave some


def run_suite(suite: Suite, quick: bool, options: dict) -> SuiteResult:
    """Import the suite's module and call its ``run``; never raises for the suite's own faults.

    ``options``: ``KEY`` goes to every suite whose ``run`` takes a parameter of that name,
    ``SUITE.KEY`` to that suite only (and fails it if it has no such parameter).
    """
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(suite.module)
    except ModuleNotFoundError as exc:
        if exc.name in (suite.module, suite.module.rpartition(".")[0]):
            return SuiteResult(suite, "missing", error=f"module {suite.module} does not exist")
        return SuiteResult(suite, "failed", error=f"import: {exc}", seconds=time.perf_counter() - t0)
    except Exception as exc:
        traceback.print_exc()
        return SuiteResult(suite, "failed", error=f"import: {type(exc).__name__}: {exc}")
    run = getattr(mod, "run", None)
    if not callable(run):
        return SuiteResult(suite, "failed", error=f"{suite.module} has no run(quick) function")
    try:
        params = inspect.signature(run).parameters
        takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
        scoped = {k.partition(".")[2]: v for k, v in options.items()
                  if k.startswith(suite.name + ".")}
        unknown = [k for k in scoped if k not in params and not takes_any]
        if unknown:
            valid = [p for p in params if p != "quick"]
            raise ValueError(f"suite {suite.name} has no option {', '.join(unknown)}; valid: "
                             f"{', '.join(valid) or '(none)'}")
        used = {k: v for k, v in options.items() if "." not in k and (k in params or takes_any)}
        used.update(scoped)
        rows = run(quick, **used)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise TypeError(f"{suite.module}.run returned {type(rows).__name__}, not a list of dicts")
    except Exception as exc:
        traceback.print_exc()
        return SuiteResult(suite, "failed", error=f"{type(exc).__name__}: {exc}",
                           seconds=time.perf_counter() - t0)
    return SuiteResult(suite, "ok", rows=list(rows), seconds=time.perf_counter() - t0, options=used,
                       notes=list(getattr(rows, "notes", [])))


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if hasattr(v, "item"):  # numpy / torch scalars
        return v.item()
    return str(v)


def write_results(out_dir: Path, result: SuiteResult, machine: dict, command: str,
                  quick: bool, when: dt.datetime) -> tuple[Path, Path]:
    """Write the suite's rows as ``<stem>.json`` and ``<stem>.md``; never overwrite a file."""
    from filterx.io import atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = results_stem(result.suite.name, machine, quick, when)
    k = 1
    while (out_dir / f"{stem}.json").exists():
        k += 1
        stem = f"{results_stem(result.suite.name, machine, quick, when)}-{k}"
    doc = {"suite": result.suite.name, "description": result.suite.description,
           "command": command, "quick": quick, "options": result.options, "machine": machine,
           "seconds": round(result.seconds, 1), "rows": result.rows}
    if result.notes:
        doc["notes"] = result.notes
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic.write_text(json_path, json.dumps(_jsonable(doc), indent=1) + "\n")
    m = machine
    gpu = f"{m['gpu']} x{m['gpu_count']} (CUDA {m['cuda']})" if m.get("gpu") else "none"
    md = [f"# {result.suite.name}: {result.suite.description}", "",
          f"- command: `{command}`",
          f"- date: {m['date']}; run time {result.seconds:.0f} s; commit {m.get('git_commit')}",
          f"- CPU: {m['cpu']}, {m['cores']} cores usable, {m['ram_gib']} GiB RAM, load average "
          f"at start {m['load_avg_at_start']}",
          f"- GPU: {gpu}",
          f"- versions: python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, "
          f"DALI {m['dali']}, faiss {m['faiss']}, Pillow {m['pillow']} (libjpeg-turbo "
          f"{m['libjpeg_turbo']}), numpy {m['numpy']}",
          "", format_markdown_table(result.rows), ""]
    if not m.get("gpu"):
        md.insert(-3, "- CPU run: compare the ratio columns; absolute img/s depend on the load "
                      "of a shared machine.")
    if result.notes:
        md += ["Notes:", "", *(f"- {n}" for n in result.notes), ""]
    atomic.write_text(md_path, "\n".join(md))
    return json_path, md_path


# ---------------------------------------------------------------- command line


def _parse_value(text: str):
    """An --opt value: true / false (any case) as bools, then int, then float, else the text
    (a bare "false" string would be truthy: ``--opt selection.references=false`` ran them)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_options(pairs: list[str]) -> dict:
    opts = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise ValueError(f"--opt takes KEY=VALUE, got {p!r}")
        opts[key.replace("-", "_")] = _parse_value(value)
    return opts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=(
        "Run filterx benchmark suites, print one table per suite and write results files "
        "named for the machine. Suites: " + "; ".join(f"{s.name}: {s.description}"
                                                       for s in SUITES.values())))
    ap.add_argument("--suite", default=",".join(SUITES),
                    help="comma-separated suites (default: all registered)")
    ap.add_argument("--quick", action="store_true", help="small sizes: minutes, not tens of minutes")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    ap.add_argument("--data", type=Path, default=None,
                    help="cache for generated inputs (default $FILTERX_BENCH_DATA or ~/.cache/filterx-bench)")
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                    help="option for the suites' run(): KEY=VALUE goes to every suite that takes "
                         "KEY, SUITE.KEY=VALUE to that suite only (e.g. decode.images=64); repeatable")
    ap.add_argument("--no-write", action="store_true", help="print tables only")
    args = ap.parse_args(argv)

    names = [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown or not names:
        ap.error(f"unknown suite {', '.join(unknown) or '(none given)'}; valid: {', '.join(SUITES)}")
    try:
        options = _parse_options(args.opt)
    except ValueError as exc:
        ap.error(str(exc))
    if args.data is not None:
        os.environ["FILTERX_BENCH_DATA"] = str(args.data.expanduser().resolve())

    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    machine = machine_description()
    when = dt.datetime.now()
    gpu = machine["gpu"] or "no GPU"
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB, {gpu}; "
          f"load {machine['load_avg_at_start']}")
    results = []
    for name in names:
        suite = SUITES[name]
        print(f"\n== {name}: {suite.description}", flush=True)
        res = run_suite(suite, args.quick, options)
        if res.status == "ok":
            print(format_table(res.rows))
            for note in res.notes:
                print(f"  {note}")
            if not args.no_write:
                res.files = write_results(args.out, res, machine, command, args.quick, when)
        else:
            print(f"{name}: {res.status}: {res.error}")
        results.append(res)

    ran = [r for r in results if r.status == "ok"]
    unused = [k for k in options if "." not in k and ran and not any(k in r.options for r in ran)]
    if unused:
        print(f"\noption {', '.join(unused)} was taken by none of the suites that ran")
    print("\n== summary")
    print(format_table([{"suite": r.suite.name, "status": r.status, "rows": len(r.rows),
                         "seconds": round(r.seconds, 1),
                         "results": str(r.files[0]) if r.files else (r.error[:80] or "-")}
                        for r in results]))
    return 0 if all(r.status == "ok" for r in results) and not unused else 1
