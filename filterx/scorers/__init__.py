"""Scorer registry (layer 6: imports core .. models, never train, stages or above).

A scorer turns arrays into one float32 score per source sample (higher = keep first) and does
no file I/O. ``filterx.stages.score`` loads what a scorer ``needs`` from disk, calls it, and writes
the result into the dataset's scores store.

    @register_scorer("random", needs=())
    def random_scores(inputs: ScoreInputs, *, seed: int) -> np.ndarray: ...

    run_scorer("clustering", inputs, seed=0, k=200, distance="min")
"""

from __future__ import annotations


import importlib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

import numpy as np

from filterx.io.dataset import ClassInfo  # re-exported: scorers receive a dataset's classes

# Modules that register scorers when imported; imported lazily by the registry functions so
# that ``import filterx`` stays cheap.
_SCORER_MODULES = (
    "filterx.scorers.basic",
    "filterx.scorers.clustering",
    "filterx.scorers.domain",
    "filterx.scorers.entropy",
    "filterx.scorers.influence",
    "filterx.scorers.classlevel",
    "filterx.scorers.pool",
)

# Names a scorer may list in ``needs``: the ScoreInputs fields it requires to be set.
INPUT_FIELDS = (
    "source_emb",
    "target_emb",
    "target_labels",
    "target_val_emb",
    "target_val_labels",
    "source_labels",
    "source_classes",
    "head_weight",
    "head_bias",
)


@dataclass(frozen=True)
class ScoreInputs:
    """Everything a scorer may read. Arrays are numpy on the host; rows align to sample ids.

    source_emb:        (N, D) float16 (as stored; the pool's embeddings from the score stage)
                       or float32, embeddings of the pool being scored. At ImageNet size one
                       float32 copy is 2.5 GiB: read it in row blocks (filterx.math.blocks),
                       casting each block, never the whole array
    target_emb:        (M, D) float32, embeddings of the target's training split
    target_labels:     (M,) int64 target class of each target_emb row
    target_val_emb:    (V, D) float32, the target's held-out split (never trained on)
    target_val_labels: (V,) int64
    source_labels:     (N,) int64 source class index, -1 where unknown
    source_classes:    class metadata of the pool, indexed by source_labels
    head_weight:       (C, D) float32, the target classifier's linear head (C target classes)
    head_bias:         (C,) float32
    num_source:        N, the number of scores to return (set even when no array gives it)
    device:            "cpu" or "cuda[:i]": where a scorer may compute
    """

    num_source: int
    source_emb: np.ndarray | None = None
    target_emb: np.ndarray | None = None
    target_labels: np.ndarray | None = None
    target_val_emb: np.ndarray | None = None
    target_val_labels: np.ndarray | None = None
    source_labels: np.ndarray | None = None
    source_classes: tuple[ClassInfo, ...] | None = None
    head_weight: np.ndarray | None = None
    head_bias: np.ndarray | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class ScoreResult:
    """What ``run_scorer`` returns. A scorer may return this or a bare (N,) array.

    scores: (N,) float32, higher = keep first, NaN where a sample could not be scored
    attrs:  JSON-serialisable facts about the run (e.g. a solver residual), stored with the
            scores as attrs
    tables: name -> list of row dicts (e.g. per-class accuracy), written by the command as CSV
            next to the scores store
    """

    scores: np.ndarray
    attrs: Mapping[str, Any] = field(default_factory=dict)
    tables: Mapping[str, list] = field(default_factory=dict)


@dataclass(frozen=True)
class Scorer:
    """A registered scoring method: ``fn(inputs, *, seed, **params) -> ScoreResult | (N,) array``."""

    name: str
    fn: Callable[..., np.ndarray]
    needs: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    types: Mapping[str, Any] = field(default_factory=dict)  # parameter -> its annotation


_REGISTRY: dict[str, Scorer] = {}
_loaded = False


def register_scorer(name: str, *, needs: tuple[str, ...] = ()) -> Callable:
    """Decorator registering ``fn`` under ``name``.

    The keyword-only parameters of ``fn`` other than ``seed`` are the scorer's parameters;
    their defaults become ``Scorer.defaults``.
    """
    unknown = [n for n in needs if n not in INPUT_FIELDS]
    if unknown:
        raise ValueError(f"scorer {name!r} needs unknown inputs {unknown}; valid: {INPUT_FIELDS}")

    def wrap(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        if name in _REGISTRY:
            raise ValueError(f"scorer {name!r} is registered twice")
        sig = inspect.signature(fn)
        defaults = {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name != "seed"
        }
        doc = (fn.__doc__ or "").strip().splitlines()
        hints = typing.get_type_hints(fn)
        types = {k: hints[k] for k in defaults if k in hints}
        _REGISTRY[name] = Scorer(name, fn, tuple(needs), defaults, doc[0] if doc else "", types)
        return fn

    return wrap


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for mod in _SCORER_MODULES:
            importlib.import_module(mod)
        _loaded = True


def list_scorers() -> list[str]:
    """Names of all registered scorers, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def get_scorer(name: str) -> Scorer:
    """The scorer registered as ``name``; ValueError naming the valid ones otherwise."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; valid methods: {', '.join(list_scorers())}"
        ) from None


def run_scorer(name: str, inputs: ScoreInputs, *, seed: int = 0, **params: Any) -> ScoreResult:
    """Run scorer ``name`` and check its output: scores of shape (inputs.num_source,), float32.

    Unknown parameter names and missing inputs raise ValueError naming what is valid.
    """
    scorer = get_scorer(name)
    params = check_params(name, params)
    missing = [n for n in scorer.needs if getattr(inputs, n) is None]
    if missing:
        raise ValueError(f"method {name!r} needs inputs {missing}, which were not given")
    out = scorer.fn(inputs, seed=seed, **params)
    if not isinstance(out, ScoreResult):
        out = ScoreResult(np.asarray(out))
    scores = np.asarray(out.scores)
    if scores.shape != (inputs.num_source,):
        raise RuntimeError(
            f"scorer {name!r} returned shape {scores.shape}, expected ({inputs.num_source},)"
        )
    return ScoreResult(scores.astype(np.float32, copy=False), dict(out.attrs), dict(out.tables))


def _conform(value: Any, kind: Any) -> tuple[bool, Any]:
    """(whether ``value`` fits annotation ``kind``, the value as that type)."""
    if kind is Any:
        return True, value
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is Union \
        else (kind,)
    for option in options:
        if option is type(None) and value is None:
            return True, None
        if option is bool and isinstance(value, bool):
            return True, value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if option is str and isinstance(value, str):
            return True, value
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            return True, tuple(value)
        if option not in (type(None), bool, int, float, str) and typing.get_origin(option) is not tuple:
            return True, value  # a type this check does not know: the scorer validates it
    return False, value


def check_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` checked against scorer ``name``'s declared parameters (names and types);
    ValueError naming the bad parameter, its value and what it takes."""
    scorer = get_scorer(name)
    bad = sorted(set(params) - set(scorer.defaults))
    if bad:
        raise ValueError(f"method {name!r} takes no parameter(s) {bad}; valid: {sorted(scorer.defaults)}")
    out = {}
    for key, value in params.items():
        kind = scorer.types.get(key, Any)
        ok, out[key] = _conform(value, kind)
        if not ok:
            want = getattr(kind, "__name__", None) or str(kind).replace("typing.", "")
            raise ValueError(f"method {name!r}: parameter {key} takes {want}, got {value!r}")
    return out


def resolved_params(name: str, **params: Any) -> dict[str, Any]:
    """The scorer's defaults overlaid with ``params``: what gets recorded in the scores attrs."""
    out = dict(get_scorer(name).defaults)
    out.update(params)
    return out


__all__ = [
    "ClassInfo",
    "ScoreInputs",
    "Scorer",
    "ScoreResult",
    "register_scorer",
    "list_scorers",
    "get_scorer",
    "run_scorer",
    "resolved_params",
    "INPUT_FIELDS",
]
