"""demo: the whole chain on built-in sample data (filterx.io.sampledata), with a scorecard.

Each method selects ``fraction`` of the pool; its precision is the share of the selection
that falls in the known relevant part (pool images of the target's classes). Random's
expected precision is that part's share of the pool. Every stage reuses what an earlier run
left in ``out``, so a re-run after a kill continues.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from filterx.io import atomic

# (label, method, params): the variants the demo compares.
VARIANTS = (
    ("random", "random", {}),
    ("clustering (min)", "clustering", {"k": 50, "distance": "min"}),
    ("clustering (avg)", "clustering", {"k": 50, "distance": "avg"}),
    ("domain-cls (linear)", "domain-cls", {"model": "linear", "steps": 300}),
    ("domain-cls (mlp, 2 folds)", "domain-cls", {"model": "mlp", "folds": 2, "steps": 300}),
    ("entropy (high)", "entropy", {"order": "high"}),
    ("entropy (low, encoder's head)", "entropy", {"head": "given", "order": "low"}),
    ("entropy (low, outlier exposure)", "entropy", {"order": "low"}),  # --head auto: outlier exposure
    ("influence (pseudo-labels)", "influence", {"labels": "pseudo"}),
)


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("filterx-demo")
    epochs: int = 20
    fraction: float = 0.1
    seed: int = 0
    quick: bool = False
    device: str = "auto"
    quiet: bool = False


@dataclass(frozen=True)
class DemoSummary:
    out: Path
    relevant_share: float
    domain_share: float
    encoder_val_acc: float
    rows: list = field(default_factory=list)
    seconds: float = 0.0
    pool: int = 0  # images in the pool

    def table(self) -> str:
        w = max([27, *(len(r["label"]) for r in self.rows)])
        lines = [f"{'method':<{w}} {'selected':>8} {'precision':>18} {'x expected random':>18} {'seconds':>7}",
                 f"{'':<{w}} {'':>8} {'classes':>9}{'domain':>9} {'classes':>9}{'domain':>9}"]
        for r in self.rows:
            lines.append(
                f"{r['label']:<{w}} {r['selected']:>8d} {r['precision']:>9.3f}{r['domain_precision']:>9.3f} "
                f"{r['precision'] / max(self.relevant_share, 1e-9):>9.2f}"
                f"{r['domain_precision'] / max(self.domain_share, 1e-9):>9.2f} {r['seconds']:>7.1f}")
        lines.append(f"{'expected random':<{w}} {'':>8} {self.relevant_share:>9.3f}{self.domain_share:>9.3f}")
        return "\n".join(lines)

    def line(self) -> str:
        scored = len(self.rows) * self.pool
        return (f"{self.table()}\n\n{len(self.rows)} methods scored the pool of {self.pool} images "
                f"({scored / max(sum(r['seconds'] for r in self.rows), 1e-9):.0f} img/s scored and selected, "
                f"embedding included) and selected "
                f"{sum(r['selected'] for r in self.rows)} images in all; target classes are "
                f"{self.relevant_share:.1%} of the pool, the target domain {self.domain_share:.1%}; target "
                f"encoder held-out accuracy {self.encoder_val_acc:.1%}; total {self.seconds:.0f}s; data/, "
                f"source/, target/, encoder.pt and manifests/ in {self.out}; results in "
                f"{self.out / 'demo_results.md'}")


def run_demo(cfg: DemoConfig) -> DemoSummary:
    from filterx.io.dataset import Dataset, is_dataset
    from filterx.models.encoder import read_encoder_file
    from filterx.train.encoder import EncoderConfig, train_encoder
    from filterx.io.manifest import read_manifest
    from filterx.io.sampledata import make_sample_data
    from filterx.stages.score import ScoreConfig, score
    from filterx.scorers import list_scorers
    from filterx.stages.select import SelectConfig, select
    from filterx.stages.shard import ShardConfig, shard

    t0 = time.perf_counter()
    out = Path(cfg.out)
    data = out / "data"
    size = dict(per_class=40, target_per_class=30, photos=6, textures=6) if cfg.quick else {}
    if not (data / "sample_data.json").is_file():
        with atomic.atomic_path(data) as tmp:
            make_sample_data(tmp, seed=cfg.seed, **size)
    meta = json.loads((data / "sample_data.json").read_text())
    relevant_names, domain_names = set(meta["relevant_classes"]), set(meta["domain_classes"])
    for part in ("source", "target"):
        if not is_dataset(out / part):
            shard(ShardConfig(data / part, out / part, shard_size=500, workers=2, quiet=cfg.quiet))
    encoder = out / "encoder.pt"
    epochs = min(cfg.epochs, 8) if cfg.quick else cfg.epochs
    if not encoder.is_file():
        train_encoder(EncoderConfig(out / "target", encoder, resolution=64, epochs=epochs, batch_size=64,
                                    device=cfg.device, seed=cfg.seed, quiet=cfg.quiet))
    val_acc = float(read_encoder_file(encoder)["metrics"]["val_acc"])
    source = Dataset.open(out / "source")
    relevant = np.isin(source.labels, [c.index for c in source.classes if c.name in relevant_names])
    in_domain = np.isin(source.labels, [c.index for c in source.classes if c.name in domain_names])
    rows = []
    available = set(list_scorers())
    for label, method, params in VARIANTS:
        if method not in available:
            continue
        name = label.split(" ")[0] + ("-" + "-".join(str(v) for v in params.values()) if params else "")
        t = time.perf_counter()
        score(ScoreConfig(method, out / "source", out / "target", encoder, dict(params), cfg.seed, name=name,
                          device=cfg.device, quiet=cfg.quiet))
        manifest_path = out / "manifests" / f"{name}.jsonl"
        select(SelectConfig(out / "source", name, manifest_path, fraction=cfg.fraction, quiet=cfg.quiet))
        ids = read_manifest(manifest_path).ids
        rows.append({"label": label, "method": method, "params": params, "selected": int(len(ids)),
                     "precision": float(relevant[ids].mean()) if len(ids) else 0.0,
                     "domain_precision": float(in_domain[ids].mean()) if len(ids) else 0.0,
                     "seconds": time.perf_counter() - t})
    summary = DemoSummary(out, float(relevant.mean()), float(in_domain.mean()), val_acc, rows,
                          time.perf_counter() - t0, int(source.num_samples))
    atomic.write_text(out / "demo_results.json", json.dumps({
        "relevant_share": summary.relevant_share, "domain_share": summary.domain_share,
        "encoder_val_acc": val_acc, "fraction": cfg.fraction,
        "pool": int(source.num_samples), "rows": rows}, indent=1))
    atomic.write_text(out / "demo_results.md", "```\n" + summary.table() + "\n```\n")
    return summary
