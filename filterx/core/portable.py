"""Portable CPU numerics: the same floats from the same run on different x86 CPUs.

On the CPU, torch's results depend on the machine through three libraries, each of which picks
its kernels at run time (measured on one 2-core AMD EPYC with AVX-512, training the demo's
encoder for 3 epochs: the weights differed whenever one of these changed; pinning ATen's own
vector ISA, ``ATEN_CPU_CAPABILITY``, changed nothing):

- oneDNN (convolutions) picks its instruction set (AVX2, AVX-512, AMX) and blocking;
- MKL (matrix products) picks a code path per CPU model and vendor;
- the intra-op thread count splits reductions differently.

``enable()`` pins all three: oneDNN to AVX2 (``ONEDNN_MAX_CPU_ISA``), MKL to its conditional
numerical reproducibility mode for AVX2 (``MKL_CBWR=AVX2,STRICT``) and the thread count
(``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``). The libraries read these when they first run, so
``enable()`` must come before torch is imported; it raises RuntimeError otherwise. Any x86 CPU
with AVX2 then runs the same kernels. What remains machine-dependent is what these libraries
do not promise: oneDNN may still block by cache size, so results across CPU models are as
close as torch allows but not proven identical (no second machine was at hand to compare).
"""

from __future__ import annotations

import os
import sys

THREADS = 2  # the thread count the demo's README table was measured with
SETTINGS = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2,STRICT",
}


def requested() -> bool:
    """Whether the environment asks for portable numerics (``FILTERX_PORTABLE=1``)."""
    return os.environ.get("FILTERX_PORTABLE", "").strip().lower() in ("1", "true", "yes", "on")


def enable(threads: int = THREADS) -> dict[str, str]:
    """Pin the CPU kernels and thread count (see the module docstring); returns the settings."""
    if "torch" in sys.modules:
        raise RuntimeError("portable numerics must be enabled before torch is imported "
                           "(set FILTERX_PORTABLE=1 in the environment instead)")
    settings = {**SETTINGS, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    os.environ.update(settings)
    os.environ["FILTERX_PORTABLE"] = "1"  # child processes (loader workers, torchrun ranks) inherit it
    return settings


def active() -> bool:
    """Whether this process runs with the pinned settings."""
    return requested() and all(os.environ.get(k) == v for k, v in SETTINGS.items())
