"""Shared plumbing for the kernels: picking Triton or the torch twin, and input checks.

Triton decides once per process, when ``triton`` is first imported, whether kernels are
compiled for the GPU or run by its interpreter (numpy, on the CPU): ``TRITON_INTERPRET=1``
must be in the environment *before* that import. The helpers here check that state instead
of trusting the variable, so a late ``os.environ["TRITON_INTERPRET"] = "1"`` gives a clear
error rather than a confusing failure deep inside Triton.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import numpy as np
import torch

IMPLS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Ceiling on the float32 scratch one block of a torch twin may allocate. Blocks this size
# keep the per-call overhead of the Python loop negligible (they hold millions of elements)
# while the peak memory stays bounded whatever N and K are.
TORCH_BLOCK_BYTES = 64 << 20


@lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _env_true(name: str) -> bool:
    # Triton's own parsing of boolean variables (triton.knobs.getenv_bool).
    return os.environ.get(name, "0").lower() in ("1", "true", "on", "yes", "y")


def triton_interpreting() -> bool:
    """True when Triton was imported in interpreter mode (kernels run on the CPU via numpy)."""
    import triton.language as tl  # noqa: PLC0415 - keep triton off the import path of the twins
    from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415

    # tl.zeros is itself a @triton.jit function: it was built in interpreter mode exactly
    # when TRITON_INTERPRET was set at import time, which is what decides whether our
    # kernels can run on CPU tensors.
    return isinstance(tl.zeros, InterpretedFunction)


def resolve_impl(impl: str, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for a requested ``impl`` and the inputs' device.

    ``"auto"`` picks Triton for CUDA tensors when Triton is installed, the torch twin
    otherwise. ``"triton"`` on CPU tensors needs Triton's interpreter (``TRITON_INTERPRET=1``
    set before ``triton`` is first imported); anything else raises ValueError.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not valid; choose one of {', '.join(IMPLS)}")
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_installed() else "torch"
    if not triton_installed():
        raise ImportError(
            "impl='triton' needs the triton package (pip install 'filterx[triton]'); "
            "impl='torch' or impl='auto' work without it"
        )
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        if triton_interpreting():
            return "triton"
        if _env_true("TRITON_INTERPRET"):
            raise ValueError(
                "impl='triton' on cpu tensors: TRITON_INTERPRET=1 was set after triton had "
                "been imported, so Triton is in compiled mode; set it before the first "
                "`import triton` (e.g. in the shell), or use impl='torch'"
            )
        raise ValueError(
            "impl='triton' on cpu tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "in the environment before triton is imported, move the tensors to cuda, or use "
            "impl='torch' / impl='auto'"
        )
    raise ValueError(
        f"impl='triton' runs on cuda tensors (or cpu tensors with TRITON_INTERPRET=1); "
        f"got device {device.type!r}; use impl='torch' there"
    )


def as_tensor(a, name: str) -> torch.Tensor:
    """A torch view of ``a`` (numpy arrays are wrapped without a copy)."""
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a))
    raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(a).__name__}")


def check_float(t: torch.Tensor, name: str, dtypes=FLOAT_DTYPES) -> None:
    if t.dtype not in dtypes:
        valid = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} has dtype {t.dtype}; valid dtypes are {valid}")


def check_ndim(t: torch.Tensor, name: str, ndim: int, shape_doc: str) -> None:
    if t.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"inputs must be on one device, got {listed}")
    return next(iter(devices.values()))


def rows_per_block(bytes_per_row: int, n_rows: int, budget: int | None = None) -> int:
    """How many rows fit a scratch budget (default ``TORCH_BLOCK_BYTES``), in [1, n_rows]."""
    budget = TORCH_BLOCK_BYTES if budget is None else budget
    return max(1, min(n_rows, budget // max(1, bytes_per_row)))


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
