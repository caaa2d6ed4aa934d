"""selection: the precision of each method's selection on pools with a known relevant part.

    python -m bench --suite selection [--quick] [--opt selection.backbone=SPEC] [--opt selection.work=DIR]

Three pools at three difficulties (``bench/selection_pools.py``: easy, medium, hard), one
target shared by them (the demo's: 300 digits 0-4 in a "camera" style). filterx's own chain
runs on each, through its library functions, in a temporary directory: ``shard`` the pools and
the target, train the encoders on the target, ``embed`` every pool, ``score`` with every
method of the scorer registry, ``select`` 6 % and 12 % of the pool. A row's precision is the
share of the selection that is in the relevant part (pool images of the target's classes).

Encoders (all three available offline): ``target``, a ResNet-18 trained on the target's 270
training images (the demo's settings: 64 px, 20 epochs); ``backbone``, a frozen backbone spec
(default ``torchvision:resnet18:none``, a seeded random init at 224 px) with a linear probe on
the target as its head (``train-encoder --backbone SPEC --probe-only``). Give
``--opt selection.backbone=torchvision:resnet50:IMAGENET1K_V2@FILE`` where weights are at hand.
``moco``, the self-supervised encoder for users without weights: a ResNet-18 trained with
MoCo v2 on each pool together with the target, labels unread (``train-encoder --objective moco
--with-pool POOL``; one encoder per pool), at 32 px with the views for 32 px images
(``filterx.train.moco_views.SMALL_IMAGE_VIEWS``), ``moco_epochs`` epochs (default 40), then the same linear probe.

One row needs no encoder: the paper's domain classifier on pixels (``domain-cls --on pixels``),
a ResNet-18 of width 16 trained from scratch at 32 px for 300 steps on each pool and the target.

Plain references, computed with scikit-learn on the same pools' 16x16 RGB pixels, out of
sample: a logistic target-vs-pool classifier cross-fitted over 5 folds of the pool, k-means
(k = 50) min and mean distance and 10-NN mean distance to the target's training split.

Every method runs with the same settings on the three pools (the demo's variants plus the
pool-level methods' defaults); nothing is tuned to a pool. The whole-class filters
(class-mask, hard-classes) remove classes by a list of names or by the pool's own labels; they
are not selectors of a relevant part and are listed as not run.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.selection_pools import PIXELS, POOLS, make_pool, make_target, pixel_features, reference_scores, relevant_mask
from bench.suite import Rows, option_tuple, slug, workdir

BUDGETS = (0.06, 0.12)
DEFAULT_BACKBONE = "torchvision:resnet18:none"
ENCODERS = ("target", "backbone", "moco", "moco-ft")
# The moco encoder's resolution: 32 px (a quarter of 64 px's compute, for CPU runs), with the
# views for 32 px images (filterx.train.moco_views.SMALL_IMAGE_VIEWS).
MOCO_RESOLUTION = 32
# Its layout (build_model's options; train-encoder --width / --stem): MOCO_WIDTH's channels and
# MOCO_STEM's stem.
MOCO_WIDTH, MOCO_STEM = 64, "imagenet"
# Pool-level methods and influence's variant for choosing data, at their defaults; the demo's
# variants come first (filterx.stages.demo.VARIANTS).
EXTRA_VARIANTS = (
    ("knn-target (k=10)", "knn-target", {}),
    ("pool-clusters", "pool-clusters", {}),
    # grad-align's rows below average over every class's target samples of the held-out split
    # (--over all --align-with validation, its defaults until the own-class rows were added); the
    # last own-class row is its default since.
    ("grad-align (pseudo-labels)", "grad-align", {"over": "all", "align_with": "validation"}),
    # The embedding-space methods with the pool's mean embedding subtracted first (--center pool):
    # added after rescoring the kept work of the emoji suite's "Travel & Places" and "Food & Drink"
    # runs (README, "Centring the embeddings"), so those two do not test the choice; "Animals &
    # Nature" and the digit pools were rescored after it.
    ("clustering (min, centred)", "clustering", {"k": 50, "distance": "min", "center": "pool"}),
    ("clustering (avg, centred)", "clustering", {"k": 50, "distance": "avg", "center": "pool"}),
    ("knn-target (k=10, centred)", "knn-target", {"center": "pool"}),
    ("pool-clusters (centred)", "pool-clusters", {"center": "pool"}),
    ("grad-align (pseudo-labels, centred)", "grad-align",
     {"center": "pool", "over": "all", "align_with": "validation"}),
    # grad-align aligned with the whole target (training and held-out splits), not its held-out
    # split alone (two or three images a class on the emoji targets): added before any suite run of it.
    ("grad-align (whole target)", "grad-align", {"align_with": "target", "over": "all"}),
    ("grad-align (whole target, centred)", "grad-align", {"align_with": "target", "center": "pool", "over": "all"}),
    # grad-align averaged within the candidate's class (--over class), with the held-out split and
    # with the whole target (grad-align's default on a pool: --over class --align-with auto):
    # added after rescoring the kept work of the Intel Xeon runs of the three emoji categories and
    # the digit pools at seed 0 (README, "grad-align within the candidate's class"), so those do
    # not test them.
    ("grad-align (own class)", "grad-align", {"align_with": "validation"}),
    ("grad-align (own class, whole target)", "grad-align", {}),
)
# Rank fusion at select time (select --method a,b --combine ...) of stored scores, chosen before
# any run: the best distance method with the classifier, two different signals.
FUSED = (
    ("rank-mean(knn-target, domain-cls mlp)", ("knn-target (k=10)", "domain-cls (mlp, 2 folds)"), "rank-mean"),
)
# The paper's domain classifier on pixels (domain-cls --on pixels) needs no encoder: one row, run
# once, at the CPU settings the README gives (a narrow ResNet-18 at 32 px, 1000 steps; the
# committed runs before 2026-12-07 took 300, about one pass over the emoji pool, and their
# classifier was undertrained: README, "Selection quality"). In a cross-encoder fusion its key
# is PIXEL_KEY.
PIXEL_VARIANT = ("domain-cls (pixels, ResNet-18 width 16, 32 px, 1000 steps)", "domain-cls",
                 {"on": "pixels", "width": 16, "resolution": 32, "steps": 1000})
PIXEL_KEY = "pixels"


def pixel_variant(members: int = 1, colour: str = "none", views: int = 1) -> tuple[str, str, dict]:
    """PIXEL_VARIANT, or with ``members`` > 1 its ensemble (``--members``: that many classifiers,
    their mean logit), with ``colour`` other than "none" its colour steps (``--colour``), with
    ``views`` > 1 its test-time views (``--views``), labelled so."""
    label, method, params = PIXEL_VARIANT
    if members != 1:
        label, params = f"{label[:-1]}, {members} members)", {**params, "members": members}
    if colour != "none":
        label, params = f"{label[:-1]}, colour {colour})", {**params, "colour": colour}
    if views != 1:
        label, params = f"{label[:-1]}, {views} views)", {**params, "views": views}
    return label, method, params


def _pixel_tag(members: int, colour: str, views: int = 1) -> str:
    """How a fusion's label names a pixel classifier other than PIXEL_VARIANT: " x3", " x3 mixed",
    " x3 mixed 4 views"."""
    return ((f" x{members}" if members != 1 else "") + (f" {colour}" if colour != "none" else "")
            + (f" {views} views" if views != 1 else ""))


CROSS_FUSED = (
    # Rank fusion across encoders, run where both ran: the distance to the target on moco's
    # features (appearance, which fine-tuning loses) with the outlier-exposure head on moco-ft's
    # (the target's classes, which moco's probe tells apart less well). Added after the quick runs
    # at seeds 0-2 were rescored this way (README, "Selection quality"), so those seeds do not
    # test the choice.
    *((f"{combine}(knn-target moco, entropy low OE moco-ft)",
       (("moco", "knn-target (k=10)"), ("moco-ft", "entropy (low, outlier exposure)")), combine)
      for combine in ("rank-mean", "rank-max")),
    # Two target-vs-pool classifiers that share no features: on moco's embeddings and on the
    # pixels. Added after the emoji suite's first run ("Animals & Nature", where each alone kept
    # 0.40 and 0.39 at 6% and their rank mean 0.46 when computed on the kept scores), so that run
    # does not test it; the other emoji categories and the digit pools do (README, "Selection quality").
    ("rank-mean(domain-cls linear moco, domain-cls pixels)",
     (("moco", "domain-cls (linear)"), (PIXEL_KEY, PIXEL_VARIANT[0])), "rank-mean"),
)
PIXEL_BATCH = 64
NOT_RUN = {
    "class-mask": "removes classes named by the user (with the ground truth's names it is an oracle)",
    "hard-classes": "removes the pool classes a probe on the pool's own labels finds hardest; "
                    "it does not look at the target",
}
SIZES = {True: {"per_class": 50, "digits_per_class": 25}, False: {"per_class": 150, "digits_per_class": 75}}


def moco_layout(width: int = MOCO_WIDTH, stem: str = MOCO_STEM) -> dict:
    """build_model's options for a ResNet of ``width`` first-stage channels with the ``stem``
    stem: those that differ from the published layout (an empty dict for it)."""
    from filterx.models.archs import RESNET_DEFAULTS

    return {k: v for k, v in (("width", int(width)), ("stem", stem)) if v != RESNET_DEFAULTS[k]}


def layout_name(arch: str, layout: dict) -> str:
    """"resnet18", or with its options: "resnet18 (width 32, small stem)"."""
    parts = ([f"width {layout['width']}"] if "width" in layout else []) + \
            ([f"{layout['stem']} stem"] if "stem" in layout else [])
    return f"{arch} ({', '.join(parts)})" if parts else arch


def variants() -> tuple[tuple[str, str, dict], ...]:
    from filterx.stages.demo import VARIANTS

    return tuple(VARIANTS) + EXTRA_VARIANTS


def log(msg: str) -> None:
    print(f"[selection] {msg}", flush=True)


def precision_at(relevant: np.ndarray, ids: np.ndarray) -> float:
    """Share of the selected ``ids`` that are relevant (0.0 for an empty selection)."""
    return float(relevant[np.asarray(ids, dtype=np.int64)].mean()) if len(ids) else 0.0


def _select_precisions(name: str, pool: dict, stored: str, manifest_name: str, values: dict,
                       combine: str | None = None) -> None:
    """Select every budget of ``pool`` by the stored score(s) ``stored`` (``combine``: rank fusion
    of several) into ``manifests/<manifest_name>-<budget>.jsonl``; ``values[(name, budget)]`` =
    the selection's precision."""
    from filterx.io.manifest import read_manifest
    from filterx.stages.select import SelectConfig, select

    for b in BUDGETS:
        manifest = pool["ds"] / "manifests" / f"{manifest_name}-{round(b * 100)}.jsonl"
        select(SelectConfig(pool["ds"], stored, manifest, fraction=b, combine=combine, quiet=True))
        values[(name, b)] = precision_at(pool["relevant"], read_manifest(manifest).ids)


def _row(method: str, encoder: str, values: dict, seconds: float | None, pools) -> dict:
    """One table row: precision per pool (``pools``: their names, in column order) and budget."""
    row = {"method": method, "encoder": encoder}
    for pool in pools:
        for b in BUDGETS:
            row[f"{pool}@{round(b * 100)}%"] = values.get((pool, b))
    row["seconds"] = None if seconds is None else round(seconds, 1)
    return row


def _train_encoders(root: Path, target: Path, pools: dict, chosen, *, backbone: str, epochs: int,
                    resolution: int, moco_epochs: int, seed: int, device: str,
                    moco_resolution: int = MOCO_RESOLUTION, moco_model: dict | None = None) -> dict[str, dict]:
    """Per encoder key: ``paths`` (pool name -> encoder file: one file for every pool, except
    moco's and moco-ft's, trained on each pool; moco's ResNet-18 in ``moco_model``'s layout, by
    default :func:`moco_layout`'s), ``val_accs`` (pool name -> held-out accuracy),
    ``label``, ``seconds`` (training, all pools; moco-ft's includes the MoCo training where moco
    did not run before it)."""
    from filterx.train.encoder import EncoderConfig, train_encoder
    from filterx.stages.moco_encoder import MocoEncoderConfig, train_moco_encoder
    from filterx.stages.probe import ProbeConfig, train_probe
    from filterx.train.moco_views import SMALL_IMAGE_VIEWS, moco_augment

    out = {}
    layout = moco_layout() if moco_model is None else dict(moco_model)
    net = layout_name("resnet18", layout)
    moco = {}  # pool name -> MoCo encoder file and held-out accuracy, trained once for moco and moco-ft

    def moco_encoders() -> dict[str, tuple[Path, float]]:
        for name, pool in pools.items():
            if name not in moco:
                path = root / f"encoder-moco-{name}.pt"
                s = train_moco_encoder(MocoEncoderConfig(
                    target, path, arch="resnet18", resolution=moco_resolution, epochs=moco_epochs,
                    with_pool=pool["ds"], augment=moco_augment(SMALL_IMAGE_VIEWS), device=device, seed=seed,
                    quiet=True, model_options=layout))
                moco[name] = (path, s.val_acc)
        return moco

    for key in chosen:
        t = time.perf_counter()
        if key == "moco":
            trained = moco_encoders()
            paths = {name: path for name, (path, _) in trained.items()}
            accs = {name: acc for name, (_, acc) in trained.items()}
            label = f"{net} by MoCo v2 on each pool + target ({moco_resolution} px, {moco_epochs} ep) + probe"
        elif key == "moco-ft":
            paths, accs = {}, {}
            for name, (init, _) in moco_encoders().items():
                paths[name] = root / f"encoder-moco-ft-{name}.pt"
                s = train_encoder(EncoderConfig(target, paths[name], arch="resnet18", resolution=moco_resolution,
                                                epochs=epochs, batch_size=64, device=device, seed=seed, quiet=True,
                                                init=init))
                accs[name] = s.val_acc
            label = (f"moco's encoders fine-tuned on the target's labels ({moco_resolution} px, {epochs} ep, "
                     f"train-encoder --init)")
        else:
            path = root / f"encoder-{key}.pt"
            if key == "target":
                s = train_encoder(EncoderConfig(target, path, arch="resnet18", resolution=resolution, epochs=epochs,
                                                batch_size=64, device=device, seed=seed, quiet=True))
                label = f"resnet18 trained on target ({resolution} px, {epochs} ep)"
            else:
                s = train_probe(ProbeConfig(target, path, backbone=backbone, seed=seed, device=device, quiet=True))
                label = f"{backbone} + probe"
            paths = {name: path for name in pools}
            accs = {name: s.val_acc for name in pools}
        out[key] = {"paths": paths, "val_accs": accs, "label": label, "seconds": time.perf_counter() - t}
        log(f"encoder {label}: held-out accuracy {_accuracies(accs)} ({out[key]['seconds']:.0f}s)")
    return out


def _accuracies(accs: dict[str, float]) -> str:
    """"63.3%" where every pool's encoder is the same one, else "40.0% / 43.3% / 36.7% (easy / medium / hard)"."""
    if len(set(accs.values())) == 1:
        return f"{next(iter(accs.values())):.1%}"
    return " / ".join(f"{a:.1%}" for a in accs.values()) + f" ({' / '.join(accs)})"


def _filterx_rows(pools: dict, target: Path, encoders: dict, *, seed: int, device: str) -> list[dict]:
    from filterx.stages.embed import EmbedConfig, embed
    from filterx.stages.score import ScoreConfig, score

    rows = []
    for key, enc in encoders.items():
        for name, pool in pools.items():
            t = time.perf_counter()
            embed(EmbedConfig(pool["ds"], enc["paths"][name], device=device, quiet=True))
            enc.setdefault("embed_seconds", 0.0)
            enc["embed_seconds"] += time.perf_counter() - t
        log(f"encoder {key}: embedded the pools ({enc['embed_seconds']:.0f}s)")
        for label, method, params in variants():
            values, seconds = {}, 0.0
            for name, pool in pools.items():
                t = time.perf_counter()
                stored = f"{key}-{slug(label)}"
                score(ScoreConfig(method, pool["ds"], target, enc["paths"][name], dict(params), seed, name=stored,
                                  device=device, quiet=True))
                _select_precisions(name, pool, stored, stored, values)
                seconds += time.perf_counter() - t
            rows.append(_row(label, key, values, seconds, pools))
            log(f"{key} {label}: " + ", ".join(f"{p}@{round(b * 100)}% {v:.2f}" for (p, b), v in values.items())
                + f" ({seconds:.1f}s)")
        for label, parts, combine in FUSED:
            values, t = {}, time.perf_counter()
            stored = ",".join(f"{key}-{slug(part)}" for part in parts)
            for name, pool in pools.items():
                _select_precisions(name, pool, stored, f"{key}-{slug(label)}", values, combine=combine)
            rows.append(_row(label, key, values, time.perf_counter() - t, pools))
    return rows


def _stored_name(key: str, label: str) -> str:
    """The name of the stored score of row ``label`` with encoder ``key`` (PIXEL_KEY: the pixel classifier's)."""
    return slug(label) if key == PIXEL_KEY else f"{key}-{slug(label)}"


def _cross_fused_rows(pools: dict, encoders: dict, *, pixel_members: int = 1, pixel_colour: str = "none",
                      pixel_views: int = 1) -> list[dict]:
    """CROSS_FUSED's rows whose parts all ran (the pixel classifier always does; with
    ``pixel_members`` > 1, ``pixel_colour`` or ``pixel_views`` its variant, which the row's label
    then names)."""
    rows = []
    for label, parts, combine in CROSS_FUSED:
        if not all(key in encoders or key == PIXEL_KEY for key, _ in parts):
            continue
        tag = _pixel_tag(pixel_members, pixel_colour, pixel_views)
        if tag and any(key == PIXEL_KEY for key, _ in parts):
            variant = pixel_variant(pixel_members, pixel_colour, pixel_views)[0]
            parts = tuple((key, variant if key == PIXEL_KEY else part) for key, part in parts)
            label = label.replace("domain-cls pixels", f"domain-cls pixels{tag}")
        values, t = {}, time.perf_counter()
        stored = ",".join(_stored_name(key, part) for key, part in parts)
        for name, pool in pools.items():
            _select_precisions(name, pool, stored, slug(label), values, combine=combine)
        rows.append(_row(label, " + ".join(key for key, _ in parts), values, time.perf_counter() - t, pools))
    return rows


def _pixel_rows(pools: dict, target: Path, *, seed: int, device: str, members: int = 1,
                colour: str = "none", views: int = 1) -> list[dict]:
    from filterx.stages.score import ScoreConfig, score

    label, method, params = pixel_variant(members, colour, views)
    values, t = {}, time.perf_counter()
    for name, pool in pools.items():
        stored = _stored_name(PIXEL_KEY, label)
        score(ScoreConfig(method, pool["ds"], target, None, dict(params), seed, name=stored, device=device,
                          backend="pil", batch_size=PIXEL_BATCH, workers=0, quiet=True))
        _select_precisions(name, pool, stored, stored, values)
    seconds = time.perf_counter() - t
    log(f"{label}: " + ", ".join(f"{p}@{round(b * 100)}% {v:.2f}" for (p, b), v in values.items())
        + f" ({seconds:.1f}s)")
    return [_row(label, "none (pixels)", values, seconds, pools)]


def _reference_rows(pools: dict, target: Path, train_ids: np.ndarray, *, seed: int) -> list[dict]:
    from filterx.io.dataset import Dataset
    from filterx.stages.select import select_ids

    def images(ds):  # the original JPEGs shard read (paths are relative to its source root)
        return [Path(ds.attrs["source_root"]) / p for p in ds.paths]

    target_px = pixel_features([images(Dataset.open(target))[i] for i in train_ids])
    values: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for name, pool in pools.items():
        t = time.perf_counter()
        pool_px = pixel_features(images(Dataset.open(pool["ds"])))
        feature_s = time.perf_counter() - t
        for label, scores in reference_scores(pool_px, target_px, seed=seed).items():
            for b in BUDGETS:
                values.setdefault(label, {})[(name, b)] = precision_at(pool["relevant"], select_ids(scores, fraction=b))
        # the four references share the features and are fitted together: the time is theirs together
        seconds[name] = time.perf_counter() - t - feature_s
    total = sum(seconds.values())
    return [_row(label, f"pixels {PIXELS}x{PIXELS} (sklearn)", v, total if i == 0 else None, pools)
            for i, (label, v) in enumerate(values.items())]


def check_encoders(encoders) -> tuple[str, ...]:
    """The encoder keys of an ``encoders`` option (a tuple or "a,b"), checked against
    ``ENCODERS``; also refuses to run while a registered scorer is neither run nor in NOT_RUN."""
    from filterx.scorers import list_scorers

    chosen = option_tuple(encoders)
    bad = [e for e in chosen if e not in ENCODERS]
    if bad or not chosen:
        raise ValueError(f"unknown encoders {bad or '(none)'}; valid: {', '.join(ENCODERS)}")
    unknown = sorted(set(list_scorers()) - {m for _, m, _ in variants()} - set(NOT_RUN))
    if unknown:
        raise RuntimeError(f"scorers {unknown} are registered but neither benchmarked nor listed in NOT_RUN")
    return chosen


def evaluate(root: Path, target: Path, pools: dict, chosen, *, backbone: str, epochs: int, resolution: int,
             moco_epochs: int, references: bool, seed: int, device: str,
             moco_resolution: int = MOCO_RESOLUTION, moco_model: dict | None = None,
             pixel_members: int = 1, pixel_colour: str = "none",
             pixel_views: int = 1) -> tuple[list[dict], dict, np.ndarray]:
    """Every row for ``pools`` (name -> ``{"ds": dataset dir, "relevant": (N,) bool, "size": N}``),
    which share the sharded ``target``: the encoders ``chosen`` trained, each method scored and
    selected, the pixel classifier (an ensemble of ``pixel_members``, colour steps
    ``pixel_colour``, ``pixel_views`` views at scoring), the references (where
    ``references``), random's expected share and the best possible. Returns the rows, the
    encoders (``_train_encoders``) and the target's training split (sample ids)."""
    from filterx.models.encoder import read_encoder_file

    encs = _train_encoders(root, target, pools, chosen, backbone=backbone, epochs=epochs,
                           resolution=resolution, moco_epochs=moco_epochs, seed=seed, device=device,
                           moco_resolution=moco_resolution, moco_model=moco_model)
    rows = _filterx_rows(pools, target, encs, seed=seed, device=device)
    rows += _pixel_rows(pools, target, seed=seed, device=device, members=pixel_members, colour=pixel_colour,
                        views=pixel_views)
    rows += _cross_fused_rows(pools, encs, pixel_members=pixel_members, pixel_colour=pixel_colour,
                              pixel_views=pixel_views)
    first = next(iter(encs.values()))["paths"]  # every encoder file holds the same target split
    split = read_encoder_file(next(iter(first.values())))
    train_ids = np.asarray(split["train_ids"], dtype=np.int64)
    if references:
        rows += _reference_rows(pools, target, train_ids, seed=seed)
    expected = {(n, b): float(p["relevant"].mean()) for n, p in pools.items() for b in BUDGETS}
    best = {(n, b): min(1.0, p["relevant"].sum() / max(round(b * p["size"]), 1))
            for n, p in pools.items() for b in BUDGETS}
    rows.append(_row("random (expected)", "-", expected, None, pools))
    rows.append(_row("best possible", "-", best, None, pools))
    return rows, encs, train_ids


def run(quick: bool, *, per_class: int | None = None, digits_per_class: int | None = None,
        target_per_class: int = 60, epochs: int = 20, resolution: int = 64, backbone: str = DEFAULT_BACKBONE,
        moco_epochs: int = 40, moco_width: int = MOCO_WIDTH, moco_stem: str = MOCO_STEM, encoders=ENCODERS,
        references: bool = True, seed: int = 0, device: str = "auto", work: str | None = None, threads: int = 1,
        pixel_members: int = 1, pixel_colour: str = "none", pixel_views: int = 1):
    """The table: one row per (method, encoder) and per reference; columns are the precision
    at each budget on each pool. Sizes: ``SIZES[quick]`` unless ``per_class`` /
    ``digits_per_class`` are given. ``moco_width`` / ``moco_stem``: the moco encoder's ResNet-18
    layout (:func:`moco_layout`). ``pixel_members``, ``pixel_colour``, ``pixel_views``: the pixel
    classifier's ensemble size, colour steps and test-time views (:func:`pixel_variant`).

    ``threads``: torch's intra-op threads while the suite runs (restored after). One by
    default: on the shared 2-core development machine, two made the domain classifier's
    small steps 5-10x slower (16 s against 3.2 s for the linear one on 900 x 512 embeddings,
    96 s against 8.8 s for the MLP; threads waiting for each other).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        return _run(quick, per_class=per_class, digits_per_class=digits_per_class,
                    target_per_class=target_per_class, epochs=epochs, resolution=resolution, backbone=backbone,
                    moco_epochs=int(moco_epochs), moco_model=moco_layout(moco_width, moco_stem), encoders=encoders,
                    references=references, seed=seed, device=device, work=work, threads=int(threads),
                    pixel_members=int(pixel_members), pixel_colour=str(pixel_colour), pixel_views=int(pixel_views))
    finally:
        torch.set_num_threads(before)


def _run(quick: bool, *, per_class, digits_per_class, target_per_class, epochs, resolution, backbone, moco_epochs,
         moco_model, encoders, references, seed, device, work, threads, pixel_members, pixel_colour,
         pixel_views) -> Rows:
    from filterx.io.dataset import Dataset
    from filterx.stages.shard import ShardConfig, shard

    chosen = check_encoders(encoders)
    sizes = dict(SIZES[bool(quick)])
    sizes.update({k: v for k, v in (("per_class", per_class), ("digits_per_class", digits_per_class))
                  if v is not None})
    t0 = time.perf_counter()
    with workdir(work, "filterx-selection-") as root:
        target = root / "target"
        make_target(root / "raw-target", target_per_class=target_per_class, seed=seed)
        shard(ShardConfig(root / "raw-target" / "target", target, shard_size=500, workers=2, quiet=True))
        pools = {}
        for name in POOLS:
            src = make_pool(root / f"raw-{name}", name, seed=seed, **sizes)
            shard(ShardConfig(src, root / name, shard_size=500, workers=2, quiet=True))
            ds = Dataset.open(root / name)
            relevant = relevant_mask(ds.labels, [c.name for c in ds.classes])
            pools[name] = {"ds": root / name, "relevant": relevant, "size": int(ds.num_samples)}
        data_s = time.perf_counter() - t0
        log("pools " + ", ".join(f"{n} {p['size']} ({p['relevant'].sum()} relevant)" for n, p in pools.items())
            + f"; made and sharded in {data_s:.0f}s")
        rows, encs, train_ids = evaluate(root, target, pools, chosen, backbone=backbone, epochs=epochs,
                                         resolution=resolution, moco_epochs=moco_epochs, references=references,
                                         moco_model=moco_model, seed=seed, device=device,
                                         pixel_members=pixel_members, pixel_colour=pixel_colour,
                                         pixel_views=pixel_views)
        n_target = len(Dataset.open(target).labels)
    total = time.perf_counter() - t0
    notes = ["pools (images, relevant, share): " + "; ".join(
                 f"{n} {p['size']}, {int(p['relevant'].sum())}, {p['relevant'].mean():.1%}" for n, p in pools.items())
             + f" (per_class {sizes['per_class']} for photos and textures, {sizes['digits_per_class']} per digit class)",
             f"target: {n_target} images of digits 0-4 ({len(train_ids)} in the encoders' training split, "
             f"which the references use too)",
             "seconds: score + select over the three pools (references: fitting and scoring, all four together)",
             *run_notes(encs, total=total, data_s=data_s, threads=threads, seed=seed)]
    return Rows(rows, notes)


def run_notes(encs: dict, *, total: float, data_s: float, threads: int, seed: int) -> list[str]:
    """The notes every selection table ends with: the encoders (held-out accuracy, times), the
    methods not run and why, the wall time."""
    return [*(f"encoder {e['label']}: held-out accuracy {_accuracies(e['val_accs'])}; trained in "
              f"{e['seconds']:.0f}s, pools embedded in {e['embed_seconds']:.0f}s" for e in encs.values()),
            *(f"not run: {m}: {why}" for m, why in NOT_RUN.items()),
            f"wall time {total:.0f}s (data {data_s:.0f}s), {threads} torch thread(s), seed {seed}"]
