"""Crash injection, for the tests that prove every writing stage survives a kill.

``FILTERX_CRASH_AT=<point>:<n>[,<point>:<n>...]`` makes the process exit at once, with status
``CRASH_EXIT`` and no clean-up (``os._exit``, as ``kill -9`` would), the ``n``-th time it passes
``crash_point(<point>)``. Points name a moment between two durable writes:

    commit          an atomic output is fully written under its temporary name, not yet renamed
    shard.tar       shard: a tar and its index are written
    embed.shard     embed: a shard's rows and done flag are written
    score.solved    score: the scorer has computed, nothing stored yet
    influence.shard score --params last-block: a shard's scores are stored in the work dir
    domain.shard    score --method domain-cls --on pixels: a shard's scores are stored in the work dir
    select.tar      select --format wds: a tar of the subset is written
    report.plot     report: a plot is written
    train.step      pretrain/finetune: an optimiser step is taken (mid-epoch)
    train.epoch     pretrain/finetune: an epoch's checkpoint is saved
    runner.unit     a runner has a unit's result (in the driver: on Ray a worker's outputs are
                    written, and the driver dies with its actors)

Without the variable ``crash_point`` costs one dict lookup.
"""

from __future__ import annotations

import logging
import os

ENV = "FILTERX_CRASH_AT"
CRASH_EXIT = 75
POINTS = ("commit", "shard.tar", "embed.shard", "score.solved", "influence.shard", "domain.shard", "select.tar",
          "report.plot", "train.step", "train.epoch", "runner.unit")

_passed: dict[str, int] = {}


def parse(spec: str) -> dict[str, int]:
    """``"embed.shard:2,commit:1"`` -> ``{"embed.shard": 2, "commit": 1}``; errors name the valid points."""
    plan = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, n = item.partition(":")
        if point not in POINTS:
            raise ValueError(f"{ENV}: unknown crash point {point!r}; valid: {', '.join(POINTS)}")
        try:
            plan[point] = int(n or 1)
        except ValueError:
            raise ValueError(f"{ENV}: {item!r} is not POINT:N") from None
    return plan


def crash_point(point: str) -> None:
    """Exit now, as a kill would, if this is the n-th pass of ``point`` that ``FILTERX_CRASH_AT`` names."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want = parse(spec).get(point)
    if want is None:
        return
    _passed[point] = _passed.get(point, 0) + 1
    if _passed[point] == want:
        logging.shutdown()
        os._exit(CRASH_EXIT)
