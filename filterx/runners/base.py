"""The stage/runner seam: what a stage hands a runner (``Work``) and what every runner offers.

A stage knows its units of work (for shard and embed: the shards not done yet, read from its
own store, so resuming after a kill is the stage's business) and builds a ``Work``:

    work = Work("embed source", units=[3, 4, 7], worker=EmbedFactory(job), sizes=[1000, 1000, 1000])
    for i, result in runner.map(work):    # i indexes work.units; results in any order
        ...

``work.worker`` is a picklable factory called once in every worker (this process, a pool
process, a Ray actor); what it returns is called as ``worker(units, tick) -> results``, one
result per unit, and writes the units' outputs itself, atomically (nothing big travels back).
``tick(n)`` reports ``n`` images done as it goes; where the runner cannot see ticks (another
process) the progress line advances by a unit's size when the unit is done.

Runners differ in who does which unit and where; every runner offers the same handful of
calls, so a stage's code is the same under all of them:

    device = runner.start("auto")    # what the workers compute on
    if runner.is_main: prepare()     # rank 0 creates shared outputs ...
    runner.barrier()                 # ... before any other rank opens them
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

from filterx.core.faults import crash_point
from filterx.core.progress import progress

log = logging.getLogger(__name__)


class Worker(Protocol):
    def __call__(self, units: list, tick: Callable[[int], None]) -> list: ...


@dataclass(frozen=True)
class Work:
    """One pass of a stage, for a runner to map.

    desc:       the progress line's label
    units:      picklable descriptions of the units, in order (a shard number, a job record)
    worker:     picklable factory of a Worker, called once per worker
    sizes:      images per unit, for the progress line (default: 1 each)
    processes:  local runner: a pool of this many processes; 1 runs the units in this process
    pool_init:  local runner: run first in each pool process (a fork of this one)
    whole_list: in-process runners hand a worker all of its units in one call (embed decodes
                its shards as one stream); otherwise, and always on Ray, one unit per call
    cpus, gpus: Ray: what one worker holds (an embedding actor: one GPU)
    quiet:      no progress line
    """

    desc: str
    units: Sequence
    worker: Callable[[], Worker]
    sizes: Sequence[int] = ()
    processes: int = 1
    pool_init: Callable[[], None] | None = None
    whole_list: bool = False
    cpus: float = 1
    gpus: float = 0
    quiet: bool = False
    unit_sizes: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self):
        sizes = tuple(int(s) for s in self.sizes) if self.sizes else (1,) * len(self.units)
        if len(sizes) != len(self.units):
            raise ValueError(f"{self.desc}: {len(sizes)} sizes for {len(self.units)} units")
        object.__setattr__(self, "unit_sizes", sizes)


def no_tick(n: int) -> None:
    """The ``tick`` of a worker whose progress the runner counts per finished unit."""


class Runner:
    """One process doing every unit: what ``local`` is, and the base of the others."""

    name = "local"
    rank, world_size = 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def in_process(self) -> bool:
        """Whether workers live in this process (a model loaded here can be handed to them)."""
        return True

    def start(self, device: str) -> str:
        """Get ready to map; returns the device ``device`` ("auto", "cpu", "cuda") means for
        the workers (an exact one, e.g. "cuda:1" for a torchrun rank)."""
        from filterx.core.runtime import resolve_device

        return resolve_device(device)

    def barrier(self) -> None:
        """Wait until every process of this run gets here (one process: at once)."""

    def lock_name(self, what: str) -> str:
        """The run lock this process takes on an output: one per rank where there are ranks."""
        return what if self.world_size == 1 else f"{what}-rank{self.rank}"

    def share(self, units: Sequence) -> list[int]:
        """Indexes of the units this process does (all of them, here)."""
        return list(range(len(units)))

    def map(self, work: Work) -> Iterator[tuple[int, object]]:
        """Do this process's share of ``work.units``; yields (unit index, result) as units end."""
        mine = self.share(work.units)
        bar = progress(total=sum(work.unit_sizes[i] for i in mine), desc=work.desc, quiet=work.quiet)
        try:
            if not mine:
                return
            if work.processes > 1 and len(mine) > 1:
                yield from self._map_pool(work, mine, bar)
            else:
                yield from self._map_here(work, mine, bar)
        finally:
            bar.close()

    def _map_here(self, work: Work, mine: list[int], bar) -> Iterator[tuple[int, object]]:
        worker = work.worker()
        calls = [mine] if work.whole_list else [[i] for i in mine]
        for call in calls:
            ticked = [0]

            def tick(n: int) -> None:
                ticked[0] += n
                bar.update(n)

            results = worker([work.units[i] for i in call], tick)
            if len(results) != len(call):
                raise RuntimeError(f"{work.desc}: a worker gave {len(results)} results for {len(call)} units")
            bar.update(max(0, sum(work.unit_sizes[i] for i in call) - ticked[0]))
            for i, result in zip(call, results):
                crash_point("runner.unit")
                yield i, result

    def _map_pool(self, work: Work, mine: list[int], bar) -> Iterator[tuple[int, object]]:
        from concurrent.futures import ProcessPoolExecutor

        # The stage's pool_init decides what a forked worker must drop (e.g. inherited locks).
        with ProcessPoolExecutor(min(work.processes, len(mine)), initializer=_pool_start,
                                 initargs=(work.pool_init, work.worker)) as pool:
            for i, result in zip(mine, pool.map(_pool_call, [work.units[i] for i in mine])):
                bar.update(work.unit_sizes[i])
                crash_point("runner.unit")
                yield i, result


_POOL_WORKER: Worker | None = None


def _pool_start(pool_init, factory) -> None:
    global _POOL_WORKER
    if pool_init is not None:
        pool_init()
    _POOL_WORKER = factory()


def _pool_call(unit):
    return _POOL_WORKER([unit], no_tick)[0]
