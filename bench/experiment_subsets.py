"""Does a filtered pre-training subset beat a random one? The experiment, on the demo data.

    python bench/experiment_subsets.py [--quick] [--seeds 3] [--work DIR]

For each budget (6% and 12% of the pool) and each method (random, domain-cls, clustering min
and avg, influence) a ResNet-18 is pre-trained on the method's subset for the SAME number of
SGD steps (so a 6% subset is seen twice as many epochs as a 12% one), then fine-tuned on the
target; the target test top-1 is reported over several seeds next to two baselines with the
same fine-tuning: "no pre-training" (from scratch) and "whole pool" (the same steps on all of
it). Everything that is not the subset is the same in every row.

- Data: ``filterx.stages.demo.run_demo`` into ``--work`` (reused when there): the pool (3000
  images, 30 classes), the target (5 digit classes, 60 each), the encoder and the scores.
- Fine-tuning trains on the encoder's own training split of the target (270 images) and is
  tested on a separate test set made here: target-style digits (``make_sample_data`` with the
  demo's seed, so from the target's half of the handwriting bank, none from the pool's),
  ``test_per_class`` per class, never seen by the encoder, the scorers or any fine-tuning run.
- Seeds vary pre-training and fine-tuning (initial weights, order, augmentation) and the
  random subset; the scored subsets are the same for every seed (scores are deterministic).
- The reported accuracy is the test top-1 after the last fine-tuning epoch (no epoch is
  picked on the test set); std is the sample std (ddof 1) over seeds; "vs random" is the
  mean ± std over seeds of the paired difference with the random subset of the same budget
  and seed.

One torch thread by default: on the 2-core development machine two intra-op threads made a
ResNet-18 step at 32 px about 15x slower than one (3.4 s against 0.24 s at batch 60; OpenMP
threads waiting for each other on a shared machine); ``--threads`` changes it.

Finished runs are kept in ``WORK/experiment/runs`` under a hash of their settings, so a killed
run re-run continues (``--fresh`` ignores them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(REPO))

from bench.suite import DEFAULT_OUT, format_markdown_table, format_table, machine_description, results_stem  # noqa: E402

# key -> (label, stored score name made by the demo); random's scores are drawn per seed
METHODS = {
    "random": ("random", None),
    "domain-cls-mlp": ("domain-cls (mlp, 2 folds)", "domain-cls-mlp-2-300"),
    "domain-cls-linear": ("domain-cls (linear)", "domain-cls-linear-300"),
    "clustering-min": ("clustering (min)", "clustering-50-min"),
    "clustering-avg": ("clustering (avg)", "clustering-50-avg"),
    "influence": ("influence (pseudo-labels)", "influence-pseudo"),
}
DEFAULT_METHODS = ("random", "domain-cls-mlp", "clustering-min", "clustering-avg", "influence")


@dataclass(frozen=True)
class ExperimentConfig:
    work: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = DEFAULT_METHODS
    budgets: tuple[float, ...] = (0.06, 0.12)
    steps: int = 150  # pre-training SGD steps, the same for every subset and the whole pool
    arch: str = "resnet18"
    resolution: int = 32
    pretrain_batch: int = 60  # 3000 / 60 = 50 steps per pool epoch: 6%, 12% and 100% divide exactly
    pretrain_lr: float = 0.025  # at a batch of 256 (pretrain scales it: 0.0059 at 60); cosine
    ft_epochs: int = 15
    ft_batch: int = 32
    ft_lr: float = 0.01  # backbone; the new head 10x
    test_per_class: int = 40
    augment: bool = False  # the loader's random resized crops (area 0.08-1) + flips, in both stages
    backend: str = "torchvision"
    threads: int = 1
    device: str = "auto"
    quick: bool = False
    demo_epochs: int = 20  # the demo encoder's
    fresh: bool = False

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; valid: {', '.join(METHODS)}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        bad = [b for b in self.budgets if not 0.0 < b < 1.0]
        if bad:
            raise ValueError(f"budgets must be fractions in (0, 1), got {bad}")
        for name in ("steps", "pretrain_batch", "ft_epochs", "ft_batch", "test_per_class", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def quick_config(work: Path, **kw) -> ExperimentConfig:
    """One seed, two methods, one budget, a few steps: minutes on the demo's quick data."""
    base = dict(work=work, seeds=(0,), methods=("random", "clustering-avg"), budgets=(0.12,), steps=4,
                ft_epochs=2, test_per_class=6, quick=True, demo_epochs=2)
    return ExperimentConfig(**{**base, **kw})


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Work:
    root: Path
    source: Path
    target_train: Path  # manifest: the encoder's training split of the target
    test: Path  # dataset dir: target-style test images nobody trained on
    relevant: tuple[str, ...]  # pool classes that are the target's classes
    domain: tuple[str, ...]  # pool classes of the target's domain (all digits)
    seconds: float


def prepare_work(cfg: ExperimentConfig) -> Work:
    """The demo's pool, target, encoder and scores (made once), the test set and the
    fine-tuning split manifest; every part is reused when already in ``cfg.work``."""
    import torch

    from filterx.io import atomic
    from filterx.io.dataset import Dataset, is_dataset
    from filterx.stages.demo import DemoConfig, run_demo
    from filterx.io.manifest import make_header, write_manifest
    from filterx.io.sampledata import make_sample_data
    from filterx.stages.shard import ShardConfig, shard

    t0 = time.perf_counter()
    root = Path(cfg.work).expanduser()
    if not (root / "demo_results.json").is_file():
        run_demo(DemoConfig(out=root, epochs=cfg.demo_epochs, quick=cfg.quick, device=cfg.device, quiet=True))
    meta = json.loads((root / "data" / "sample_data.json").read_text())
    test = root / "test"
    if not is_dataset(test):
        raw = root / "data-test"
        if not (raw / "sample_data.json").is_file():
            with atomic.atomic_path(raw) as tmp:
                # the demo's seed splits the handwriting bank the same way: these test digits come
                # from the target's half, drawn and rendered afresh (no pool image, none of the target's)
                make_sample_data(tmp, per_class=0, photos=0, textures=0, target_per_class=cfg.test_per_class,
                                 seed=int(meta["seed"]))
        shard(ShardConfig(raw / "target", test, shard_size=500, workers=1, quiet=True))
    target = Dataset.open(root / "target")
    enc = torch.load(root / "encoder.pt", map_location="cpu", weights_only=False)
    if enc["target"]["fingerprint"] != target.fingerprint:
        raise ValueError(f"{root / 'encoder.pt'} was trained on another target than {target.root}")
    split = root / "experiment" / "target-train.jsonl"
    if not split.is_file():
        ids = np.sort(np.asarray(enc["train_ids"], dtype=np.int64))
        write_manifest(split, "jsonl", target, ids, np.zeros(len(ids), np.float32),
                       make_header(target, "encoder-train-split", {"count": len(ids)}, len(ids)))
    return Work(root, root / "source", split, test, tuple(meta["relevant_classes"]),
                tuple(meta["domain_classes"]), time.perf_counter() - t0)


def subset_manifest(work: Work, method: str, budget: float, seed: int) -> Path:
    """The manifest of ``method``'s top ``budget`` of the pool; random's is drawn with ``seed``."""
    from filterx.io.dataset import Dataset
    from filterx.stages.score import ScoreConfig, list_scores, score
    from filterx.stages.select import SelectConfig, select

    name = METHODS[method][1]
    if name is None:
        name = f"random-seed{seed}"
        if name not in list_scores(Dataset.open(work.source)):
            score(ScoreConfig("random", work.source, seed=seed, name=name, quiet=True))
    elif name not in list_scores(Dataset.open(work.source)):
        raise ValueError(f"{work.source} has no scores {name!r} for method {method!r} (stored: "
                         f"{', '.join(list_scores(Dataset.open(work.source)))}); the demo makes them")
    path = work.root / "experiment" / "manifests" / f"{name}-{budget:g}.jsonl"
    if not path.is_file():
        select(SelectConfig(work.source, name, path, fraction=budget, quiet=True))
    return path


def composition(work: Work, data: Path) -> dict:
    """What a pre-training set holds: images, pool classes present, the share of the target's
    classes and of the target's domain, and the images per class."""
    from filterx.io.dataset import Dataset
    from filterx.train.data import resolve_training_data

    ds = Dataset.open(work.source)
    labels = resolve_training_data(data).labels
    names = np.array([c.name for c in ds.classes])
    counts = np.bincount(labels, minlength=len(names))
    return {"images": int(len(labels)), "classes": int((counts > 0).sum()),
            "target_classes": float(np.isin(names[labels], work.relevant).mean()),
            "digits": float(np.isin(names[labels], work.domain).mean()),
            "per_class": {str(n): int(c) for n, c in zip(names, counts)}}


# ---------------------------------------------------------------- runs


def epochs_for_steps(count: int, steps: int, batch_size: int, backend: str) -> tuple[int, int]:
    """(epochs, actual steps) closest to ``steps`` SGD steps over ``count`` images."""
    from filterx.train.data import batches_per_epoch

    per_epoch = batches_per_epoch(count, batch_size, 0, 1, backend)
    epochs = max(1, int(round(steps / per_epoch)))
    return epochs, epochs * per_epoch


def _identity(path: Path | None) -> str | None:
    from filterx.train.data import resolve_training_data

    return None if path is None else json.dumps(resolve_training_data(path).identity(), sort_keys=True)


def run_one(cfg: ExperimentConfig, work: Work, data: Path | None, seed: int) -> dict:
    """Pre-train on ``data`` (None: no pre-training) for ``cfg.steps`` steps, fine-tune on the
    target, test. Returns the record; cached under ``WORK/experiment/runs`` by its settings."""
    from filterx.train.pretrain import FinetuneConfig, PretrainConfig, finetune, pretrain
    from filterx.train.finetune import selected_epoch

    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("work", "seeds", "methods", "budgets", "threads", "quick", "fresh", "demo_epochs")}
    # protocol 2: finetune trains on the target less a validation split (runs cached before differ)
    key = {"settings": settings, "data": _identity(data), "seed": seed, "protocol": 2,
           "target": _identity(work.target_train), "test": _identity(work.test)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = work.root / "experiment" / "runs" / f"{digest}.json"
    if cache.is_file() and not cfg.fresh:
        return {**json.loads(cache.read_text()), "cached": True}
    shm = Path("/dev/shm")  # per-epoch checkpoints of a ResNet-18 are ~90 MB: keep them off the disk
    scratch = Path(tempfile.mkdtemp(prefix="filterx-exp-", dir=shm if os.access(shm, os.W_OK) else None))
    common = dict(resolution=cfg.resolution, augment=cfg.augment, backend=cfg.backend, device=cfg.device,
                  workers=0, seed=seed, quiet=True)
    rec = {"seed": seed, "data": str(data) if data else None}
    try:
        init = None
        if data is not None:
            from filterx.train.data import resolve_training_data

            epochs, steps = epochs_for_steps(resolve_training_data(data).count, cfg.steps, cfg.pretrain_batch,
                                             cfg.backend)
            pre = pretrain(PretrainConfig(data=data, out=scratch / "pre", arch=cfg.arch, epochs=epochs,
                                          batch_size=cfg.pretrain_batch, lr=cfg.pretrain_lr, schedule="cosine",
                                          weight_decay=5e-4, **common))
            init = pre.model
            rec.update(pretrain_epochs=epochs, pretrain_steps=steps, pretrain_seconds=pre.seconds,
                       pretrain_loss=pre.final["loss"], pretrain_train_top1=pre.final["train_top1"])
        ft = finetune(FinetuneConfig(target=work.target_train, out=scratch / "ft", init=init, arch=cfg.arch,
                                     test=work.test, epochs=cfg.ft_epochs, batch_size=cfg.ft_batch, lr=cfg.ft_lr,
                                     **common))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rec.update(test_top1=ft.final["test_top1"],
               test_top1_at_best_val=selected_epoch(ft.history)["test_top1_at_best_val"],
               test_count=ft.final["test_count"], finetune_train_top1=ft.final["train_top1"],
               test_top1_by_epoch=[r["test_top1"] for r in ft.history], finetune_seconds=ft.seconds)
    rec["seconds"] = rec.get("pretrain_seconds", 0.0) + ft.seconds
    from filterx.io import atomic

    atomic.write_text(cache, json.dumps(rec))
    return {**rec, "cached": False}


# ---------------------------------------------------------------- the experiment


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def run_experiment(cfg: ExperimentConfig, log=print) -> dict:
    """Every run of the experiment; returns {"rows", "runs", "subsets", "settings", "seconds"}."""
    import torch

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        work = prepare_work(cfg)
        log(f"data ready in {work.seconds:.0f}s: {work.root}")
        arms = [("no pre-training", None, None), ("whole pool", None, 1.0)]
        arms += [(METHODS[m][0], m, b) for b in cfg.budgets for m in cfg.methods]
        runs, subsets = [], {}
        total = len(arms) * len(cfg.seeds)
        for seed in cfg.seeds:  # seeds outermost: a partial run has every arm for its first seeds
            for name, method, budget in arms:
                data = None if budget is None else work.source if method is None else \
                    subset_manifest(work, method, budget, seed)
                if data is not None and (name, budget, seed if method == "random" else None) not in subsets:
                    subsets[(name, budget, seed if method == "random" else None)] = composition(work, data)
                rec = run_one(cfg, work, data, seed)
                rec.update(arm=name, method=method, budget=budget)
                runs.append(rec)
                log(f"  [{len(runs)}/{total}] seed {seed} {name} {'' if budget is None else f'{budget:.0%}'}: "
                    f"test top-1 {rec['test_top1']:.1%} ({rec['seconds']:.0f}s{', cached' if rec['cached'] else ''})")
        rows = summarize(runs, subsets, cfg)
    finally:
        torch.set_num_threads(threads)
    return {"rows": rows, "runs": runs, "prep_seconds": work.seconds, "seconds": time.perf_counter() - t0,
            "subsets": [{"arm": k[0], "budget": k[1], "seed": k[2], **v} for k, v in subsets.items()],
            "test_images": runs[0]["test_count"], "target_train_images": len(_ids(work.target_train))}


def _ids(path: Path) -> np.ndarray:
    from filterx.train.data import resolve_training_data

    return resolve_training_data(path).sample_ids


def summarize(runs: list[dict], subsets: dict, cfg: ExperimentConfig) -> list[dict]:
    """One row per arm (and budget): composition, steps, top-1 mean ± std and values, paired
    difference with random, seconds per seed."""
    rows = []
    for arm, budget in dict.fromkeys((r["arm"], r["budget"]) for r in runs):
        group = sorted((r for r in runs if r["arm"] == arm and r["budget"] == budget), key=lambda r: r["seed"])
        comps = [v for k, v in subsets.items() if k[0] == arm and k[1] == budget]
        top1 = [100 * r["test_top1"] for r in group]
        mean, std = _stats(top1)
        row = {"pre-training": arm, "budget": "-" if budget is None else f"{budget:.0%}",
               "images": int(np.mean([c["images"] for c in comps])) if comps else 0,
               "classes": float(np.mean([c["classes"] for c in comps])) if comps else 0,
               "target_cls_%": float(100 * np.mean([c["target_classes"] for c in comps])) if comps else None,
               "digits_%": float(100 * np.mean([c["digits"] for c in comps])) if comps else None,
               "epochs": group[0].get("pretrain_epochs", 0), "steps": group[0].get("pretrain_steps", 0),
               "top1_mean": mean, "top1_std": std, "top1_values": " ".join(f"{v:.1f}" for v in top1)}
        ref = {r["seed"]: 100 * r["test_top1"] for r in runs if r["method"] == "random" and r["budget"] == budget}
        if budget is not None and budget < 1.0 and ref and group[0]["method"] != "random":
            d_mean, d_std = _stats([100 * r["test_top1"] - ref[r["seed"]] for r in group if r["seed"] in ref])
            row["vs_random"] = f"{d_mean:+.1f} ± {d_std:.1f}"
        row["seconds"] = float(np.mean([r["seconds"] for r in group]))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- command line


def write_results(out_dir: Path, result: dict, cfg: ExperimentConfig, machine: dict, command: str,
                  when: dt.datetime) -> tuple[Path, Path]:
    """``subsets[-quick]_<machine>_<N>c_<YYYYMMDD-HHMM>.json`` and ``.md``; never overwrites."""
    from filterx.io import atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = base = results_stem("subsets", machine, cfg.quick, when)
    k = 1
    while (out_dir / f"{stem}.json").exists():
        k += 1
        stem = f"{base}-{k}"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    doc = {"experiment": "subsets", "command": command, "machine": machine, "settings": settings, **result}
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic.write_text(json_path, json.dumps(doc, indent=1, default=str) + "\n")
    atomic.write_text(md_path, render_markdown(json.loads(json_path.read_text())))
    return json_path, md_path


def render_markdown(doc: dict) -> str:
    """The results document (as written to the JSON file) as a Markdown page."""
    m, c = doc["machine"], doc["settings"]
    crops = "random resized crops + flips" if c["augment"] else "center crops, no flips"
    cached = sum(r.get("cached", False) for r in doc["runs"])
    return "\n".join([
        "# Filtered vs random pre-training subsets on the demo data", "",
        f"- command: `{doc['command']}`",
        f"- date: {m['date']}; wall time {doc['seconds'] / 60:.1f} min (data preparation "
        f"{doc['prep_seconds']:.0f} s of it; {cached} of {len(doc['runs'])} runs taken from the run cache); "
        f"commit {m.get('git_commit')}",
        f"- machine: {m['cpu']}, {m['cores']} cores usable, {m['ram_gib']} GiB RAM, GPU "
        f"{m.get('gpu') or 'none'}; load average at start {m['load_avg_at_start']}; {c['threads']} torch thread(s)",
        f"- versions: python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}",
        f"- pre-training: {c['arch']} at {c['resolution']} px, {c['steps']} SGD steps of {c['pretrain_batch']} "
        f"images for every pre-trained row (epochs = steps / steps per epoch), lr {c['pretrain_lr']} at 256 "
        f"scaled linearly, cosine, weight decay 5e-4, {crops}; labels: the pool's classes",
        f"- fine-tuning: {doc['target_train_images']} target images (the encoder's training split), "
        f"{c['ft_epochs']} epochs, batch {c['ft_batch']}, lr {c['ft_lr']} (head x10), inv schedule, {crops}; "
        f"the same for every row, from scratch included",
        f"- test: {doc['test_images']} target-style images made for this experiment, seen by no "
        f"training run; top-1 after the last fine-tuning epoch",
        f"- seeds {c['seeds']}: they vary pre-training, fine-tuning and the random subset; the scored "
        f"subsets are the same for every seed. std: sample std over seeds; vs_random: paired difference "
        f"with the random subset of the same budget and seed (mean ± std); seconds: per seed",
        "- target_cls_%: share of the subset in the target's classes (pool digits 0-4, 16.7% of the pool); "
        "digits_%: in the target's domain (all pool digits, 33.3%); for random, means over the seeds' subsets", "",
        format_markdown_table(doc["rows"]), ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/experiment_subsets.py", description=__doc__.split("\n\n")[0],
                                 epilog="example: python bench/experiment_subsets.py --seeds 3")
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 methods, 1 budget, a few steps (smoke test)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    ap.add_argument("--work", type=Path, default=None,
                    help="data and run cache (default ~/.cache/filterx-experiment[-quick])")
    ap.add_argument("--methods", default=None, help=f"comma-separated, of: {', '.join(METHODS)}")
    ap.add_argument("--budgets", default=None, help="comma-separated fractions (default 0.06,0.12)")
    ap.add_argument("--steps", type=int, default=None, help="pre-training steps (default 150)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1: see the module doc)")
    ap.add_argument("--augment", action="store_true", help="random resized crops + flips (default: center crops)")
    ap.add_argument("--ft-epochs", type=int, default=None, help="fine-tuning epochs (default 15)")
    ap.add_argument("--ft-lr", type=float, default=None, help="fine-tuning lr of the backbone (default 0.01)")
    ap.add_argument("--fresh", action="store_true", help="redo runs found in the run cache")
    ap.add_argument("--out", type=Path, default=None, help="results dir (default bench/results; WORK/results with --quick)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--render", type=Path, default=None, metavar="RESULTS.json",
                    help="only rewrite the .md beside a results file from its JSON, and exit")
    args = ap.parse_args(argv)
    if args.render is not None:
        from filterx.io import atomic

        if not args.render.is_file():
            ap.error(f"--render {args.render}: no such results file")
        atomic.write_text(args.render.with_suffix(".md"), render_markdown(json.loads(args.render.read_text())))
        print(f"wrote {args.render.with_suffix('.md')}")
        return 0

    work = args.work or Path.home() / ".cache" / ("filterx-experiment-quick" if args.quick else "filterx-experiment")
    kw = {k: v for k, v in dict(
        seeds=tuple(range(args.seeds)) if args.seeds else None,
        methods=tuple(m.strip() for m in args.methods.split(",")) if args.methods else None,
        budgets=tuple(float(b) for b in args.budgets.split(",")) if args.budgets else None,
        steps=args.steps, threads=args.threads, augment=args.augment or None, ft_epochs=args.ft_epochs,
        ft_lr=args.ft_lr, fresh=args.fresh or None).items() if v is not None}
    try:
        cfg = quick_config(work, **kw) if args.quick else ExperimentConfig(work=work, **kw)
    except ValueError as exc:
        ap.error(str(exc))
    command = shlex.join(["python", "bench/experiment_subsets.py", *(sys.argv[1:] if argv is None else argv)])
    machine = machine_description()
    when = dt.datetime.now()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load {machine['load_avg_at_start']}; "
          f"{len(cfg.seeds)} seed(s), methods {', '.join(cfg.methods)}, budgets {list(cfg.budgets)}", flush=True)
    result = run_experiment(cfg, log=lambda s: print(s, flush=True))
    print(format_table(result["rows"]))
    print(f"total {result['seconds'] / 60:.1f} min (data preparation {result['prep_seconds']:.0f}s)")
    if not args.no_write:
        out = args.out or (work / "results" if args.quick else DEFAULT_OUT)
        paths = write_results(out, result, cfg, machine, command, when)
        print("results:", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
