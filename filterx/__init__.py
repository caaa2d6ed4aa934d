"""filterx: pick the part of a large image pool that serves a small target dataset.

Stages (each a library function with a thin ``filterx`` command over it):
shard -> train-encoder -> embed -> score -> select -> pretrain / finetune.

The subpackages are layers; each imports only from the ones below it (tests/test_layers.py):
core, runners, kernels, math, io, decode, models, scorers, train, stages, report, cli.
"""

import sys as _sys

__version__ = "0.1.0"

from filterx.core import portable as _portable  # os and sys only: cheap

if _portable.requested() and "torch" not in _sys.modules:
    _portable.enable()
