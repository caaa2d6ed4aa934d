"""Influence over the encoder's last block + head (``--params last-block``), from pixels.

The ResNet is cut into a frozen trunk (stem, layer1-3) and the part influence is taken over
(layer4, pooling, fc). Trunk features of the target's training and validation splits are
computed once and kept in memory (the target is small); the pool streams through the
loader, batch by batch, trunk then ``last_block_influence_scores``, so memory stays bounded
whatever the pool size.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn

from filterx.dataset import Dataset
from filterx.encoder import Encoder
from filterx.influence import SolverOptions, last_block_influence_scores, last_block_s_test
from filterx.loader import LoaderConfig, load_batches
from filterx.progress import progress
from filterx.scorers import ScoreResult

log = logging.getLogger("filterx.influence")
TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")


def split_resnet(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Linear]:
    """(trunk, block, head) of a torchvision ResNet sharing its weights; all in eval mode."""
    trunk = nn.Sequential(*[getattr(model, n) for n in TRUNK]).eval()
    block = nn.Sequential(model.layer4, model.avgpool, nn.Flatten(1)).eval()
    return trunk, block, model.fc.eval()


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


def last_block_influence(source: Dataset, target: Dataset, enc: Encoder, *, train_ids: np.ndarray,
                         val_ids: np.ndarray, options: SolverOptions, labels: str = "pseudo",
                         candidates: str = "source", val_classes=None, curvature: str = "gauss-newton",
                         backend: str = "auto", device: str = "cpu", batch_size: int = 64, workers: int = 2,
                         quiet: bool = False) -> tuple[np.ndarray, ScoreResult]:
    """(scored ids, ScoreResult) of last-block influence for the pool or the target's training split.

    ``curvature`` defaults to Gauss-Newton: the true Hessian of a trained block is seldom
    positive definite, which CG cannot solve; Gauss-Newton is, and agrees with it at a minimum.
    """
    if len(val_ids) == 0:
        raise ValueError("last-block influence needs the target's held-out split; train the encoder "
                         "on this target (train-encoder keeps 10% aside)")
    trunk, block, head = split_resnet(enc.model)
    # The target's splits are id subsets, which DALI cannot read: "auto" resolves to
    # torchvision for them, and an explicit dali is used for the pool only.
    cfg = LoaderConfig(resolution=enc.resolution, backend="auto" if backend == "dali" else backend,
                       device=device, batch_size=batch_size, workers=workers,
                       mean=tuple(enc.info["mean"]), std=tuple(enc.info["std"]))
    _, tr_f, tr_y = _trunk_features(trunk, target.tar_paths(), cfg, ids=train_ids)
    _, va_f, va_y = _trunk_features(trunk, target.tar_paths(), cfg, ids=val_ids)
    train = [(tr_f[i : i + batch_size], tr_y[i : i + batch_size]) for i in range(0, len(tr_y), batch_size)]
    val = [(va_f[i : i + batch_size], va_y[i : i + batch_size]) for i in range(0, len(va_y), batch_size)]
    result = last_block_s_test(block, head, train, val, val_classes=val_classes, options=options,
                               curvature=curvature, device=device)
    log.info("last-block influence solve: %s", result.summary())
    if candidates == "target-train":
        given = tr_y if labels == "given" else None
        scores = last_block_influence_scores(block, head, result.s_test, tr_f, labels=given,
                                             batch_size=batch_size, device=device)
        return np.asarray(train_ids), ScoreResult(scores, attrs=result.summary())
    if labels == "given":
        raise ValueError("--labels given needs target-class labels; for the pool use --labels pseudo")
    scores = np.full(source.num_samples, np.nan, dtype=np.float32)
    pool_cfg = replace(cfg, backend=backend)
    bar = progress(total=source.num_samples, desc="influence (last block)", quiet=quiet)
    for b in load_batches(source.tar_paths(), pool_cfg):
        with torch.inference_mode():
            f = trunk(b.images).float()
        f = f.clone()  # leave inference mode: the block needs autograd-capable inputs
        scores[b.ids.numpy()] = last_block_influence_scores(block, head, result.s_test, f, labels=None,
                                                            batch_size=batch_size, device=device)
        bar.update(len(b.ids))
    bar.close()
    return np.arange(source.num_samples), ScoreResult(scores, attrs=result.summary())
