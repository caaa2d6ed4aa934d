"""The ``ray`` runner: one Ray actor task per unit (one shard), on actors that each build the
stage's worker once (an embedding actor loads the model onto its GPU once, then embeds shard
after shard).

Nothing big crosses Ray's object store: a task takes a unit description (a shard number, a
list of file names) and returns a few numbers; the worker reads its shard from the shared
dataset dir and writes its outputs there itself, atomically (a tar; a zarr chunk, then the
shard's done flag). So:

- a killed actor: Ray restarts it (``max_restarts``) and runs its unfinished task again
  (``max_task_retries``); that task redoes its one shard, whose outputs were never half there;
- a killed driver: Ray ends its actors with it; a re-run reads the stage's done marks and
  maps only the units that are not done.

Actors are declared with what they hold (``Work.cpus`` / ``Work.gpus``: one GPU per embedding
actor on GPU nodes); there are as many as the cluster has room for, or ``workers``. Ray is
imported here only, so the rest of filterx runs without it (``pip install "filterx[ray]"``).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Iterator

from filterx.core.faults import crash_point
from filterx.core.progress import progress
from filterx.runners.base import Runner, Work, no_tick

log = logging.getLogger(__name__)

# How often Ray restarts a dead actor and re-runs the task it was doing, before the run fails.
RETRIES = 3


class UnitActor:
    """The body of every actor: builds the worker once, then does one unit per call."""

    def __init__(self, factory, version: str):
        import filterx

        if filterx.__version__ != version:
            raise RuntimeError(f"filterx {filterx.__version__} on {socket.gethostname()}, but the driver runs "
                               f"{version}: install the same filterx on every node")
        self.worker = factory()

    def run(self, unit):
        return self.worker([unit], no_tick)[0]

    def where(self) -> tuple[str, int]:
        """(host name, pid) of this actor's process."""
        return socket.gethostname(), os.getpid()


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError('--runner ray needs Ray on every node: pip install "filterx[ray]"') from None
    return ray


class RayRunner(Runner):
    name = "ray"

    def __init__(self, address: str | None = None, workers: int = 0):
        if workers < 0:
            raise ValueError(f"the number of Ray actors must be >= 0 (0: as the cluster allows), got {workers}")
        self.address, self.workers = address, workers
        self.actors: list = []  # the actors of the map in progress (tests kill one)

    @property
    def in_process(self) -> bool:
        return False

    def start(self, device: str) -> str:
        """Join (or start) the cluster; "auto" means CUDA when the cluster has GPUs."""
        ray = _ray()
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, logging_level=logging.WARNING)
            except ConnectionError as exc:
                raise ValueError(f"no Ray cluster at --address {self.address}: {exc}; start one with "
                                 "`ray start --head` (README: Several machines)") from None
        gpus = ray.cluster_resources().get("GPU", 0)
        if device == "cpu":
            return "cpu"
        if device == "auto":
            return "cuda" if gpus else "cpu"
        if device.startswith("cuda"):
            if not gpus:
                raise ValueError(f"--device {device} was asked for but the Ray cluster has no GPUs; use cpu or auto")
            return "cuda"  # each actor sees its own GPU as cuda:0
        raise ValueError(f"unknown device {device!r}; valid: auto, cpu, cuda")

    def actor_count(self, work: Work) -> int:
        """How many actors to start: ``workers``, or as many as the cluster's CPUs / GPUs hold."""
        ray = _ray()
        biggest = {k: max((n["Resources"].get(k, 0) for n in ray.nodes() if n.get("Alive")), default=0)
                   for k in ("CPU", "GPU")}
        for kind, need in (("CPU", work.cpus), ("GPU", work.gpus)):
            if need > biggest[kind]:
                raise ValueError(f"{work.desc}: an actor needs {need:g} {kind}s (from --workers / --device), "
                                 f"but the largest node of the Ray cluster has {biggest[kind]:g}")
        if self.workers:
            n = self.workers
        else:
            total = ray.cluster_resources()
            n = int(total.get("GPU", 0) // work.gpus) if work.gpus else int(total.get("CPU", 1) // work.cpus)
        return max(1, min(n, len(work.units)))

    def map(self, work: Work) -> Iterator[tuple[int, object]]:
        import filterx

        ray = _ray()
        bar = progress(total=sum(work.unit_sizes), desc=work.desc, quiet=work.quiet)
        if not work.units:
            bar.close()
            return
        # max_concurrency 2: ``where`` answers while ``run`` works (the driver gives an actor one
        # unit at a time, so units never run side by side)
        actor_class = ray.remote(num_cpus=work.cpus, num_gpus=work.gpus, max_restarts=RETRIES,
                                 max_task_retries=RETRIES, max_concurrency=2)(UnitActor)
        self.actors = [actor_class.remote(work.worker, filterx.__version__)
                       for _ in range(self.actor_count(work))]
        try:
            todo = list(range(len(work.units)))[::-1]
            running = {}  # task ref -> (unit index, actor)
            for actor in self.actors:
                if todo:
                    i = todo.pop()
                    running[actor.run.remote(work.units[i])] = (i, actor)
            while running:
                (ref,), _ = ray.wait(list(running), num_returns=1)
                i, actor = running.pop(ref)
                result = self._result(ray, ref, work, i)
                bar.update(work.unit_sizes[i])
                # before the actor is handed its next unit: a test that kills the driver here
                # knows which units are done (none in flight on this actor)
                crash_point("runner.unit")
                if todo:
                    j = todo.pop()
                    running[actor.run.remote(work.units[j])] = (j, actor)
                yield i, result
        finally:
            bar.close()
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []

    @staticmethod
    def _result(ray, ref, work: Work, i: int):
        """A task's result; the stage's own error as it was raised; a clear line for a lost unit."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        except ray.exceptions.RayActorError as exc:
            cause = getattr(exc, "cause", None)
            inner = getattr(cause, "cause", None)  # the worker's own error, raised while it was built
            if isinstance(inner, Exception):
                raise inner from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"{work.desc}: unit {work.units[i]!r} was lost with its Ray actor, which died more "
                               f"than {RETRIES} times ({first}); finished units are kept: re-run") from None
