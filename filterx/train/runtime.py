"""Where a training run computes: the device, the torchrun rank and world size, bf16 autocast and
channels_last on CUDA, DDP wrapping (shared by pretrain, finetune, train-encoder and MoCo)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from filterx.core.runtime import init_distributed, resolve_device


def default_workers() -> int:
    """Decode workers when none are asked for: the cores this process may use, at most 4 (more
    than the cores only makes the DataLoader warn and the workers compete)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


@dataclass(frozen=True)
class Runtime:
    device: str
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this run initialised torch.distributed (and tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def setup_runtime(device: str) -> Runtime:
    """Resolve the device and join the torchrun job, if any (NCCL on CUDA, gloo on the CPU)."""
    import torch.distributed as dist

    device = resolve_device(device)
    was_up = dist.is_available() and dist.is_initialized()
    info = init_distributed(device)
    if device == "cuda":
        device = f"cuda:{info.local_rank}"
    return Runtime(device, info.rank, info.world_size, owns_group=info.world_size > 1 and not was_up)


def teardown_runtime(rt: Runtime) -> None:
    import torch.distributed as dist

    if rt.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def autocast(rt: Runtime):
    """bf16 autocast on CUDA; full float32 on the CPU (bf16 CPU kernels are slower there)."""
    if rt.cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_input(x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    x = x.to(rt.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if rt.cuda else x


def prepare_model(model: nn.Module, rt: Runtime, sync_bn: bool) -> nn.Module:
    """On the device, channels_last on CUDA, SyncBatchNorm across ranks on CUDA when asked
    (torch has no CPU SyncBatchNorm: on the CPU each rank normalises with its own batch)."""
    if sync_bn and rt.world_size > 1 and rt.cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(rt.device)
    return model.to(memory_format=torch.channels_last) if rt.cuda else model


def wrap_ddp(model: nn.Module, rt: Runtime) -> nn.Module:
    if rt.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(rt.device).index] if rt.cuda else None
    return DistributedDataParallel(model, device_ids=ids)
