"""Held-out accuracy, one function for every trainer: :func:`evaluate` reads batches of (images,
labels, sample ids), from the loader (:func:`loader_batches`: pretrain, finetune) or from images
decoded into memory (:func:`tensor_batches`: train-encoder)."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from filterx.core import collectives
from filterx.decode.loader import LoaderConfig, load_batches
from filterx.train.data import TrainingData
from filterx.train.runtime import Runtime, autocast, to_input

# (images (B, 3, H, W) float, normalised; labels (B,) int64, -1 unlabelled; sample ids (B,) int64)
EvalBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) bool: the label is among the ``k`` highest logits (k capped at the class count)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1)


def center_crop(images: torch.Tensor, out_size: int) -> torch.Tensor:
    """Center crop of a uint8 batch whose short side is ``out_size / 0.875``, as float."""
    import torchvision.transforms.v2.functional as TF

    return TF.center_crop(images, [out_size, out_size]).float()


def loader_batches(data: TrainingData, *, resolution: int, backend: str, batch_size: int, workers: int,
                   rt: Runtime) -> Iterator[EvalBatch]:
    """Center crops of the samples of ``data`` this rank reads (the loader pads the ranks' shares
    to the same length; :func:`evaluate` drops the padding by sample id)."""
    cfg = LoaderConfig(resolution=resolution, backend=backend, device=rt.device, batch_size=batch_size,
                       workers=workers, train=False, shuffle=False)
    for b in load_batches(data.tars, cfg, rank=rt.rank, world_size=rt.world_size, ids=data.ids):
        yield b.images, b.labels, b.ids


def tensor_batches(images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, *, resolution: int,
                   mean: torch.Tensor, std: torch.Tensor, device: str, batch_size: int = 256) -> Iterator[EvalBatch]:
    """Center crops of uint8 ``images`` (N, 3, S, S) held in memory, normalised on ``device`` with
    ``mean`` / ``std`` (1, 3, 1, 1) there; ``labels`` and ``ids`` (N,) int64."""
    for i in range(0, len(labels), batch_size):
        x = (center_crop(images[i : i + batch_size], resolution).to(device) - mean) / std
        yield x, labels[i : i + batch_size], ids[i : i + batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[EvalBatch], rt: Runtime, *, num_classes: int,
             prefix: str = "val", attack: Callable | None = None) -> dict:
    """Top-1 (and top-5 with >= 5 classes) accuracy and mean loss of ``model`` over the
    labelled samples of ``batches`` (this rank's share); exact under DDP (each sample id
    counts once, so the loader's padding is dropped). With ``attack`` (``attack(model, x, y) ->
    x_adv``, e.g. :class:`filterx.train.adversarial.Attack`) also the top-1 and loss on the
    attacked images (``{prefix}_robust_top1``, ``{prefix}_robust_loss``). NaN metrics and count
    0 when there is no labelled sample."""
    was_training = model.training
    model.eval()
    ids, top1, top5, losses, robust_top1, robust_losses = [], [], [], [], [], []
    for images, labels, batch_ids in batches:
        x = to_input(images, rt)
        with autocast(rt):
            logits = model(x).float()
        y = labels.to(logits.device)
        keep = y >= 0
        logits, y = logits[keep], y[keep]
        ids.append(batch_ids[keep.cpu()].numpy())
        top1.append(topk_correct(logits, y, 1).cpu().numpy())
        top5.append(topk_correct(logits, y, 5).cpu().numpy())
        losses.append(F.cross_entropy(logits, y, reduction="none").cpu().numpy())
        if attack is not None:
            x_adv = attack(model, x[keep], y)  # grad-enabled inside; the model stays in eval mode
            with autocast(rt):
                adv_logits = model(x_adv).float()
            robust_top1.append(topk_correct(adv_logits, y, 1).cpu().numpy())
            robust_losses.append(F.cross_entropy(adv_logits, y, reduction="none").cpu().numpy())
    model.train(was_training)
    parts = [np.concatenate(a) if a else np.zeros(0)
             for a in (ids, top1, top5, losses, robust_top1, robust_losses)]
    if rt.world_size > 1:
        gathered = collectives.all_gather_object(parts)
        parts = [np.concatenate([g[i] for g in gathered]) for i in range(len(parts))]
    ids_all, first = np.unique(parts[0].astype(np.int64), return_index=True)
    n = len(ids_all)
    out = {f"{prefix}_top1": float(parts[1][first].mean()) if n else float("nan"),
           f"{prefix}_loss": float(parts[3][first].mean()) if n else float("nan"),
           f"{prefix}_count": n}
    if num_classes >= 5:
        out[f"{prefix}_top5"] = float(parts[2][first].mean()) if n else float("nan")
    if attack is not None:
        out[f"{prefix}_robust_top1"] = float(parts[4][first].mean()) if n else float("nan")
        out[f"{prefix}_robust_loss"] = float(parts[5][first].mean()) if n else float("nan")
    return out
