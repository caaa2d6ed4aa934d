"""score: run a registered scorer and store its scores with the dataset.

    DATASET/scores.zarr/<name>    (N,) float32, aligned to sample ids, NaN where not scored
                                  attrs: method, params, encoder, seed, filterx version, ...
    DATASET/reports/scores-<name>-<table>.csv   tables a scorer returns (e.g. per-class accuracy)
    DATASET/scores.zarr/.work-<name>/   while a streaming scorer (influence --params last-block)
                                  scores the pool: its per-shard work, so a killed run resumes;
                                  removed once <name> is stored; not a score (list_scores)

``score`` names no method: the registry resolves the method (or the variant a parameter
chooses), and ``score`` loads what an array scorer ``needs`` (embeddings, the target split, the
classifier head, labels, class metadata), embedding any dataset whose embeddings for the
encoder are missing; the scorer itself only sees arrays. A streaming scorer gets a
StreamContext (datasets, encoder, decode settings, its work store) instead.

Candidates: the pool (``candidates="source"``) or the target's own training split
(``"target-train"``, for influence "data dropout"): the latter scores are stored with the
target dataset, NaN on its validation split.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import filterx
from filterx.io import atomic
from filterx.io.dataset import Dataset
from filterx.io.scores import ensure_scores_root, list_scores, read_scores, work_path, write_scores, write_table  # noqa: F401
from filterx.core.faults import crash_point
from filterx.scorers import (
    ScoreInputs, ScoreResult, StreamContext, check_params, resolve_scorer, resolved_params, run_scorer,
)

log = logging.getLogger(__name__)

CANDIDATES = ("source", "target-train")
_EMB_INPUTS = {"source_emb", "target_emb", "target_val_emb", "head_weight", "head_bias"}
_TARGET_INPUTS = {"target_emb", "target_labels", "target_val_emb", "target_val_labels"}


@dataclass(frozen=True)
class ScoreConfig:
    method: str
    source: Path
    target: Path | None = None
    encoder: Path | None = None
    params: dict = field(default_factory=dict)
    seed: int = 0
    name: str | None = None
    candidates: str = "source"
    device: str = "auto"
    backend: str = "auto"
    batch_size: int = 128
    workers: int = 2
    quiet: bool = False
    # how the embedding it does is run (filterx.stages.embed); the scoring itself runs here
    runner: str | None = None
    address: str | None = None
    actors: int = 0


@dataclass(frozen=True)
class ScoreSummary:
    dataset: Path
    name: str
    scored: int
    total: int
    seconds: float
    attrs: dict
    rank: int = 0  # under torchrun: ranks other than 0 only embed

    def line(self) -> str:
        # what the scorer reported; a solver's residual first, as users must see it
        keys = sorted((k for k in self.attrs if k != "match_report"), key=lambda k: k != "residual")
        extra = {k: self.attrs[k] for k in keys
                 if isinstance(self.attrs[k], (int, float, str)) and not isinstance(self.attrs[k], bool)}
        facts = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(extra.items())[:6])
        return (f"scored {self.scored} of {self.total} samples with {self.name} in {self.seconds:.1f}s "
                f"({self.scored / max(self.seconds, 1e-9):.0f} samples/s); stored in "
                f"{self.dataset / 'scores.zarr' / self.name}" + (f"; {facts}" if facts else "")
                + (f"\nclasses matched (check them):\n{self.attrs['match_report']}" if "match_report" in self.attrs else ""))


def score(cfg: ScoreConfig) -> ScoreSummary:
    """Score the candidates with ``cfg.method`` and store the result (see module docstring)."""
    from filterx.core.runtime import dist_info, resolve_device

    t0 = time.perf_counter()
    # the method, or the variant one of its parameters chooses (influence --params last-block)
    scorer, cfg_params, chosen = resolve_scorer(cfg.method, cfg.params, cfg.candidates)
    cfg_params = check_params(scorer.name, cfg_params)  # before anything is embedded
    needs = set(scorer.needs)
    if cfg.candidates == "target-train":
        needs |= {"target_emb"}
    enc_file = None  # the encoder file, read once (weights included) for what follows
    if cfg.encoder is not None and needs & _EMB_INPUTS:
        from filterx.models.encoder import read_encoder_file

        enc_file = read_encoder_file(cfg.encoder)
    if "head_weight" in needs and "weight_decay" in scorer.defaults and "weight_decay" not in cfg_params \
            and enc_file is not None:
        # the Hessian is that of the objective the head was trained with: its recorded decay (a
        # scorer that trains a classifier of its own, such as domain-cls, keeps its own decay)
        trained = _recorded_weight_decay(enc_file)
        if trained is not None:
            cfg_params["weight_decay"] = trained
    params = resolved_params(scorer.name, **cfg_params)
    if cfg.candidates not in CANDIDATES:
        raise ValueError(f"unknown candidates {cfg.candidates!r}; valid: {', '.join(CANDIDATES)}")
    if scorer.check is not None:
        scorer.check(params, cfg.candidates)
    if needs & _EMB_INPUTS and cfg.encoder is None:
        raise ValueError(f"--method {cfg.method} needs --encoder (make one with: filterx train-encoder TARGET OUT)")
    if (needs & _TARGET_INPUTS or cfg.candidates == "target-train") and cfg.target is None:
        raise ValueError(f"--method {cfg.method} needs --target")
    device = resolve_device(cfg.device)
    source = Dataset.open(cfg.source)
    target = Dataset.open(cfg.target) if cfg.target is not None else None

    name = cfg.name or cfg.method
    # Under torchrun every rank embeds its share of what is missing; rank 0 alone scores and
    # writes (a streaming scorer runs on rank 0 only: the other ranks have nothing to do).
    rank = dist_info().rank
    if rank != 0:
        if scorer.kind == "array":
            _gather_inputs(cfg, needs, source, target, device, enc_file)
        return ScoreSummary(cfg.source, name, 0, source.num_samples, time.perf_counter() - t0, {}, rank)
    # Locked from the start: a second run writing the same scores is refused at once, not
    # after it has embedded (and a streaming scorer's work store is this run's until removed below).
    scored_ds = target if cfg.candidates == "target-train" else source
    with atomic.run_lock(scored_ds.root, f"score-{name}"):
        if scorer.kind == "streaming":
            ctx = _stream_context(cfg, name, source, target, device, enc_file)
            scored_ids, result = scorer.fn(ctx, seed=cfg.seed, **cfg_params)
            result = result if isinstance(result, ScoreResult) else ScoreResult(np.asarray(result, np.float32))
            enc_info = None if enc_file is None else {"path": _encoder_name(cfg.encoder), "tag": enc_file.get("tag"),
                                                      "arch": enc_file.get("arch")}
        else:
            inputs, scored_ds, scored_ids, enc_info = _gather_inputs(cfg, needs, source, target, device, enc_file)
            result = run_scorer(scorer.name, inputs, seed=cfg.seed, **cfg_params)
        params = {**params, **chosen}
        full = np.full(scored_ds.num_samples, np.nan, dtype=np.float32)
        full[scored_ids] = result.scores
        crash_point("score.solved")
        attrs = {
            "method": cfg.method,
            "params": _jsonable(params),
            "seed": cfg.seed,
            "candidates": cfg.candidates,
            "encoder": enc_info,
            "source_fingerprint": source.fingerprint,
            "target": None if target is None else {"root": str(target.root), "fingerprint": target.fingerprint},
            "filterx_version": filterx.__version__,
            "result": _jsonable(dict(result.attrs)),
        }
        write_scores(scored_ds, name, full, attrs)
        atomic.remove(work_path(scored_ds, name))  # the final scores supersede any work toward them
        for table, rows in result.tables.items():
            write_table(scored_ds.root / "reports" / f"scores-{name}-{table}.csv", rows)
    # scored: the candidates given a score (a scorer may leave some NaN: grad-align's unaligned ones)
    return ScoreSummary(scored_ds.root, name, int(np.isfinite(result.scores).sum()), scored_ds.num_samples,
                        time.perf_counter() - t0, dict(result.attrs))


def _gather_inputs(cfg: ScoreConfig, needs: set, source: Dataset, target: Dataset | None, device: str,
                   enc_file: dict | None):
    """Load what the scorer needs; returns (inputs, dataset scored, its scored ids, encoder info)."""
    from filterx.models.encoder import encoder_target_split
    from filterx.stages.embed import ensure_embeddings, read_embeddings

    enc_info = None
    emb_kwargs = dict(device=device, backend=cfg.backend, batch_size=cfg.batch_size, workers=cfg.workers,
                      quiet=cfg.quiet, runner=cfg.runner, address=cfg.address, actors=cfg.actors)
    if cfg.runner == "ray":  # the actors' device follows the cluster's GPUs, not this node's
        emb_kwargs["device"] = cfg.device
    arrays: dict[str, Any] = {}
    train_ids = val_ids = source_ids = None
    if cfg.encoder is not None and needs & _EMB_INPUTS:
        info = enc_file
        enc_info = {"path": _encoder_name(cfg.encoder), "tag": info.get("tag"), "arch": info.get("arch")}
        if "head_weight" in needs:
            arrays["head_weight"] = info["state_dict"]["fc.weight"].float().numpy()
            arrays["head_bias"] = info["state_dict"]["fc.bias"].float().numpy()
        if target is not None:
            train_ids, val_ids = encoder_target_split(target, info)
            if info.get("target", {}).get("fingerprint") not in (None, target.fingerprint):
                log.warning("encoder %s was trained on another target (%s), not %s",
                            cfg.encoder, info["target"].get("root"), target.root)
            tag = ensure_embeddings(target.root, Path(cfg.encoder), info.get("tag"), **emb_kwargs)
            t_emb = read_embeddings(target, tag)
            # images embed could not decode have NaN rows: they take part in nothing
            train_ids, val_ids = _decoded(t_emb, train_ids, target), _decoded(t_emb, val_ids, target)
            arrays["target_emb"], arrays["target_val_emb"] = t_emb[train_ids], t_emb[val_ids]
        if cfg.candidates == "source" and "source_emb" in needs:
            tag = ensure_embeddings(source.root, Path(cfg.encoder), info.get("tag"), **emb_kwargs)
            arrays["source_emb"], source_ids = _pool_embeddings(source, tag)
    if target is not None:
        if train_ids is None:
            train_ids, val_ids = np.flatnonzero(target.labels >= 0), np.zeros(0, dtype=np.int64)
        arrays["target_labels"] = target.labels[train_ids]
        arrays["target_val_labels"] = target.labels[val_ids]
    if cfg.candidates == "target-train":
        scored_ds, scored_ids = target, train_ids
        if "target_emb" in arrays:
            arrays["source_emb"] = arrays["target_emb"]
        arrays["source_labels"] = target.labels[train_ids]
        arrays["source_classes"] = target.classes
    else:
        scored_ds, scored_ids = source, (np.arange(source.num_samples) if source_ids is None else source_ids)
        arrays["source_labels"] = source.labels[scored_ids]
        arrays["source_classes"] = source.classes
    inputs = ScoreInputs(num_source=len(scored_ids), device=device, candidates=cfg.candidates,
                         **{k: v for k, v in arrays.items() if k in ScoreInputs.__dataclass_fields__})
    return inputs, scored_ds, scored_ids, enc_info


def _stream_context(cfg: ScoreConfig, name: str, source: Dataset, target: Dataset, device: str,
                    enc_file: dict | None) -> StreamContext:
    """A streaming scorer's view of this run; pool runs get a work store to resume from,
    keyed by the facts of the run this stage knows (the scorer adds its own)."""
    import torch

    from filterx.decode.loader import resolve_backend

    work, key = None, {}
    if cfg.candidates == "source":
        ensure_scores_root(source)  # before the work store inside it: creating the root replaces the folder
        work = work_path(source, name)
        key = {"source_fingerprint": source.fingerprint, "target_fingerprint": target.fingerprint,
               "encoder_tag": (enc_file or {}).get("tag"), "seed": cfg.seed, "backend": resolve_backend(cfg.backend),
               "device": torch.device(device).type, "filterx_version": filterx.__version__}
    return StreamContext(source, target, cfg.candidates, cfg.encoder, device=device, backend=cfg.backend,
                         batch_size=cfg.batch_size, workers=cfg.workers, quiet=cfg.quiet, work=work, key=key)


def _encoder_name(encoder) -> str:
    """What the score attrs call the encoder: a file's absolute path, or a backbone spec as given."""
    from filterx.models.backbones import looks_like_spec

    return str(encoder) if looks_like_spec(encoder) else str(Path(encoder).resolve())


def _recorded_weight_decay(info: dict) -> float | None:
    """The L2 weight decay an encoder file's head was trained with, when the file records it."""
    value = (info.get("config") or {}).get("weight_decay")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _pool_embeddings(ds: Dataset, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """((n, D) embeddings in the store's dtype (float16), (n,) their ids): the decoded rows of
    the pool, read shard by shard into one array, undecodable (NaN) rows squeezed out in place.

    Peak memory is the store's size plus one shard: no float32 copy of the pool, no second
    copy for the NaN filter (1.28M x 512 is 1.25 GiB as stored, 2.5 GiB more per copy).
    Scorers read it in row blocks (filterx.math.blocks)."""
    from filterx.io import rowstore
    from filterx.math.blocks import compact_rows, finite_rows
    from filterx.stages.embed import embeddings_complete

    path = ds.embeddings_path(tag)
    if not embeddings_complete(ds, tag):
        raise ValueError(f"embeddings {path} are missing or incomplete; run: filterx embed {ds.root} --encoder ...")
    emb = rowstore.read_rows(path, "emb")
    ok = finite_rows(emb)
    if ok.all():
        return emb, np.arange(ds.num_samples)
    log.warning("%d samples of %s could not be decoded by embed (listed in its embeddings' .bad dir); "
                "they are left out and score NaN", int((~ok).sum()), ds.root)
    return compact_rows(emb, ok), np.flatnonzero(ok)


def _decoded(emb: np.ndarray, ids: np.ndarray, ds: Dataset) -> np.ndarray:
    """``ids`` without the samples whose embedding is NaN (embed could not decode them)."""
    ok = np.isfinite(emb[ids]).all(axis=1)
    if not ok.all():
        log.warning("%d samples of %s could not be decoded by embed (listed in its embeddings' .bad dir); "
                    "they are left out and score NaN", int((~ok).sum()), ds.root)
    return ids[ok]


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
