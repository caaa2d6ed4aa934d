"""Layer 1, right above ``core``: runners map a stage's units of work over workers
(:mod:`filterx.runners.base` has the seam).

    local      this process, or a pool of processes where the stage asks for one
    torchrun   the ranks torchrun started share the units round-robin
    ray        a Ray cluster: one task per unit on actors that hold the stage's model

A new runner is one module with a ``Runner`` subclass plus a line in ``RUNNERS``.
"""

from __future__ import annotations

from filterx.runners.base import Runner, Work, no_tick

RUNNERS = ("local", "torchrun", "ray")

__all__ = ["RUNNERS", "Runner", "Work", "get_runner", "list_runners", "no_tick"]


def list_runners() -> list[str]:
    return list(RUNNERS)


def get_runner(name: str | None = None, address: str | None = None, workers: int = 0) -> Runner:
    """The runner called ``name``; None: ``torchrun`` when this process was started by torchrun
    with more than one rank, else ``local``.

    address: Ray only, the cluster to join ("auto": the one ``ray start`` made on this node;
    None: a new one on this machine). workers: Ray only, how many actors (0: as many as the
    cluster has room for).
    """
    from filterx.core.runtime import dist_info

    ranks = dist_info().world_size
    if name is None:
        name = "torchrun" if ranks > 1 else "local"
    if name not in RUNNERS:
        raise ValueError(f"unknown runner {name!r}; valid: {', '.join(RUNNERS)}")
    if name != "ray" and address is not None:
        raise ValueError(f"--address {address} names a Ray cluster; add --runner ray")
    if name != "torchrun" and ranks > 1:
        raise ValueError(f"--runner {name} was asked for inside torchrun ({ranks} ranks), where every rank would "
                         "do every unit; use --runner torchrun or start it without torchrun")
    if name == "local":
        return Runner()
    if name == "torchrun":
        from filterx.runners.torchrun import TorchrunRunner

        return TorchrunRunner()
    from filterx.runners.ray_runner import RayRunner

    return RayRunner(address, workers)
