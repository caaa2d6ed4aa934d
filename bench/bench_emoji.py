"""emoji: the selection suite's methods and encoders on real images new to filterx.

    python -m bench --suite emoji [--quick] [--opt emoji.category="Food & Drink"] [--opt emoji.work=DIR]

One pool of real drawings with a known relevant part (``bench/emoji_pool.py``): the base emoji
of four artists (Apple, Google, Twitter, Facebook; 7,590 images) and a target of one Unicode
category drawn by a fifth (EmojiOne; "Animals & Nature" by default: 114 images in 8
subcategories, its labels). Relevant: the pool images of that category, the target's object
categories drawn by other artists (634, 8.4 %). With ``--quick`` the pool holds two artists'
images (Apple, Google), with the same relevant share. The images are fetched once with
``npm pack`` (``emoji-datasource-*``) into the bench's data cache.

Everything else is the selection suite's (``bench/bench_selection.py``), unchanged: the same
encoders (``target``: a ResNet-18 trained on the target's training split, 64 px, 20 epochs;
``backbone``; ``moco``: MoCo v2 on the pool and the target, 32 px; ``moco-ft``), the same
methods with the same settings, the pixel domain classifier, the scikit-learn references on
16x16 pixels, the precision at 6 % and 12 % of the pool. Nothing in filterx was chosen on this
pool; the selection suites' ``moco + pixels`` fusion row was, on "Animals & Nature" (README,
"Selection quality").
"""

from __future__ import annotations

import time

from bench import emoji_pool
from bench.bench_selection import (DEFAULT_BACKBONE, ENCODERS, MOCO_RESOLUTION, MOCO_STEM, MOCO_WIDTH, check_encoders,
                                   evaluate, log, moco_layout, run_notes)
from bench.suite import Rows, option_tuple, workdir

QUICK_VENDORS = ("apple", "google")


def run(quick: bool, *, category: str = emoji_pool.TARGET_CATEGORY, vendors=None, epochs: int = 20,
        resolution: int = 64, backbone: str = DEFAULT_BACKBONE, moco_epochs: int = 40,
        moco_resolution: int = MOCO_RESOLUTION, moco_width: int = MOCO_WIDTH, moco_stem: str = MOCO_STEM,
        encoders=ENCODERS,
        references: bool = True, seed: int = 0, device: str = "auto", work: str | None = None,
        threads: int = 1, pixel_members: int = 1, pixel_colour: str = "none", pixel_views: int = 1) -> Rows:
    """The table: one row per (method, encoder) and per reference, columns the precision at
    each budget on the pool. ``vendors``: the pool's artists (default all four, two with
    ``quick``); ``moco_width`` / ``moco_stem``: the moco encoder's layout
    (``bench_selection.moco_layout``); ``threads``: torch's intra-op threads while it runs (as in
    the selection suite); ``pixel_members``, ``pixel_colour``, ``pixel_views``: the pixel
    classifier's ensemble size, colour steps and test-time views (``bench_selection.pixel_variant``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        return _run(quick, category=category, vendors=vendors, epochs=epochs, resolution=resolution,
                    backbone=backbone, moco_epochs=int(moco_epochs), moco_resolution=int(moco_resolution),
                    moco_model=moco_layout(moco_width, moco_stem),
                    encoders=encoders, references=references, seed=seed, device=device, work=work,
                    threads=int(threads), pixel_members=int(pixel_members), pixel_colour=str(pixel_colour),
                    pixel_views=int(pixel_views))
    finally:
        torch.set_num_threads(before)


def _run(quick, *, category, vendors, epochs, resolution, backbone, moco_epochs, moco_resolution, moco_model, encoders,
         references, seed, device, work, threads, pixel_members, pixel_colour, pixel_views) -> Rows:
    from bench.images import default_data_dir
    from filterx.io.dataset import Dataset
    from filterx.stages.shard import ShardConfig, shard

    chosen = check_encoders(encoders)
    vendors = option_tuple(vendors) if vendors else (QUICK_VENDORS if quick else emoji_pool.POOL_VENDORS)
    t0 = time.perf_counter()
    packages = emoji_pool.fetch(default_data_dir() / "emoji")
    with workdir(work, "filterx-emoji-") as root:
        target = root / "target"
        emoji_pool.make_target(packages, root / "raw-target", category)
        shard(ShardConfig(root / "raw-target", target, shard_size=1000, workers=2, quiet=True))
        emoji_pool.make_pool(packages, root / "raw-pool", vendors)
        shard(ShardConfig(root / "raw-pool", root / "emoji", shard_size=1000, workers=2, quiet=True))
        ds = Dataset.open(root / "emoji")
        relevant = emoji_pool.relevant_mask(ds.labels, [c.name for c in ds.classes], category)
        n_pool = int(ds.num_samples)
        pools = {"emoji": {"ds": root / "emoji", "relevant": relevant, "size": n_pool}}
        data_s = time.perf_counter() - t0
        log(f"pool emoji {n_pool} ({int(relevant.sum())} relevant); made and sharded in {data_s:.0f}s")
        rows, encs, train_ids = evaluate(root, target, pools, chosen, backbone=backbone, epochs=epochs,
                                         resolution=resolution, moco_epochs=moco_epochs, references=references,
                                         moco_resolution=moco_resolution, moco_model=moco_model, seed=seed,
                                         device=device, pixel_members=pixel_members, pixel_colour=pixel_colour,
                                         pixel_views=pixel_views)
        tds = Dataset.open(target)
        n_target, target_classes = len(tds.labels), [c.name for c in tds.classes]
    total = time.perf_counter() - t0
    notes = [f"pool: {', '.join(vendors)} (emoji-datasource {emoji_pool.POOL_VERSION}), {n_pool} images, "
             f"{int(relevant.sum())} relevant ({relevant.mean():.1%}): category {category!r}",
             f"target: {n_target} images of {category!r} by {emoji_pool.TARGET_VENDOR} (emoji-datasource-"
             f"{emoji_pool.TARGET_VENDOR} {emoji_pool.TARGET_VERSION}), {len(target_classes)} classes "
             f"({', '.join(target_classes)}); {len(train_ids)} in the encoders' training split, which the "
             f"references use too",
             "seconds: score + select (references: fitting and scoring, all four together)",
             *run_notes(encs, total=total, data_s=data_s, threads=threads, seed=seed)]
    return Rows(rows, notes)
