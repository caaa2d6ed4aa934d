"""filterx: pick the part of a large image pool that serves a small target dataset.

Stages (each a library function with a thin ``filterx`` command over it):
shard -> train-encoder -> embed -> score -> select -> pretrain / finetune.
"""

import importlib.abc as _abc
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"


class _SourceTreeKernels(_abc.MetaPathFinder):
    """``kernels/`` (Triton kernels and their torch twins) is installed as ``filterx.kernels``
    (pyproject's package-dir). In a source tree that is not installed (a copy on a GPU
    machine, ``PYTHONPATH=.``) it sits beside the package: this finder, consulted after the
    usual ones, serves it from there under the same name."""

    def __init__(self, kernels: _Path):
        self.kernels = kernels

    def find_spec(self, name, path=None, target=None):
        if name != "filterx.kernels":
            return None
        return _util.spec_from_file_location(name, self.kernels / "__init__.py",
                                             submodule_search_locations=[str(self.kernels)])


from filterx import portable as _portable  # os and sys only: cheap

if _portable.requested() and "torch" not in _sys.modules:
    _portable.enable()

_beside = _Path(__file__).resolve().parent.parent / "kernels"
if (_beside / "__init__.py").is_file():
    _sys.meta_path.append(_SourceTreeKernels(_beside))
