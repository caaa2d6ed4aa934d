"""A training run's files: checkpoints (model, optimizer, scheduler, RNG states, history),
resumption with the settings checked, and the metrics log.

Output directory (written by rank 0, atomically):

    checkpoint.pt    the full state after the latest epoch (resume reads it)
    epoch_NNNN.pt    the same, kept every ``save_every`` epochs when asked
    metrics.jsonl    one JSON line per epoch (loss, top-1/top-5, lr, img/s, ...)
    model.pt         the final weights with arch, classes and metrics (what finetune reads)
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from filterx.core.runtime import load_marked_dict
from filterx.decode.loader import IMAGENET_MEAN, IMAGENET_STD
from filterx.io import atomic

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
MODEL = "model.pt"
CHECKPOINT_FORMAT = 1


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def config_dict(cfg) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()}


def save_checkpoint(path: Path, payload: dict) -> None:
    with atomic.atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """A filterx checkpoint / model file (pretrain or finetune); clear errors for other files."""
    return load_marked_dict(path, "filterx_checkpoint", CHECKPOINT_FORMAT, "checkpoint",
                            "filterx pretrain / finetune")


def resume_from(out: Path, resume: bool, settings: dict, soft: tuple[str, ...],
                modules: dict[str, nn.Module | None], opt, sched) -> tuple[int, list[dict]]:
    """(start epoch, history): restore ``out/checkpoint.pt`` into ``modules`` (checkpoint key ->
    module; None entries skipped), the optimizer, scheduler and RNG states when resuming.

    A checkpoint without ``resume`` is refused (no silent overwrite); settings that differ from
    the saved run, other than ``soft`` ones, are refused by name.
    """
    path = out / CHECKPOINT
    if not path.exists():
        return 0, []
    if not resume:
        raise ValueError(f"{out} already holds a training run ({CHECKPOINT}); pass resume=True "
                         "(--resume) to continue it, or choose another output dir")
    saved = load_checkpoint(path)
    check_resumable(saved["settings"], settings, soft, path)
    for key, module in modules.items():
        if module is not None:
            module.load_state_dict(saved[key])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    set_rng_states(saved["rng"])
    return int(saved["epoch"]), list(saved["history"])


def check_resumable(saved: dict, current: dict, soft: tuple[str, ...], path: Path) -> None:
    """Raise ValueError when a resumed run changes a setting that changes its results; warn
    for ``soft`` ones (epochs, workers, device ...)."""
    ignore = {"resume", "quiet", "out"}
    diff = {k: (saved.get(k), v) for k, v in current.items() if k not in ignore and saved.get(k) != v}
    hard = {k: d for k, d in diff.items() if k not in soft}
    if hard:
        changes = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in hard.items())
        raise ValueError(f"cannot resume {path} with other settings ({changes}); "
                         "use the original settings or another output dir")
    for k, (a, b) in diff.items():
        log.warning("resuming %s with %s changed from %r to %r: the result will differ from an "
                    "uninterrupted run", path, k, a, b)


def write_metrics(out: Path, history: list[dict]) -> None:
    atomic.write_text(out / METRICS, "".join(json.dumps(row) + "\n" for row in history))


def load_initial_weights(path: str | Path) -> dict:
    """{arch, num_classes, state_dict, model_kwargs, mean, std} from a pretrain/finetune
    checkpoint or model file, or a train-encoder file; mean / std: the per-channel input
    normalisation (0-1 scale) the weights were trained with, an encoder file's own, ImageNet's
    for the trainer's files (its loader normalises with it)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init checkpoint {str(path)!r} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(payload, dict) and "filterx_encoder" in payload:
        return {"arch": payload["arch"], "num_classes": payload["num_classes"],
                "state_dict": payload["state_dict"], "model_kwargs": dict(payload.get("model_kwargs", {})),
                "mean": tuple(payload.get("mean", IMAGENET_MEAN)), "std": tuple(payload.get("std", IMAGENET_STD))}
    ck = load_checkpoint(path)
    return {"arch": ck["arch"], "num_classes": ck["num_classes"], "state_dict": ck["model"],
            "model_kwargs": ck.get("model_kwargs", {}), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
