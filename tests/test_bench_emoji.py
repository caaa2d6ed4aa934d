"""bench: the emoji pool (real drawings by five artists) built from packages laid out as
emoji-datasource ships them, here made small and local (no network)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from bench import emoji_pool

# (unified code, category, subcategory, colour): what the pool's emoji.json lists
POOL_EMOJI = [
    ("1F415", "Animals & Nature", "animal-mammal", (150, 90, 40)),
    ("1F408", "Animals & Nature", "animal-mammal", (230, 160, 40)),
    ("1F426", "Animals & Nature", "animal-bird", (60, 120, 220)),
    ("1F577-FE0F", "Animals & Nature", "animal-bug", (30, 30, 30)),
    ("1F528", "Objects", "tool", (120, 120, 120)),
    ("1F4CE", "Objects", "office", (180, 180, 200)),
    ("2702-FE0F", "Objects", "office", (200, 40, 40)),
]


def _png(path, colour, seed):
    """A 64x64 RGBA drawing: a disc of ``colour`` on transparent pixels that hold noise."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 < 20 ** 2
    a[..., 3] = np.where(disc, 255, 0)
    a[disc, :3] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "RGBA").save(path)


def _entry(code, category, sub, vendors):
    e = {"unified": code, "non_qualified": code.replace("-FE0F", "") if "FE0F" in code else None,
         "image": code.lower() + ".png", "category": category, "subcategory": sub}
    e.update({f"has_img_{v}": v in vendors for v in emoji_pool.POOL_VENDORS + (emoji_pool.TARGET_VENDOR,)})
    return e


@pytest.fixture
def packages(tmp_path):
    """The five packages as unpacked by ``emoji_pool.fetch``. Facebook lacks the bird; the
    target's package (an older emoji.json, without subcategories) writes the spider without
    its variation selector, draws no bird, and has one emoji the pool does not know."""
    cache = tmp_path / "cache"
    entries = []
    for i, (code, cat, sub, colour) in enumerate(POOL_EMOJI):
        vendors = [v for v in emoji_pool.POOL_VENDORS if not (v == "facebook" and code == "1F426")]
        entries.append(_entry(code, cat, sub, vendors))
        for k, v in enumerate(vendors):
            _png(cache / f"emoji-datasource-{v}-{emoji_pool.POOL_VERSION}" / "img" / v / "64" / entries[-1]["image"],
                 colour, seed=10 * i + k)
    for v in emoji_pool.POOL_VENDORS:
        (cache / f"emoji-datasource-{v}-{emoji_pool.POOL_VERSION}" / "emoji.json").write_text(json.dumps(entries))
    t = cache / f"emoji-datasource-emojione-{emoji_pool.TARGET_VERSION}"
    old = [{"unified": "1F415", "non_qualified": None, "image": "1f415.png", "category": "Animals & Nature",
            "has_img_emojione": True},
           {"unified": "1F577", "non_qualified": None, "image": "1f577.png", "category": "Animals & Nature",
            "has_img_emojione": True},
           {"unified": "1F408", "non_qualified": None, "image": "1f408.png", "category": "Animals & Nature",
            "has_img_emojione": False},
           {"unified": "1F999", "non_qualified": None, "image": "1f999.png", "category": "Animals & Nature",
            "has_img_emojione": True},
           {"unified": "1F528", "non_qualified": None, "image": "1f528.png", "category": "Objects",
            "has_img_emojione": True}]
    for i, e in enumerate(old):
        _png(t / "img" / "emojione" / "64" / e["image"], (200, 100 + 20 * i, 50), seed=100 + i)
    (t / "emoji.json").write_text(json.dumps(old))
    return cache


def _tree(root):
    return {d.name: sorted(f.name for f in d.iterdir()) for d in sorted(root.iterdir())}


def test_pool_target_and_relevant_part(packages, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # everything is in the cache: npm is not needed
    found = emoji_pool.fetch(packages)
    assert set(found) == set(emoji_pool.POOL_VENDORS) | {emoji_pool.TARGET_VENDOR}
    pool = _tree(emoji_pool.make_pool(found, tmp_path / "pool"))
    assert pool == {
        "animals-nature.animal-bird": ["apple-1f426.png", "google-1f426.png", "twitter-1f426.png"],
        "animals-nature.animal-bug": [f"{v}-1f577-fe0f.png" for v in ("apple", "facebook", "google", "twitter")],
        "animals-nature.animal-mammal": sorted(f"{v}-{c}.png" for v in emoji_pool.POOL_VENDORS
                                               for c in ("1f408", "1f415")),
        "objects.office": sorted(f"{v}-{c}.png" for v in emoji_pool.POOL_VENDORS for c in ("1f4ce", "2702-fe0f")),
        "objects.tool": sorted(f"{v}-1f528.png" for v in emoji_pool.POOL_VENDORS),
    }
    # the target: EmojiOne's animals that the pool knows, by subcategory (the spider matched
    # without its variation selector; the undrawn cat and the unknown 1F999 left out)
    assert _tree(emoji_pool.make_target(found, tmp_path / "target")) == {
        "animal-bug": ["1f577.png"], "animal-mammal": ["1f415.png"]}
    assert _tree(emoji_pool.make_target(found, tmp_path / "t2", "Objects")) == {"tool": ["1f528.png"]}
    names = sorted(pool)
    labels = np.array([0, 1, 2, 3, 4, -1])
    assert emoji_pool.relevant_mask(labels, names).tolist() == [True, True, True, False, False, False]
    assert emoji_pool.relevant_mask(labels, names, "Objects").tolist() == [False, False, False, True, True, False]
    assert len(_tree(emoji_pool.make_pool(found, tmp_path / "two", ("apple", "google")))["objects.tool"]) == 2


def test_refusals_name_the_bad_value(packages, tmp_path, monkeypatch):
    found = emoji_pool.fetch(packages)
    with pytest.raises(ValueError, match="unknown emoji category 'Plants'; valid: Animals & Nature, Objects"):
        emoji_pool.make_target(found, tmp_path / "t", "Plants")
    with pytest.raises(ValueError, match="unknown pool vendors \\['emojione'\\]; valid: apple, google"):
        emoji_pool.make_pool(found, tmp_path / "p", ("apple", "emojione"))
    shutil.rmtree(packages / f"emoji-datasource-google-{emoji_pool.POOL_VERSION}")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(emoji_pool.subprocess, "run", lambda *a, **k: emoji_pool.subprocess.CompletedProcess(
        a[0], 1, "", "npm notice\nnpm error code E404\nnpm error 404 Not Found - GET .../emoji-datasource-google\n"))
    with pytest.raises(RuntimeError, match="npm pack emoji-datasource-google@16.0.0 failed: npm error 404 Not Found"):
        emoji_pool.fetch(packages)
    assert not (packages / f"emoji-datasource-google-{emoji_pool.POOL_VERSION}").exists()  # nothing half-made
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="npm is not installed to fetch emoji-datasource-google@16.0.0"):
        emoji_pool.fetch(packages)


def test_shard_lays_the_drawings_over_white(packages, tmp_path):
    """The pool goes to ``shard`` as the packages ship it (RGBA PNG); its tars and the
    references' pixels both see the discs on white, not the noise under alpha 0."""
    import io

    import webdataset as wds

    from bench.selection_pools import pixel_features
    from filterx.io.dataset import Dataset
    from filterx.stages.shard import ShardConfig, shard

    src = emoji_pool.make_pool(emoji_pool.fetch(packages), tmp_path / "pool")
    shard(ShardConfig(src, tmp_path / "ds", workers=1, quiet=True))
    ds = Dataset.open(tmp_path / "ds")
    sample = next(iter(wds.WebDataset(str(ds.shard_path(0)), shardshuffle=False)))
    px = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float64)
    assert px[:6, :6].mean() > 250 and px[:6, :6].std() < 3
    feats = pixel_features([src / p for p in ds.paths], size=8)
    corners = feats.reshape(-1, 8, 8, 3)[:, 0, 0]
    np.testing.assert_allclose(corners, 1.0, atol=0.02)


def test_emoji_suite_end_to_end_at_a_tiny_size(tmp_path, monkeypatch):
    """The suite on a made-up emoji set laid out as the packages are (40 emoji, 16 of them
    animals): every method's row on one pool, the references, random's share = the relevant one."""
    from bench import bench_emoji, bench_selection

    cache = tmp_path / "data" / "emoji"
    rng = np.random.default_rng(0)
    entries, old = [], []
    for i in range(40):
        animal = i < 16
        code = f"1F{400 + i:03X}"
        e = _entry(code, "Animals & Nature" if animal else "Objects",
                   ("animal-mammal", "animal-bird")[i % 2] if animal else ("tool", "office")[i % 2],
                   emoji_pool.POOL_VENDORS)
        entries.append(e)
        colour = tuple(int(c) for c in (rng.integers(120, 256), rng.integers(0, 80), 40)) if animal else \
            tuple(int(c) for c in (40, rng.integers(0, 80), rng.integers(120, 256)))
        for k, v in enumerate(emoji_pool.POOL_VENDORS):
            _png(cache / f"emoji-datasource-{v}-{emoji_pool.POOL_VERSION}" / "img" / v / "64" / e["image"],
                 colour, seed=i * 10 + k)
        if animal:
            for j in range(3):  # the target's artist draws every animal three times over (variants)
                img = f"{code.lower()}-{j}.png"
                old.append({"unified": code, "image": img, "category": "Animals & Nature", "has_img_emojione": True})
                _png(cache / f"emoji-datasource-emojione-{emoji_pool.TARGET_VERSION}" / "img" / "emojione" / "64" / img,
                     colour, seed=1000 + 3 * i + j)
    for v in emoji_pool.POOL_VENDORS:
        (cache / f"emoji-datasource-{v}-{emoji_pool.POOL_VERSION}" / "emoji.json").write_text(json.dumps(entries))
    (cache / f"emoji-datasource-emojione-{emoji_pool.TARGET_VERSION}" / "emoji.json").write_text(json.dumps(old))
    monkeypatch.setenv("FILTERX_BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(shutil, "which", lambda name: None)  # nothing is fetched

    rows = bench_emoji.run(True, epochs=1, moco_epochs=1, encoders="target,moco", work=str(tmp_path / "work"))
    table = {(r["method"], r["encoder"]): r for r in rows}
    assert all(set(r) == {"method", "encoder", "emoji@6%", "emoji@12%", "seconds"} for r in rows)
    for enc in ("target", "moco"):
        for label, _, _ in bench_selection.variants():
            assert 0.0 <= table[(label, enc)]["emoji@6%"] <= 1.0
    assert table[("random (expected)", "-")]["emoji@6%"] == pytest.approx(32 / 80)  # two artists with --quick
    assert any(enc == "pixels 16x16 (sklearn)" for _, enc in table)
    fused = table[("rank-mean(domain-cls linear moco, domain-cls pixels)", "moco + pixels")]
    assert 0.0 <= fused["emoji@6%"] <= 1.0
    assert any("pool: apple, google" in n and "80 images, 32 relevant" in n for n in rows.notes)
    assert any("48 images of 'Animals & Nature' by emojione" in n for n in rows.notes)
