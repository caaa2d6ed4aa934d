"""score --method domain-cls --on pixels: a CNN domain classifier on decoded images. It ranks
target-like pool images first, trains on balanced batches with the target oversampled, resumes a
killed pool pass from its work store with bit-identical scores, and refuses bad options in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import zarr

from filterx.core.faults import CRASH_EXIT
from filterx.decode.loader import LoaderConfig
from filterx.io.dataset import Dataset
from filterx.scorers import resolve_scorer
from filterx.scorers.domain_pixels import balanced_half
from filterx.stages.score import ScoreConfig, list_scores, read_scores, score, work_path

pytestmark = pytest.mark.usefixtures("one_thread")

# 32 px, a ResNet-18 of 1/16 the compute, 30 steps of 16 pool + 16 target images.
FAST = {"on": "pixels", "resolution": 32, "width": 16, "steps": 30}
KW = dict(device="cpu", backend="pil", batch_size=32, workers=0, quiet=True)


@pytest.fixture(scope="module")
def camera_dirs(tmp_path_factory):
    """The tiny sample data with the pool's digits drawn like the target's (the "easy" pool:
    all 120 pool digits are target-like, the 72 photos and textures are not): (source, target)."""
    from filterx.io.sampledata import make_sample_data
    from filterx.stages.shard import ShardConfig, shard

    root = tmp_path_factory.mktemp("camera")
    data = make_sample_data(root / "data", per_class=12, target_per_class=10, photos=3, textures=3,
                            size_range=(40, 48), digit_style="camera")
    shard(ShardConfig(data.source, root / "source", shard_size=40, workers=1, quiet=True))
    shard(ShardConfig(data.target, root / "target", shard_size=20, workers=1, quiet=True))
    return root / "source", root / "target"


def _digits(ds: Dataset) -> np.ndarray:
    names = [c.name for c in ds.classes]
    return np.array([names[label].startswith("digit") for label in ds.labels])


@pytest.mark.parametrize("layout", [{}, {"stem": "small"}, {"colour": "jitter"}, {"views": 4}],
                         ids=["imagenet-stem", "small-stem", "colour-jitter", "four-views"])
def test_target_like_pool_images_score_first(camera_dirs, tmp_path, layout):
    from sklearn.metrics import roc_auc_score

    src = tmp_path / "source"
    shutil.copytree(camera_dirs[0], src)
    s = score(ScoreConfig("domain-cls", src, camera_dirs[1], None, {**FAST, **layout}, name="dp", **KW))
    ds = Dataset.open(src)
    scores, attrs = read_scores(ds, "dp")
    assert np.isfinite(scores).all() and scores.std() > 0
    digits = _digits(ds)
    assert digits.mean() == pytest.approx(0.625)
    # measured (seed 0, one thread): AUC 0.93, 94% digits among the top quarter against 62% overall
    assert roc_auc_score(digits, scores) > 0.8
    top = np.argsort(-scores, kind="stable")[: len(scores) // 4]
    assert digits[top].mean() > 0.85
    assert attrs["params"]["on"] == "pixels" and attrs["params"]["width"] == 16 and attrs["encoder"] is None
    assert attrs["params"].get("stem") == layout.get("stem")
    assert attrs["params"]["colour"] == layout.get("colour", "none")
    assert attrs["params"]["views"] == layout.get("views", 1)
    assert s.attrs["trained"] and s.attrs["shards_scored"] == ds.num_shards and s.attrs["shards_reused"] == 0
    assert 0.5 < s.attrs["train_accuracy"] <= 1.0 and s.attrs["bad_training_samples"] == 0
    assert not work_path(ds, "dp").exists() and list_scores(ds) == ["dp"]


def test_batches_are_balanced_and_the_small_side_oversampled(camera_dirs):
    target = Dataset.open(camera_dirs[1])
    cfg = LoaderConfig(resolution=16, backend="pil", batch_size=7, workers=0, train=True, shuffle=True, seed=3)
    stream = balanced_half(target.tar_paths(), cfg, 16)
    batches = [next(stream) for _ in range(10)]  # 160 images: 3.2 epochs of the 50 target images
    assert all(len(ids) == 16 and images.shape == (16, 3, 16, 16) for ids, images in batches)
    counts = Counter(np.concatenate([ids.numpy() for ids, _ in batches]).tolist())
    assert set(counts) == set(range(target.num_samples))  # each epoch is a permutation of the target
    assert set(counts.values()) <= {3, 4}
    first = np.concatenate([ids.numpy() for ids, _ in batches[:4]])[:50]
    assert sorted(first.tolist()) == list(range(50)) and first.tolist() != list(range(50))  # shuffled


def test_colour_steps_act_on_the_images_the_loader_normalised():
    """colour="gray": about half of a batch in grayscale (equal channels once the loader's
    normalisation is undone), the rest as they were; "jitter" changes colours too; both stay
    normalised images in [0, 1] before normalisation, and the draws follow the generator's seed."""
    import torch

    from filterx.scorers.domain_pixels import COLOURS, _recoloured

    cfg = LoaderConfig(resolution=16)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    images01 = torch.rand(200, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x = (images01 - mean) / std
    assert COLOURS["none"] is None

    def undo(y):
        return y * std + mean

    gray = undo(_recoloured(x, COLOURS["gray"], torch.Generator().manual_seed(1), cfg))
    spread = gray.amax(1) - gray.amin(1)  # (n, H, W): 0 where the three channels are equal
    is_gray = spread.amax((1, 2)) < 1e-5
    assert 70 < int(is_gray.sum()) < 130
    torch.testing.assert_close(gray[~is_gray], images01[~is_gray], atol=1e-5, rtol=0)
    luma = (images01[is_gray] * torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    torch.testing.assert_close(gray[is_gray][:, 0], luma, atol=1e-5, rtol=0)
    jitter = undo(_recoloured(x, COLOURS["jitter"], torch.Generator().manual_seed(1), cfg))
    assert jitter.min() > -1e-5 and jitter.max() < 1 + 1e-5
    changed = (jitter - images01).abs().amax((1, 2, 3)) > 1e-3
    assert int(changed.sum()) > 150  # jitter (p 0.8) or grayscale (p 0.5): about 9 in 10
    again = undo(_recoloured(x, COLOURS["jitter"], torch.Generator().manual_seed(1), cfg))
    torch.testing.assert_close(again, jitter, atol=0, rtol=0)
    # "jitter" is the small-image MoCo views' colour steps, values and all
    from filterx.train.moco_views import SMALL_IMAGE_VIEWS, colour_steps, moco_augment
    assert COLOURS["jitter"] == colour_steps(moco_augment(SMALL_IMAGE_VIEWS))
    assert COLOURS["jitter"].jitter == (0.8, 0.8, 0.8, 0.2) and COLOURS["jitter"].gray_p == 0.5


@pytest.mark.parametrize("backend,workers", [("pil", 0), ("torchvision", 2)])
def test_views_pair_each_image_with_its_whole_frame_and_average_the_mirrors(camera_dirs, backend, workers):
    """views 4: each pool image's centre crop (the loader's evaluation image) and whole frame side by
    side, paired by id whatever order two loaders deliver them in; the score is the mean logit over
    the two and their mirrors (views 2: the centre crop and its mirror; 1: the centre crop)."""
    import torch

    from filterx.decode.loader import load_batches
    from filterx.models.archs import build_model
    from filterx.scorers.domain_pixels import _view_logits, view_batches

    source = Dataset.open(camera_dirs[0])
    cfg = LoaderConfig(resolution=32, backend=backend, batch_size=16, workers=workers)

    def by_id(batches):
        return {i: x for b in batches for i, x in zip(b.ids.tolist(), b.images)}

    centre, whole = by_id(load_batches(source.tar_paths(), cfg)), by_id(
        load_batches(source.tar_paths(), LoaderConfig(resolution=32, backend=backend, batch_size=16, workers=workers,
                                                      crop_fraction=1.0)))
    paired = by_id(view_batches(source.tar_paths(), cfg, 4))
    assert sorted(paired) == list(range(source.num_samples))
    for i, x in paired.items():
        assert x.shape == (6, 32, 32)
        torch.testing.assert_close(x[:3], centre[i], atol=0, rtol=0)
        torch.testing.assert_close(x[3:], whole[i], atol=0, rtol=0)
    assert not torch.equal(paired[0][:3], paired[0][3:])  # the crop is not the whole frame
    assert by_id(view_batches(source.tar_paths(), cfg, 2)).keys() == centre.keys()

    torch.manual_seed(0)
    model = build_model("resnet18", 1, width=4).eval()
    x = torch.stack([paired[i] for i in range(8)])
    with torch.inference_mode():
        def one(v):
            return model(v).squeeze(1)
        four = (one(x[:, :3]) + one(x[:, :3].flip(3)) + one(x[:, 3:]) + one(x[:, 3:].flip(3))) / 4
        torch.testing.assert_close(_view_logits(model, x, 4), four, atol=1e-5, rtol=1e-5)
        centres = x[:, :3].contiguous()
        torch.testing.assert_close(_view_logits(model, centres, 2), (one(centres) + one(centres.flip(3))) / 2,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_view_logits(model, centres, 1), one(centres), atol=0, rtol=0)
        assert not torch.allclose(four, one(centres), atol=1e-4)


def test_on_chooses_the_variant():
    scorer, params, chosen = resolve_scorer("domain-cls", {"on": "pixels", "steps": 5})
    assert scorer.name == "domain-cls/pixels" and scorer.kind == "streaming"
    assert params == {"steps": 5} and chosen == {"on": "pixels"}
    assert resolve_scorer("domain-cls", {"on": "embeddings"})[0].name == "domain-cls"
    with pytest.raises(ValueError, match="unknown domain-cls on 'rgb'; valid: embeddings, pixels"):
        resolve_scorer("domain-cls", {"on": "rgb"})


@pytest.mark.parametrize("params, kw, message", [
    ({"arch": "vgg"}, {}, "unknown arch 'vgg'; valid: alexnet_lrn, resnet18"),
    ({"steps": 0}, {}, "steps must be >= 1, got 0"),
    ({"members": 0}, {}, "members must be >= 1, got 0"),
    ({"colour": "sepia"}, {}, "unknown colour 'sepia'; valid: none, gray, jitter, mixed"),
    ({"colour": "mixed"}, {}, r"colour mixed takes --members >= 2 \(member m takes none, gray, jitter in turn\)"),
    ({"views": 3}, {}, r"views must be 1, 2 or 4 \(1: the centre crop; 2: the centre crop and its mirror; "),
    ({"width": 8, "arch": "alexnet_lrn"}, {}, "bad options {'width': 8} for alexnet_lrn"),
    ({"stem": "tiny"}, {}, "unknown stem 'tiny'; valid: imagenet, small"),
    ({"stem": "small", "width": None, "arch": "alexnet_lrn"}, {}, "bad options {'stem': 'small'} for alexnet_lrn"),
    ({"model": "mlp"}, {}, r"takes no parameter\(s\) \['model'\]"),
    ({}, {"batch_size": 15}, "--batch-size must be even and >= 2"),
    ({}, {"candidates": "target-train"}, "scores the pool"),
])
def test_bad_options_give_one_clear_error(camera_dirs, tmp_path, params, kw, message):
    src = tmp_path / "source"
    shutil.copytree(camera_dirs[0], src)
    with pytest.raises(ValueError, match=message):
        score(ScoreConfig("domain-cls", src, camera_dirs[1], None, {**FAST, **params}, **{**KW, **kw}))
    assert list_scores(Dataset.open(src)) == []


def _cli(source, target, *extra, crash_at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FILTERX_CRASH_AT", None)
    if crash_at:
        env["FILTERX_CRASH_AT"] = crash_at
    cmd = [sys.executable, "-m", "filterx", "score", "--method", "domain-cls", "--on", "pixels", "--source",
           str(source), "--target", str(target), "--resolution", "32", "--width", "8", "--steps", "8",
           "--backend", "pil", "--device", "cpu", "--batch-size", "16", "--workers", "0", "--json", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _summary(run) -> dict:
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_killed_pool_pass_resumes_bit_identically_from_the_cli(camera_dirs, tmp_path):
    clean_src, src = tmp_path / "clean", tmp_path / "source"
    shutil.copytree(camera_dirs[0], clean_src)
    shutil.copytree(camera_dirs[0], src)
    clean = _summary(_cli(clean_src, camera_dirs[1]))
    assert clean["attrs"]["trained"] and clean["attrs"]["shards_reused"] == 0
    clean_scores, clean_attrs = read_scores(Dataset.open(clean_src), "domain-cls")
    assert clean_attrs["params"]["on"] == "pixels" and clean_attrs["params"]["steps"] == 8

    ds = Dataset.open(src)
    assert ds.num_shards >= 3
    killed = _cli(src, camera_dirs[1], crash_at="domain.shard:2")
    assert killed.returncode == CRASH_EXIT, killed.stderr[-3000:]
    work = work_path(ds, "domain-cls")
    store = zarr.open_group(work, mode="r")
    assert store["done"][:].tolist() == [True, True] + [False] * (ds.num_shards - 2)
    done_rows = sum(ds.shard_counts[:2])
    np.testing.assert_array_equal(store["scores"][:done_rows], clean_scores[:done_rows])
    assert np.isnan(store["scores"][done_rows:]).all() and "classifier_0" in store
    assert list_scores(ds) == []

    resumed = _cli(src, camera_dirs[1])
    summary = _summary(resumed)
    assert not summary["attrs"]["trained"] and "reusing the classifier" in resumed.stderr
    assert summary["attrs"]["shards_reused"] == 2 and summary["attrs"]["shards_scored"] == ds.num_shards - 2
    scores, _ = read_scores(ds, "domain-cls")
    np.testing.assert_array_equal(scores, clean_scores)
    assert summary["attrs"]["train_loss"] == clean["attrs"]["train_loss"]
    assert not work.exists()


class _Killed(Exception):
    pass


def test_other_settings_do_not_reuse_stale_work(camera_dirs, tmp_path, monkeypatch):
    import filterx.scorers.domain_pixels as dp

    src = tmp_path / "source"
    shutil.copytree(camera_dirs[0], src)
    ds = Dataset.open(src)
    params = {**FAST, "width": 8, "steps": 4}

    def kill(point):
        raise _Killed

    monkeypatch.setattr(dp, "crash_point", kill)
    with pytest.raises(_Killed):
        score(ScoreConfig("domain-cls", src, camera_dirs[1], None, params, **KW))
    monkeypatch.undo()
    store = zarr.open_group(work_path(ds, "domain-cls"), mode="r+")
    assert store["done"][:].sum() == 1
    store["scores"][: ds.shard_counts[0]] = 1e9  # rows a reuse would carry into the result
    s = score(ScoreConfig("domain-cls", src, camera_dirs[1], None, {**params, "steps": 5}, **KW))
    assert s.attrs["trained"] and s.attrs["shards_reused"] == 0 and s.attrs["shards_scored"] == ds.num_shards
    scores, attrs = read_scores(ds, "domain-cls")
    assert np.abs(scores).max() < 1e8 and attrs["params"]["steps"] == 5


def test_members_average_the_single_classifiers_at_consecutive_seeds(camera_dirs, tmp_path, monkeypatch):
    """members=2 at seed 3 is the mean logit of the single classifiers at seeds 3 and 4; a killed
    ensemble run keeps every member's weights and resumes to the same scores."""
    import filterx.scorers.domain_pixels as dp

    src = tmp_path / "source"
    shutil.copytree(camera_dirs[0], src)
    ds = Dataset.open(src)
    params = {**FAST, "width": 8, "steps": 6}
    singles = []
    for seed in (3, 4):
        score(ScoreConfig("domain-cls", src, camera_dirs[1], None, params, seed, name=f"single{seed}", **KW))
        singles.append(read_scores(ds, f"single{seed}")[0])
    assert not np.allclose(singles[0], singles[1])  # the members differ

    def kill(point):
        raise _Killed

    monkeypatch.setattr(dp, "crash_point", kill)
    with pytest.raises(_Killed):
        score(ScoreConfig("domain-cls", src, camera_dirs[1], None, {**params, "members": 2}, 3, name="ens", **KW))
    monkeypatch.undo()
    store = zarr.open_group(work_path(ds, "ens"), mode="r")
    assert {"classifier_0", "classifier_0_1"} <= set(store.array_keys()) and store["done"][:].sum() == 1
    s = score(ScoreConfig("domain-cls", src, camera_dirs[1], None, {**params, "members": 2}, 3, name="ens", **KW))
    assert not s.attrs["trained"] and s.attrs["shards_reused"] == 1 and len(s.attrs["training"]) == 2
    scores, attrs = read_scores(ds, "ens")
    assert attrs["params"]["members"] == 2
    np.testing.assert_allclose(scores, np.mean(singles, axis=0), rtol=1e-5, atol=1e-6)


def test_mixed_colour_members_are_the_single_classifiers_of_each_colour(camera_dirs, tmp_path):
    """colour=mixed, members=3 at seed 3: the mean logit of single classifiers at seeds 3, 4, 5
    trained with colour none, gray and jitter; the colour steps change what a classifier learns."""
    src = tmp_path / "source"
    shutil.copytree(camera_dirs[0], src)
    ds = Dataset.open(src)
    params = {**FAST, "width": 8, "steps": 6}
    singles = []
    for seed, colour in ((3, "none"), (4, "gray"), (5, "jitter")):
        name = f"single{seed}"
        score(ScoreConfig("domain-cls", src, camera_dirs[1], None, {**params, "colour": colour}, seed, name=name, **KW))
        singles.append(read_scores(ds, name)[0])
    score(ScoreConfig("domain-cls", src, camera_dirs[1], None, {**params, "colour": "none"}, 4, name="plain4", **KW))
    assert not np.allclose(read_scores(ds, "plain4")[0], singles[1])  # gray at seed 4 is not none at seed 4
    score(ScoreConfig("domain-cls", src, camera_dirs[1], None, {**params, "members": 3, "colour": "mixed"}, 3,
                      name="mixed", **KW))
    scores, attrs = read_scores(ds, "mixed")
    assert attrs["params"]["colour"] == "mixed" and attrs["params"]["members"] == 3
    np.testing.assert_allclose(scores, np.mean(singles, axis=0), rtol=1e-5, atol=1e-6)


def test_cli_errors_are_one_line(camera_dirs, tmp_path):
    from click.testing import CliRunner

    from filterx.cli import main

    src = tmp_path / "source"
    shutil.copytree(camera_dirs[0], src)
    runner = CliRunner()
    base = ["score", "--method", "domain-cls", "--source", str(src)]
    bad_on = runner.invoke(main, [*base, "--target", str(camera_dirs[1]), "--on", "rgb"])
    assert bad_on.exit_code == 2 and "'rgb' is not one of 'embeddings', 'pixels'" in bad_on.output
    no_target = runner.invoke(main, [*base, "--on", "pixels"])
    assert no_target.exit_code != 0 and "needs --target" in no_target.output
    assert "Traceback" not in no_target.output
    help_text = runner.invoke(main, ["score", "--help"]).output
    assert "--on [embeddings|pixels]" in help_text and "--width" in help_text and "--stem [imagenet|small]" in help_text
    assert "--members" in help_text and "--colour [none|gray|jitter|mixed]" in help_text and "--views" in help_text
    bad_stem = runner.invoke(main, [*base, "--target", str(camera_dirs[1]), "--on", "pixels", "--stem", "tiny"])
    assert bad_stem.exit_code == 2 and "'tiny' is not one of 'imagenet', 'small'" in bad_stem.output
