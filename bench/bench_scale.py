"""scale: wall time and peak RSS of every stage at ImageNet row counts (N = 10k, 100k, 1.28M).

    python -m bench --suite scale            # N = 10k, 100k, 1.28M
    python -m bench --suite scale --quick    # N = 10k, 100k
    python -m bench --suite scale --opt sizes=10000,50000 --opt fresh=true

Per N: a pool of N tiny generated JPEGs (``bench/scale_data.py``) is sharded for real by
``filterx.stages.shard`` (timed: ``shard``); the pool and a 31-class target get SYNTHETIC
embeddings (D=512, float16, written through ``filterx.io.rowstore``, labelled ``synthetic``);
then every stage after embed runs on that real dataset dir at full row count: ``score`` for
each method on embeddings (the stage function, loading included), ``select`` with a fraction,
a count and a per-class cap, the four manifest formats, ``report`` and ``info``. Each
measurement is one fresh child process (``bench.suite.run_child``): ``seconds`` is the stage
call, ``peak_rss_mb`` the child's high-water mark, ``base_rss_mb`` its RSS after imports.

Rows carry ``x_prev``: time(N) / time(previous N), and ``exponent``: log(time ratio) / log(N
ratio) (1 = linear, 2 = quadratic). ``rss_x_input`` = peak RSS / size of the embeddings the
stage reads (N x 512 x 2 bytes) for scorers.

The pools (tiny JPEG trees, dataset dirs, synthetic embeddings) are cached under the bench
data dir per N; a cached pool keeps the shard row measured when it was built (its
``recorded`` column says when; ``--opt fresh=true`` re-shards). ``--opt skip=a,b`` leaves out
the named scorer rows.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from bench.scale_data import SYNTHETIC_TAG

SIZES = (10_000, 100_000, 1_280_000)
# (row name, method, params): every scorer on embeddings (last-block influence needs pixels
# through the network and is out of this suite's scope)
SCORERS = (
    ("clustering-min", "clustering", {"distance": "min"}),
    ("clustering-avg", "clustering", {"distance": "avg"}),
    ("entropy", "entropy", {}),
    ("entropy-outlier-exposure", "entropy", {"head": "outlier-exposure"}),
    ("domain-cls", "domain-cls", {}),
    ("domain-cls-folds5", "domain-cls", {"folds": 5}),
    ("knn-target", "knn-target", {}),
    ("pool-clusters", "pool-clusters", {}),
    ("pool-clusters-k1000", "pool-clusters", {"k": 1000}),
    ("hard-classes", "hard-classes", {"count": 50, "epochs": 1}),
    ("class-mask", "class-mask", {"classes": "c0000,c0001,c0002"}),
    ("influence-head", "influence", {}),
    ("grad-align", "grad-align", {}),
    # grad-align's earlier defaults: the mean over every class of the held-out split (one GEMM pass)
    ("grad-align-all", "grad-align", {"over": "all", "align_with": "validation"}),
    ("random", "random", {}),
)
SELECTS = (
    ("select-fraction", {"fraction": 0.1}),
    ("select-count", {"count": 5000}),
    ("select-cap", {"fraction": 0.5, "per_class_cap": 300}),
)
FORMATS = ("jsonl", "npy", "txt", "wds")
WDS_MAX_SELECTED = 20_000  # wds copies image bytes: its selection is capped at this many samples


def _base(n: int) -> Path:
    from bench.images import default_data_dir

    return default_data_dir() / "scale" / f"n{n}"


# ---------------------------------------------------------------- child-side stage calls


def _rss_now() -> float:
    from bench.suite import current_rss_mb

    return current_rss_mb()


def stage_shard(src: str, out: str) -> dict:
    from filterx.stages.shard import ShardConfig, shard

    base = _rss_now()
    t0 = time.perf_counter()
    summary = shard(ShardConfig(Path(src), Path(out), shard_size=1000, quiet=True))
    return {"seconds": time.perf_counter() - t0, "base_rss_mb": base, "samples": summary.num_samples}


def stage_embeddings(dataset: str) -> dict:
    from bench.scale_data import write_synthetic_embeddings

    base = _rss_now()
    t0 = time.perf_counter()
    write_synthetic_embeddings(Path(dataset), seed=0)
    return {"seconds": time.perf_counter() - t0, "base_rss_mb": base}


def stage_score(dataset: str, target: str, encoder: str, method: str, params: dict, name: str) -> dict:
    import torch

    from filterx.stages.score import ScoreConfig, score

    torch.set_num_threads(2)
    base = _rss_now()
    t0 = time.perf_counter()
    s = score(ScoreConfig(method, Path(dataset), Path(target), Path(encoder), params=params, name=name,
                          device="cpu", quiet=True))
    return {"seconds": time.perf_counter() - t0, "base_rss_mb": base, "scored": s.scored}


def stage_select(dataset: str, method: str, output: str, fmt: str | None, budget: dict) -> dict:
    from filterx.stages.select import SelectConfig, select

    base = _rss_now()
    t0 = time.perf_counter()
    s = select(SelectConfig(Path(dataset), method, Path(output), fmt=fmt, quiet=True, **budget))
    return {"seconds": time.perf_counter() - t0, "base_rss_mb": base, "selected": s.selected}


def stage_report(dataset: str, out: str, methods: list[str]) -> dict:
    from filterx.report.page import make_report

    base = _rss_now()
    t0 = time.perf_counter()
    make_report(dataset, out, methods=methods, fraction=0.1)
    return {"seconds": time.perf_counter() - t0, "base_rss_mb": base}


def stage_info(dataset: str) -> dict:
    from filterx.report.info import dataset_info

    base = _rss_now()
    t0 = time.perf_counter()
    info = dataset_info(dataset)
    info.text()
    return {"seconds": time.perf_counter() - t0, "base_rss_mb": base, "samples": info.samples}


def build_pool_src(root: str, n: int) -> dict:
    from bench.scale_data import POOL_CLASSES, write_image_folder

    t0 = time.perf_counter()
    write_image_folder(Path(root), n, POOL_CLASSES)
    return {"seconds": time.perf_counter() - t0}


def build_target(base: str) -> dict:
    from bench import scale_data

    t0 = time.perf_counter()
    scale_data.build_target(Path(base))
    return {"seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------- runner side


def _measure(target: str, kwargs: dict, timeout: float) -> dict:
    from bench.suite import run_child

    try:
        return run_child(target, kwargs, timeout=timeout)
    except Exception as exc:  # RuntimeError from the child, or its timeout: a row, not the end
        return {"error": str(exc).strip().splitlines()[-1][:200]}


def _row(stage: str, n: int, res: dict, input_mb: float | None = None, **extra) -> dict:
    row = {"stage": stage, "N": n, "seconds": res.get("seconds"), "peak_rss_mb": res.get("peak_rss_mb"),
           "rss_added_mb": (round(res["peak_rss_mb"] - res["base_rss_mb"], 1)
                            if "peak_rss_mb" in res and "base_rss_mb" in res else None)}
    if input_mb:
        row["input_mb"] = round(input_mb, 1)
        row["rss_x_input"] = round(res["peak_rss_mb"] / input_mb, 2) if "peak_rss_mb" in res else None
    row.update(extra)
    if "error" in res:
        row["error"] = res["error"]
    print(f"  {stage} N={n}: " + (f"{res['seconds']:.2f}s, {res.get('peak_rss_mb')} MB" if "seconds" in res
                                  else res.get("error", "?")), flush=True)
    return row


def growth(rows: list[dict]) -> list[dict]:
    """Add ``x_prev`` (time ratio to the same stage's previous N) and ``exponent``."""
    last: dict[str, dict] = {}
    for r in rows:
        prev = last.get(r["stage"])
        if prev and prev.get("seconds") and r.get("seconds"):
            ratio = r["seconds"] / prev["seconds"]
            r["x_prev"] = round(ratio, 2)
            r["exponent"] = round(math.log(ratio) / math.log(r["N"] / prev["N"]), 2)
        if r.get("seconds"):
            last[r["stage"]] = r
    return rows


def _scale_pool(n: int, timeout: float, rows: list[dict], fresh: bool) -> Path:
    """The dataset dir of N tiny JPEGs, sharded for real by the shard stage (timed). A pool
    cached by an earlier run keeps the shard row that run measured (``shard-timing.json``,
    ``recorded`` says when) unless ``fresh``."""
    base = _base(n)
    base.mkdir(parents=True, exist_ok=True)
    src, ds = base / "src", base / "pool"
    _measure("bench.bench_scale:build_pool_src", {"root": str(src), "n": n}, timeout)
    timing = base / "shard-timing.json"
    if fresh or not timing.is_file():
        shutil.rmtree(ds, ignore_errors=True)  # time a whole shard run, not a resumed no-op
        shutil.rmtree(base / "target", ignore_errors=True)
        timing.unlink(missing_ok=True)
    if not (ds / "index.zarr" / "zarr.json").is_file():
        res = _measure("bench.bench_scale:stage_shard", {"src": str(src), "out": str(ds)}, timeout)
        if "seconds" in res:
            timing.write_text(json.dumps({**res, "recorded": time.strftime("%Y-%m-%d %H:%M")}))
    else:
        res = json.loads(timing.read_text())
    rows.append(_row("shard", n, res, per_image_ms=(round(1000 * res["seconds"] / n, 3) if "seconds" in res else None),
                     recorded=res.get("recorded")))
    return ds


def run(quick: bool = True, sizes=None, timeout: float = 1800.0, skip: str = "", fresh: bool = False) -> list[dict]:
    """One row per (stage, N); see the module docstring. ``sizes``: N values (comma list);
    ``skip``: comma list of stage names not to run; ``fresh``: re-shard cached pools."""
    from bench.scale_data import describe
    from bench.suite import option_tuple

    sizes = option_tuple(sizes, int) or (SIZES[:2] if quick else SIZES)
    skipped = set(option_tuple(skip))
    rows: list[dict] = []
    for n in sizes:
        print(f"scale: N={n}", flush=True)
        base = _base(n)
        ds = _scale_pool(n, timeout, rows, fresh)
        _measure("bench.bench_scale:build_target", {"base": str(base)}, timeout)
        target, encoder = base / "target", base / "synthetic-encoder.pt"
        emb_mb = describe(ds)["samples"] * 512 * 2 / 2**20
        rows.append(_row("write-embeddings (synthetic)", n,
                         _measure("bench.bench_scale:stage_embeddings", {"dataset": str(ds)}, timeout), emb_mb))
        for label, method, params in SCORERS:
            if label in skipped:
                continue
            res = _measure("bench.bench_scale:stage_score",
                           dict(dataset=str(ds), target=str(target), encoder=str(encoder), method=method,
                                params=params, name=label), timeout)
            rows.append(_row(f"score {label}", n, res, emb_mb))
        out = base / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        for label, budget in SELECTS:
            res = _measure("bench.bench_scale:stage_select",
                           dict(dataset=str(ds), method="clustering-min", output=str(out / f"{label}.jsonl"),
                                fmt=None, budget=budget), timeout)
            rows.append(_row(label, n, res, selected=res.get("selected")))
        for fmt in FORMATS:
            budget = {"fraction": 0.1}
            if fmt == "wds" and n // 10 > WDS_MAX_SELECTED:
                budget = {"count": WDS_MAX_SELECTED}
            path = out / ("subset-wds" if fmt == "wds" else f"subset.{fmt}")
            res = _measure("bench.bench_scale:stage_select",
                           dict(dataset=str(ds), method="clustering-min", output=str(path), fmt=fmt,
                                budget=budget), timeout)
            rows.append(_row(f"manifest {fmt}", n, res, selected=res.get("selected")))
        if "report" not in skipped:
            res = _measure("bench.bench_scale:stage_report",
                           dict(dataset=str(ds), out=str(out / "report"),
                                methods=["clustering-min", "entropy", "domain-cls"]), timeout)
            rows.append(_row("report", n, res))
        rows.append(_row("info", n, _measure("bench.bench_scale:stage_info", {"dataset": str(ds)}, timeout)))
    return growth(rows)


__all__ = ["run", "SYNTHETIC_TAG"]
