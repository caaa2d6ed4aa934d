"""Influence over the encoder's last block + head (``--params last-block``), from pixels.

The ResNet is cut into a frozen trunk (stem, layer1-3) and the part influence is taken over
(layer4, pooling, fc). Trunk features of the target's training and validation splits are
computed once and kept in memory (the target is small); the pool streams through the
loader, batch by batch, trunk then ``last_block_influence_scores``, so memory stays bounded
whatever the pool size.

Registered as the streaming scorer ``influence/last-block``, the variant of ``influence`` that
``--params last-block`` chooses (:func:`last_block_scores`, called with a StreamContext).

The pool pass is resumable. With ``work`` (a ``filterx.io.rowstore`` work store, which
``filterx.stages.score`` keeps at DATASET/scores.zarr/.work-<name>), s_test is stored once solved and
each shard's scores as soon as the shard is scored (rows, then its done flag); a run killed
part-way re-solves nothing and scores only the shards not done. The store is keyed by
everything the scores depend on; one made with another key is discarded, not reused.
Compute batches are fixed by the dataset alone (``shard_aligned_batches``), so a resumed run
gives bit-identical scores to an uninterrupted one on the same machine and thread count.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from filterx.io import rowstore
from filterx.io.dataset import Dataset
from filterx.models.archs import get_head
from filterx.models.encoder import Encoder
from filterx.core.faults import crash_point
from filterx.math.ihvp import SolverOptions
from filterx.math.influence_block import last_block_batch_scorer, last_block_influence_scores, last_block_s_test
from filterx.decode.loader import Batch, LoaderConfig, load_batches
from filterx.core.progress import progress
from filterx.scorers import ScoreResult, StreamContext, register_scorer
from filterx.scorers.influence import ENCODER_WEIGHT_DECAY, INFLUENCE_OPTIONS, RANKS, check_label_mode

log = logging.getLogger("filterx.math.influence")
TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")


def split_resnet(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Linear]:
    """(trunk, block, head) of a torchvision ResNet sharing its weights; all in eval mode. The
    head is the model's registered one (:func:`filterx.models.archs.get_head`, the one split
    every trainer and encoder uses); the backbone is cut once more before its last stage."""
    trunk = nn.Sequential(*[getattr(model, n) for n in TRUNK]).eval()
    block = nn.Sequential(model.layer4, model.avgpool, nn.Flatten(1)).eval()
    return trunk, block, get_head(model).eval()


def _trunk_features(trunk, tars, cfg: LoaderConfig, ids=None, quiet=True):
    """(ids, trunk features, labels) of the given samples, as CPU tensors ordered by id."""
    out_ids, feats, labels = [], [], []
    with torch.inference_mode():
        for b in load_batches(tars, cfg, ids=ids):
            out_ids.append(b.ids)
            feats.append(trunk(b.images).float().cpu())
            labels.append(b.labels)
    ids_t = torch.cat(out_ids)
    order = ids_t.argsort()
    return ids_t[order], torch.cat(feats)[order], torch.cat(labels)[order]


def shard_aligned_batches(batches: Iterable[Batch], shard_starts: np.ndarray,
                          block: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Regroup loader batches into (ids (B,) int64, images (B, 3, R, R)) compute batches fixed
    by the dataset alone: the samples ``starts[s] + [k * block, (k + 1) * block)`` of shard
    ``s``, in id order, cut at the shard's end.

    Why: convolution and GEMM kernels are picked by batch size, so a sample's scores can
    differ in the last bits with the batch it was computed in; loader batches depend on
    which shards are read (a resumed run reads fewer) and on how workers interleave. Holds
    only the partly-filled blocks (about workers x batch size images).
    """
    starts = np.asarray(shard_starts, dtype=np.int64)
    pending: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
    for b in batches:
        ids = b.ids.numpy()
        shard = np.searchsorted(starts, ids, side="right") - 1
        for j, (i, s) in enumerate(zip(ids.tolist(), shard.tolist())):
            k = (i - int(starts[s])) // block
            got = pending.setdefault((s, k), {})
            got[i] = b.images[j]
            lo = int(starts[s]) + k * block
            hi = min(lo + block, int(starts[s + 1]))
            if len(got) == hi - lo:
                del pending[(s, k)]
                yield np.arange(lo, hi, dtype=np.int64), torch.stack([got[x] for x in range(lo, hi)])
    if pending:
        missing = sorted(int(s) for s, _ in pending)
        raise RuntimeError(f"shards {missing} were not read completely")


def _solve(trunk, block, head, target: Dataset, train_ids, val_ids, cfg: LoaderConfig, *, options,
           val_classes, curvature, device):
    """(InverseHVPResult, target training trunk features, their labels) from the target's splits."""
    _, tr_f, tr_y = _trunk_features(trunk, target.tar_paths(), cfg, ids=train_ids)
    _, va_f, va_y = _trunk_features(trunk, target.tar_paths(), cfg, ids=val_ids)
    bs = cfg.batch_size
    train = [(tr_f[i : i + bs], tr_y[i : i + bs]) for i in range(0, len(tr_y), bs)]
    val = [(va_f[i : i + bs], va_y[i : i + bs]) for i in range(0, len(va_y), bs)]
    result = last_block_s_test(block, head, train, val, val_classes=val_classes, options=options,
                               curvature=curvature, device=device)
    log.info("last-block influence solve: %s", result.summary())
    return result, tr_f, tr_y


def last_block_influence(source: Dataset, target: Dataset, enc: Encoder, *, train_ids: np.ndarray,
                         val_ids: np.ndarray, options: SolverOptions, labels: str = "pseudo",
                         candidates: str = "source", val_classes=None, curvature: str = "gauss-newton",
                         backend: str = "auto", device: str = "cpu", batch_size: int = 64, workers: int = 2,
                         quiet: bool = False, work: Path | None = None,
                         work_key: Mapping | None = None) -> tuple[np.ndarray, ScoreResult]:
    """(scored ids, ScoreResult) of last-block influence for the pool or the target's training split.

    ``curvature`` defaults to Gauss-Newton: the true Hessian of a trained block is seldom
    positive definite, which CG cannot solve; Gauss-Newton is, and agrees with it at a minimum.
    ``work`` (pool only): the work store that makes the pool pass resumable (module
    docstring), keyed by ``work_key`` (JSON-able: everything the scores depend on). The caller
    holds a lock on it and removes it once the final scores are stored. The result's attrs
    add ``shards_scored`` (this run) and ``shards_reused`` (found done) to the solve's.
    """
    if len(val_ids) == 0:
        raise ValueError("last-block influence needs the target's held-out split; train the encoder "
                         "on this target (train-encoder keeps 10% aside)")
    if candidates == "source" and labels == "given":
        raise ValueError("--labels given needs target-class labels; for the pool use --labels pseudo")
    trunk, block, head = split_resnet(enc.model)
    # The target's splits are id subsets, which DALI cannot read: "auto" resolves to
    # torchvision for them, and an explicit dali is used for the pool only.
    cfg = LoaderConfig(resolution=enc.resolution, backend="auto" if backend == "dali" else backend,
                       device=device, batch_size=batch_size, workers=workers,
                       mean=tuple(enc.info["mean"]), std=tuple(enc.info["std"]))
    solve_kw = dict(options=options, val_classes=val_classes, curvature=curvature, device=device)
    if candidates == "target-train":
        result, tr_f, tr_y = _solve(trunk, block, head, target, train_ids, val_ids, cfg, **solve_kw)
        given = tr_y if labels == "given" else None
        scores = last_block_influence_scores(block, head, result.s_test, tr_f, labels=given,
                                             batch_size=batch_size, device=device)
        return np.asarray(train_ids), ScoreResult(scores, attrs=result.summary())

    layout = rowstore.RowLayout("scores", (), "float32", tuple(source.shard_counts), source.fingerprint,
                                dict(work_key or {}))
    store = None if work is None else rowstore.open_rows(work, layout, on_mismatch="discard")
    if store is None:
        result, _, _ = _solve(trunk, block, head, target, train_ids, val_ids, cfg, **solve_kw)
        s_test, solve = result.s_test, result.summary()
        if work is not None:
            rowstore.create(work, layout, arrays={"s_test": s_test.cpu().numpy()}, extra_attrs={"solve": solve})
            store = rowstore.open_rows(work, layout)
    else:
        log.info("last-block influence: reusing the solve stored in %s", work)
    if store is not None:  # one path for a fresh and a resumed run: s_test as stored
        s_test, solve = torch.from_numpy(store.array("s_test")).to(device), store.attrs["solve"]
    todo = list(range(source.num_shards)) if store is None else store.undone()
    reused = source.num_shards - len(todo)
    if reused:
        log.info("last-block influence: %d of %d shards already scored in %s; scoring the other %d",
                 reused, source.num_shards, work, len(todo))
    block_scorer = last_block_batch_scorer(block, head, s_test, device=device) if todo else None

    def score_batch(ids, images):
        with torch.inference_mode():
            f = trunk(images).float()
        return block_scorer(f.clone())  # leave inference mode: the block needs autograd-capable inputs

    scores = score_pool_shards(source, todo, store, lambda: load_batches(source.tar_paths(todo),
                                                                         replace(cfg, backend=backend)),
                               batch_size, score_batch, desc="influence (last block)",
                               after_shard=lambda s: crash_point("influence.shard"),
                               quiet=quiet)
    attrs = {"shards_scored": len(todo), "shards_reused": reused, **solve}
    return np.arange(source.num_samples), ScoreResult(scores, attrs=attrs)


def score_pool_shards(source: Dataset, todo: list[int], store, batches, block: int, score_batch, *, desc: str,
                      after_shard, quiet: bool) -> np.ndarray:
    """(N,) float32 scores of the pool: the shards ``todo`` scored by ``score_batch(ids, images)``
    in compute batches fixed by the dataset (:func:`shard_aligned_batches` of ``block``); with a
    work ``store`` each finished shard is stored at once (rows, then its done flag, then
    ``after_shard(shard)``: the scorer's crash point) and the result is the store's rows, shards done earlier included.
    ``batches()`` makes the loader's batches over ``todo``; called only when there is work."""
    scores = np.full(source.num_samples, np.nan, dtype=np.float32)
    collector = None if store is None else store.collector(todo, after_shard=after_shard)
    if todo:
        bar = progress(total=int(sum(source.shard_counts[s] for s in todo)), desc=desc, quiet=quiet)
        for ids, images in shard_aligned_batches(batches(), source.shard_starts, block):
            s = score_batch(ids, images)
            if collector is None:
                scores[ids] = s
            else:
                collector.add(ids, s)
            bar.update(len(ids))
        bar.close()
    if store is not None:
        if collector.unfinished():
            raise RuntimeError(f"shards {collector.unfinished()} were not read completely; re-run score")
        scores = store.rows()
    return scores


_SOLVER_KEYS = ("solver", "damping", "weight_decay", "cg_tol", "cg_max_iter", "lissa_scale", "lissa_depth",
                "lissa_repeats", "lissa_batch_size")


@register_scorer(
    "influence/last-block", kind="streaming", variant_of="influence", choose_by=("params", "last-block"),
    needs=("target_labels", "target_val_labels", "head_weight", "head_bias"), check=check_label_mode,
    options={k: v for k, v in INFLUENCE_OPTIONS.items() if k != "params"},
)
def last_block_scores(
    ctx: StreamContext,
    *,
    seed: int,
    solver: str = "cg",
    damping: float = 0.01,
    weight_decay: float = ENCODER_WEIGHT_DECAY,
    labels: str = "pseudo",
    val_classes: Sequence[int] | None = None,
    cg_tol: float = 1e-6,
    cg_max_iter: int = 1000,
    lissa_scale: float | None = None,
    lissa_depth: int = 5000,
    lissa_repeats: int = 1,
    lissa_batch_size: int = 256,
    curvature: str = "gauss-newton",
) -> tuple[np.ndarray, ScoreResult]:
    """Influence over the encoder's last block and head, from pixels (parameters as influence's;
    curvature: "gauss-newton" or "hessian" for the block's solve)."""
    from filterx.models.encoder import encoder_target_split, load_encoder

    params = dict(solver=solver, damping=damping, weight_decay=weight_decay, labels=labels, val_classes=val_classes,
                  cg_tol=cg_tol, cg_max_iter=cg_max_iter, lissa_scale=lissa_scale, lissa_depth=lissa_depth,
                  lissa_repeats=lissa_repeats, lissa_batch_size=lissa_batch_size, curvature=curvature)
    enc = load_encoder(ctx.encoder, ctx.device)
    train_ids, val_ids = encoder_target_split(ctx.target, enc.info)
    options = SolverOptions(seed=seed, **{k: params[k] for k in _SOLVER_KEYS})
    batch_size = min(ctx.batch_size, 64)
    work_key = None
    if ctx.work is not None:
        split = hashlib.sha256(np.asarray(train_ids, np.int64).tobytes() + b"|"
                               + np.asarray(val_ids, np.int64).tobytes())
        # the decode backend and the device type change the last bits, and the compute batch size
        # which samples share a kernel call; the loader's workers do not (shard_aligned_batches)
        work_key = json.loads(json.dumps({
            **ctx.key, "target_split": split.hexdigest()[:16], "params": params, "solver_options": asdict(options),
            "batch_size": batch_size}, default=str))
    ids, result = last_block_influence(
        ctx.source, ctx.target, enc, train_ids=train_ids, val_ids=val_ids, options=options, labels=labels,
        candidates=ctx.candidates, val_classes=None if val_classes is None else tuple(val_classes),
        curvature=curvature, backend=ctx.backend, device=ctx.device, batch_size=batch_size, workers=ctx.workers,
        quiet=ctx.quiet, work=ctx.work, work_key=work_key)
    return ids, replace(result, attrs={**result.attrs, "ranks": RANKS[labels]})
