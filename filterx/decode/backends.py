"""Decode backend registry: one interface, one name per backend, ``--backend`` choices from it.

A backend turns a dataset's tars into :class:`~filterx.decode.loader.Batch` es for one rank::

    @register_backend("pil", subsets=True, priority=0)
    def pil_batches(tars, cfg, rank, world_size, ids, on_error) -> Iterator[Batch]: ...

It must yield, on every rank, the batch sizes :func:`filterx.decode.loader.rank_batch_sizes`
lists for the samples it reads (so the trainer's steps per epoch hold for every backend), ids
read from the samples' keys, and hand each member it cannot decode to ``on_error`` (a
:class:`~filterx.decode.loader.BadSample`; the handler raises or records it, as webdataset's
``handler=``). ``subsets``: whether it reads only the samples ``ids`` names (DALI reads whole
tars). ``available``: whether its library is installed. ``"auto"`` picks the available
backend of highest ``priority`` that can do the read.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Iterator

AUTO = "auto"
# Modules that register the built-in backends, imported when the registry is first asked.
_BACKEND_MODULES = ("filterx.decode.torch_backend", "filterx.decode.dali_backend")
_REGISTRY: dict[str, "DecodeBackend"] = {}
_loaded = False


@dataclass(frozen=True)
class DecodeBackend:
    name: str
    batches: Callable[..., Iterator]  # (tars, cfg, rank, world_size, ids, on_error) -> Iterator[Batch]
    subsets: bool = True
    priority: int = 0
    available: Callable[[], bool] = lambda: True
    install: str = ""  # what to install when it is not available


def register_backend(name: str, *, subsets: bool = True, priority: int = 0,
                     available: Callable[[], bool] = lambda: True, install: str = ""):
    """Decorator: register ``fn`` as the decode backend ``name`` (see the module docstring)."""
    if not name or name == AUTO:
        raise ValueError(f"a decode backend cannot be named {name!r}")

    def wrap(fn):
        _REGISTRY[name] = DecodeBackend(name, fn, subsets, priority, available, install)
        return fn

    return wrap


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _BACKEND_MODULES:
            importlib.import_module(mod)


def list_backends() -> list[str]:
    """``"auto"`` and every registered backend name, in the order "auto" prefers them."""
    _load()
    return [AUTO, *sorted(_REGISTRY, key=lambda n: -_REGISTRY[n].priority)]


def check_backend(name: str) -> None:
    if name not in list_backends():
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(list_backends())}")


def get_backend(name: str) -> DecodeBackend:
    check_backend(name)
    if name == AUTO:
        raise ValueError("resolve 'auto' first (resolve_backend)")
    return _REGISTRY[name]


def resolve_backend(backend: str, *, subset: bool = False) -> str:
    """"auto" -> the available backend of highest priority that can do the read (dali when
    installed, else torchvision); errors name the valid backends.

    ``subset``: the read covers only some samples of its tars (an id list). A backend that
    reads whole tars (DALI) is then skipped by "auto" and refused when named.
    """
    check_backend(backend)
    if backend == AUTO:
        usable = [b for b in _REGISTRY.values() if (b.subsets or not subset) and b.available()]
        return max(usable, key=lambda b: b.priority).name
    b = _REGISTRY[backend]
    if not b.available():
        raise ValueError(f"--backend {backend} needs {b.install or 'a library that is not installed'}; "
                         f"or use one of {', '.join(n for n, o in _REGISTRY.items() if o.available())}")
    if subset and not b.subsets:
        others = [n for n, o in _REGISTRY.items() if o.subsets and o.available()]
        raise ValueError(f"--backend {backend} reads whole shards, and this run reads a subset of them; "
                         f"materialise it with `filterx select --format wds` or use --backend {' / '.join(others)}")
    return backend
