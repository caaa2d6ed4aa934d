import json
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import BAD_IMAGES, GOOD_IMAGES
from filterx import tario
from filterx.atomic import LockedError, run_lock
from filterx.dataset import Dataset
from filterx.shard import ShardConfig, list_file, shard


def test_counts_report_and_classes(dataset_dir):
    ds = Dataset.open(dataset_dir)
    assert ds.num_samples == GOOD_IMAGES
    assert ds.shard_counts == [5] * (GOOD_IMAGES // 5) + ([GOOD_IMAGES % 5] if GOOD_IMAGES % 5 else [])
    assert [c.name for c in ds.classes] == ["class 0 é", "class 1 é", "class 2 é", "empty class"]
    report = json.loads((dataset_dir / "shard_report.json").read_text())
    bad = {r["path"]: r["reason"] for r in report["skipped_inputs"]}
    assert len(bad) == BAD_IMAGES
    assert set(bad) == {"class 1 é/truncated.jpg", "class 2 é/corrupt.jpg", "class 2 é/zero.jpg", "class 2 é/notes.jpg"}
    assert bad["class 2 é/zero.jpg"] == "empty file"
    assert "truncated" in bad["class 1 é/truncated.jpg"]
    assert report["empty_classes"] == ["empty class"]
    assert report["reencoded"] == 2  # the PNG and the CMYK JPEG
    # ids are dense, keys are the ids, labels follow the folders
    assert list(ds.keys) == [tario.sample_key(i) for i in range(ds.num_samples)]
    assert np.bincount(ds.labels, minlength=4).tolist() == [10, 9, 8, 0]


def test_tars_hold_original_bytes_and_readable_by_webdataset(dataset_dir, image_folder):
    ds = Dataset.open(dataset_dir)
    seen = {}
    for s in range(ds.num_shards):
        for sample in wds.WebDataset(str(ds.shard_path(s)), shardshuffle=False):
            seen[int(sample["__key__"])] = sample
    assert sorted(seen) == list(range(ds.num_samples))
    for i, sample in seen.items():
        meta = json.loads(sample["json"])
        assert int(sample["cls"]) == ds.labels[i] == meta["label"]
        assert meta["path"] == ds.paths[i]
        src = (image_folder / meta["path"]).read_bytes()
        if meta["path"].endswith(("as png.png", "cmyk.jpg")):
            im = Image.open(__import__("io").BytesIO(sample["jpg"]))
            assert (im.format, im.mode) == ("JPEG", "RGB")
        else:
            assert sample["jpg"] == src  # no re-encode


def test_dali_index_points_at_member_data(dataset_dir):
    ds = Dataset.open(dataset_dir)
    for s in range(ds.num_shards):
        entries = tario.read_index(ds.index_path(s))
        with tarfile.open(ds.shard_path(s)) as tar:
            for e in entries:
                assert tar.extractfile(f"{e.key}.{e.ext}").read() == next(tario.read_members(ds.shard_path(s), [e]))[1]
        assert tario.scan_tar(ds.shard_path(s)) == entries


def test_parallel_workers_give_the_same_dataset(image_folder, dataset_dir, tmp_path):
    shard(ShardConfig(image_folder, tmp_path / "par", shard_size=5, workers=2, quiet=True))
    a, b = Dataset.open(dataset_dir), Dataset.open(tmp_path / "par")
    assert a.fingerprint == b.fingerprint
    assert all(a.shard_path(s).read_bytes() == b.shard_path(s).read_bytes() for s in range(a.num_shards))


def test_list_file_with_names_and_a_missing_path(image_folder, tmp_path):
    lst = tmp_path / "list.txt"
    files = sorted(p for p in (image_folder / "class 0 é").glob("img_*.jpg"))[:3]
    lines = [f"{p},mug" for p in files] + [f"{files[0]},cup", "does/not/exist.jpg,cup", "# comment", ""]
    lst.write_text("\n".join(lines))
    items, classes, _ = list_file(lst)
    assert classes == ["cup", "mug"] and len(items) == 5
    s = shard(ShardConfig(lst, tmp_path / "out", workers=1, quiet=True))
    assert s.num_samples == 4 and s.skipped == 1
    report = json.loads((tmp_path / "out" / "shard_report.json").read_text())
    assert report["skipped_inputs"][0]["path"] == "does/not/exist.jpg"
    assert "cannot read" in report["skipped_inputs"][0]["reason"]


def test_resize_short(image_folder, tmp_path):
    shard(ShardConfig(image_folder, tmp_path / "small", shard_size=50, resize_short=32, workers=1, quiet=True))
    ds = Dataset.open(tmp_path / "small")
    for sample in wds.WebDataset(str(ds.shard_path(0)), shardshuffle=False):
        im = Image.open(__import__("io").BytesIO(sample["jpg"]))
        assert min(im.size) == 32


def test_user_errors(image_folder, dataset_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shard(ShardConfig(tmp_path / "nope", tmp_path / "o"))
    with pytest.raises(ValueError, match="already holds a dataset"):
        shard(ShardConfig(image_folder, dataset_dir, quiet=True))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="no class sub-folders"):
        shard(ShardConfig(tmp_path / "flat", tmp_path / "o2"))
    with pytest.raises(ValueError, match="shard size"):
        shard(ShardConfig(image_folder, tmp_path / "o3", shard_size=0))


def test_concurrent_run_is_refused(image_folder, tmp_path):
    with run_lock(tmp_path / "out", "shard"):
        with pytest.raises(LockedError, match=str(os.getpid())):
            shard(ShardConfig(image_folder, tmp_path / "out", workers=1, quiet=True))


def test_truncated_tar_is_detected_and_missing_index_rebuilt(dataset_copy):
    ds = Dataset.open(dataset_copy)
    idx = ds.index_path(1)
    original = idx.read_text()
    idx.unlink()
    assert ds.ensure_indexes() == [1]
    assert idx.read_text() == original
    tar = ds.shard_path(2)
    tar.write_bytes(tar.read_bytes()[:1500])
    with pytest.raises(ValueError, match="not a complete tar"):
        tario.scan_tar(tar)
