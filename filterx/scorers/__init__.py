"""Scorer registry (layer 6: imports core .. models, never train, stages or above).

A scorer turns arrays into one float32 score per source sample (higher = keep first) and does
no file I/O. ``filterx.stages.score`` loads what a scorer ``needs`` from disk, calls it, and writes
the result into the dataset's scores store.

    @register_scorer("random", needs=())
    def random_scores(inputs: ScoreInputs, *, seed: int) -> np.ndarray: ...

    run_scorer("clustering", inputs, seed=0, k=200, distance="min")

Two kinds share the registry. An *array* scorer (the default) receives a ``ScoreInputs`` of
arrays. A *streaming* scorer (``kind="streaming"``) consumes decoded pixels, shard by shard,
and receives a :class:`StreamContext` instead: the datasets, the encoder, the decode settings
and a work store it keeps per-shard results in, so that the orchestrator's re-run resumes it;
it returns (scored ids, ScoreResult). A scorer may be a *variant* of a method, chosen by one of
the method's parameters (``influence`` with ``params="last-block"`` is the streaming scorer
``influence/last-block``): ``resolve_scorer`` picks it, so the score stage names no method.
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
    "filterx.scorers.domain_pixels",
    "filterx.scorers.entropy",
    "filterx.scorers.gradalign",
    "filterx.scorers.influence",
    "filterx.scorers.lastblock",
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
    candidates:        what the scores are of: "source" (the pool) or "target-train" (the
                       target's training split; the score stage then passes it as source_emb)
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
    candidates: str = "source"


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
    kind: str = "array"  # "array": fn(ScoreInputs, ...); "streaming": fn(StreamContext, ...) -> (ids, result)
    choose_by: tuple[str, Any] | None = None  # (parameter, value of this scorer) that picks among variants
    # (params, candidates) -> the variant's value of the choosing parameter when it is "auto" (its default)
    choose_auto: Callable[[Mapping[str, Any], str], Any] | None = None
    check: Callable[[Mapping[str, Any], str], None] | None = None  # (params, candidates) -> raise ValueError
    variant_of: str | None = None  # the method this scorer is a variant of (not listed on its own)
    options: Mapping[str, Option] = field(default_factory=dict)  # parameters with a `score` option


@dataclass(frozen=True)
class Option:
    """A scorer parameter that ``filterx score`` offers as an option of its own (``--NAME``):
    its help (one phrase), its choices (checked with the types by check_params), the lower
    bound the command line enforces (the scorer checks its own range, with its own message),
    and the metavar of a list. The type and the default come from the scorer's signature;
    the other parameters are reached with -p."""

    help: str
    choices: tuple[str, ...] | None = None
    min: int | float | None = None
    metavar: str | None = None


@dataclass(frozen=True)
class StreamContext:
    """What a streaming scorer gets instead of arrays.

    source, target: the datasets (``filterx.io.dataset.Dataset``); candidates: "source" or
    "target-train"; encoder: the encoder file or spec; decode settings for the loader;
    work: the directory the scorer may keep resumable per-shard work in (pool runs only; the
    orchestrator holds the run lock and removes it once the scores are stored), or None;
    key: the facts its work depends on that the orchestrator knows (fingerprints, encoder,
    seed, decode backend, device type, version): the scorer adds its own and discards work
    made under another key.
    """

    source: Any
    target: Any
    candidates: str
    encoder: Any
    device: str = "cpu"
    backend: str = "auto"
    batch_size: int = 64
    workers: int = 2
    quiet: bool = False
    work: Any = None
    key: Mapping[str, Any] = field(default_factory=dict)


AUTO = "auto"  # the choosing parameter's default where the method has choose_auto
_REGISTRY: dict[str, Scorer] = {}
_loaded = False


def register_scorer(name: str, *, needs: tuple[str, ...] = (), kind: str = "array",
                    choose_by: tuple[str, Any] | None = None, variant_of: str | None = None,
                    check: Callable[[Mapping[str, Any], str], None] | None = None,
                    choose_auto: Callable[[Mapping[str, Any], str], Any] | None = None,
                    options: Mapping[str, Option] | None = None) -> Callable:
    """Decorator registering ``fn`` under ``name``.

    The keyword-only parameters of ``fn`` other than ``seed`` are the scorer's parameters;
    their defaults become ``Scorer.defaults``. ``kind``: "array" or "streaming" (module
    docstring). ``choose_by=(param, value)``: the parameter of the method that picks its
    variants and this scorer's value of it; a variant names its method in ``variant_of``.
    ``choose_auto(params, candidates)``: makes "auto" the choosing parameter's default, the
    value it stands for depending on the other parameters and the candidates.
    ``check(params, candidates)``: a scorer's own refusal of a combination (ValueError).
    ``needs`` of a streaming scorer name the inputs it derives itself, so that the stage asks
    for the encoder and the target it needs. ``options``: the parameters ``filterx score``
    offers as options of their own (:class:`Option`; the choosing parameter may be one);
    their choices are checked with the types.
    """
    unknown = [n for n in needs if n not in INPUT_FIELDS]
    if unknown:
        raise ValueError(f"scorer {name!r} needs unknown inputs {unknown}; valid: {INPUT_FIELDS}")
    if kind not in ("array", "streaming"):
        raise ValueError(f"scorer {name!r}: unknown kind {kind!r}; valid: array, streaming")
    if variant_of is not None and choose_by is None:
        raise ValueError(f"variant {name!r} of {variant_of!r} needs choose_by=(parameter, value)")
    if choose_auto is not None and (choose_by is None or variant_of is not None):
        raise ValueError(f"scorer {name!r}: choose_auto belongs to a method with variants (choose_by, no variant_of)")

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
        declared = dict(options or {})
        chooser = {choose_by[0]} if choose_by else set()
        stray = sorted(set(declared) - set(defaults) - chooser)
        if stray:
            raise ValueError(f"scorer {name!r} declares options {stray} that are not its parameters")
        _REGISTRY[name] = Scorer(name, fn, tuple(needs), defaults, doc[0] if doc else "", types, kind, choose_by,
                                 choose_auto, check, variant_of, declared)
        return fn

    return wrap


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for mod in _SCORER_MODULES:
            importlib.import_module(mod)
        _loaded = True


def all_scorers() -> list[Scorer]:
    """Every registered scorer, variants included, in registration order."""
    _load_all()
    return list(_REGISTRY.values())


def list_scorers() -> list[str]:
    """Names of all registered methods, sorted (variants are reached through their method)."""
    _load_all()
    return sorted(n for n, s in _REGISTRY.items() if s.variant_of is None)


def resolve_scorer(method: str, params: Mapping[str, Any],
                   candidates: str = "source") -> tuple[Scorer, dict[str, Any], dict[str, Any]]:
    """The scorer that runs ``method`` with ``params`` on ``candidates``: the method itself, or
    the variant its choosing parameter names ("auto", the default of a method registered with
    ``choose_auto``, names the one that function picks). Returns (scorer, params without the
    choosing one, {choosing parameter: value} when a variant or "auto" chose, else {})."""
    base = get_scorer(method)
    params = dict(params)
    if base.choose_by is None:
        return base, params, {}
    key, own = base.choose_by
    value = params.pop(key, AUTO if base.choose_auto else own)
    automatic = value == AUTO and base.choose_auto is not None
    if automatic:
        value = base.choose_auto({**base.defaults, **params}, candidates)
    variants = {s.choose_by[1]: s for s in _REGISTRY.values() if s.variant_of == method}
    if value == own:
        return base, params, ({key: value} if automatic else {})
    if value not in variants:
        valid = [own, *variants, *([AUTO] if base.choose_auto else [])]
        raise ValueError(f"unknown {method} {key} {value!r}; valid: {', '.join(map(str, valid))}")
    return variants[value], params, {key: value}


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
        opt = scorer.options.get(key)
        if opt is not None and opt.choices is not None and out[key] not in opt.choices:
            raise ValueError(f"method {name!r}: unknown {key} {out[key]!r}; valid: {', '.join(opt.choices)}")
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
    "resolve_scorer",
    "StreamContext",
    "Option",
    "all_scorers",
    "AUTO",
    "INPUT_FIELDS",
]
