"""Devices, the torchrun environment, seeding, and reading the torch files filterx writes."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu". Raises ValueError for bad names."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked for but no CUDA device is visible; use cpu or auto")
        return device
    raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a torchrun job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Read the torchrun environment only (RANK, WORLD_SIZE, LOCAL_RANK)."""
    return DistInfo(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed(device: str) -> DistInfo:
    """Initialise torch.distributed from torchrun's environment when there is more than one rank.

    NCCL on CUDA, gloo on the CPU. Returns the rank info (a no-op for a single process).
    """
    import torch
    import torch.distributed as dist

    info = dist_info()
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
    return info


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def load_marked_dict(path: str | Path, marker: str, version: int, what: str, made_by: str,
                     missing_hint: str = "") -> dict:
    """The dict filterx saved at ``path`` with ``torch.save`` (on the CPU), checked to carry
    ``{marker: version}``; FileNotFoundError / ValueError naming the file otherwise.

    what: the kind of file for messages ("checkpoint", "encoder"); made_by: the command that
    makes it; missing_hint: appended to the missing-file message.
    """
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist{missing_hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable {what} file ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get(marker) != version:
        raise ValueError(f"{path} is not a filterx {what} file (made by {made_by})")
    return payload
