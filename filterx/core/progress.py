"""Progress bars (img/s and ETA) and elapsed-time logging for long stages."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from tqdm.auto import tqdm

log = logging.getLogger("filterx")

# Set by the CLI's -q/--quiet; library callers pass quiet= explicitly.
QUIET = False


def progress(total: int | None = None, desc: str = "", unit: str = "img", quiet: bool = False) -> tqdm:
    """A tqdm bar showing ``unit``/s and ETA; silent when quiet or when stderr is not a terminal
    and the stage is short (tqdm's own ``disable=None`` rule)."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=False,
        dynamic_ncols=True,
        disable=True if (quiet or QUIET) else None,
        file=sys.stderr,
        smoothing=0.1,
    )


@contextmanager
def timed(stage: str) -> Iterator[dict]:
    """Log how long ``stage`` took; the yielded dict receives ``seconds`` at the end."""
    out: dict = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - t0
        log.info("%s took %.1fs", stage, out["seconds"])
