"""The ``torchrun`` runner: the processes ``torchrun`` started (on one node or many) share the
units round-robin, rank r doing units r, r + world, r + 2 world, ...

Every rank builds the same ``Work`` (the stage reads its units from the shared store), so the
split needs no messages. ``map`` starts with a barrier, so that no rank writes before every
rank has read the units, and ends with one, so that a stage's finish step (rank 0) sees every
rank's outputs. A torchrun of one process is the local runner.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from filterx.runners.base import Runner, Work


class TorchrunRunner(Runner):
    name = "torchrun"

    def __init__(self):
        from filterx.core.runtime import dist_info

        info = dist_info()
        self.rank, self.world_size, self.local_rank = info.rank, info.world_size, info.local_rank

    def start(self, device: str) -> str:
        """Join the process group (gloo on the CPU, NCCL on CUDA, this rank's local GPU)."""
        from filterx.core.runtime import init_distributed, resolve_device

        device = resolve_device(device)
        init_distributed(device)
        if self.world_size > 1 and device.startswith("cuda"):
            device = f"cuda:{self.local_rank}"
        return device

    def barrier(self) -> None:
        from filterx.core import collectives

        collectives.barrier()

    def share(self, units: Sequence) -> list[int]:
        return list(range(len(units)))[self.rank :: self.world_size]

    def map(self, work: Work) -> Iterator[tuple[int, object]]:
        self.barrier()
        yield from super().map(work)
        self.barrier()
