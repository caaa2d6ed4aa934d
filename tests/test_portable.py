"""Portable CPU numerics: the pins reach the libraries, and come before torch or not at all."""

import os
import subprocess
import sys

import pytest


def test_filterx_portable_pins_kernels_and_threads_before_torch_loads():
    code = ("import filterx, os, torch\n"
            "print(os.environ['ONEDNN_MAX_CPU_ISA'], os.environ['MKL_CBWR'], torch.get_num_threads())\n")
    env = {**os.environ, "FILTERX_PORTABLE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    # the user's thread count is overridden: the thread count changes the floats too
    assert out.split() == ["AVX2", "AVX2,STRICT", "2"]


def test_enabling_after_torch_is_imported_is_refused():
    import torch  # noqa: F401

    from filterx.core import portable

    with pytest.raises(RuntimeError, match="before torch is imported"):
        portable.enable()
