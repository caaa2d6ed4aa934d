"""Every collective filterx issues, on the device the process group serves.

NCCL reduces CUDA tensors only ("No backend type associated with device type cpu" for a CPU
tensor); gloo serves CPU tensors. Callers hand in tensors wherever they are: each function
copies them to :func:`group_device` before the collective and returns the result on the
caller's device. Outside a process group (one process) every function is a local no-op, so
the same code runs under ``torchrun`` and without it.

    total = all_reduce_sum(torch.stack([loss_sum, count]))   # same device as the input
    parts = all_gather_object(my_ids)                       # a list, one entry per rank
    keys = all_gather_cat(my_keys)                          # (B x ranks, d), rank order
    barrier()
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """A process group of two or more ranks is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def group_device() -> torch.device:
    """The device the default group's collectives take tensors on: this rank's CUDA device
    under NCCL (``torch.cuda.set_device`` was called by ``init_distributed``), else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``t`` on ``device`` (the one transfer the collectives make; a copy, so that the
    in-place collective never writes into the caller's tensor)."""
    return t.detach().to(device, copy=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over all ranks, on ``t``'s device (a copy; ``t`` is left
    as it is). Same shape and dtype on every rank."""
    if not is_distributed():
        return t.detach().clone()
    buf = move(t, group_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return move(buf, t.device)


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order, on ``t``'s device (``t``
    itself for one process). Every rank must give the same shape and dtype; no gradient."""
    if not is_distributed():
        return t
    buf = move(t, group_device()).contiguous()
    parts = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, buf)
    return move(torch.cat(parts), t.device)


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; ``[obj]`` for one process).
    torch stages the pickles on the current CUDA device under NCCL by itself."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait for every rank; under NCCL on this rank's CUDA device (without ``device_ids`` torch
    has to guess which device the barrier's tensor goes to, and warns)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
