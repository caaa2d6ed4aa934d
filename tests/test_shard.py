import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import BAD_IMAGES, GOOD_IMAGES
from filterx.io import tario
from filterx.io.atomic import LockedError, run_lock
from filterx.io.dataset import Dataset
from filterx.stages.shard import ShardConfig, list_file, shard


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
    inputs = list_file(lst)
    assert inputs.class_names == ["cup", "mug"] and len(inputs.items) == 5
    assert [lab for _, lab in inputs.items] == [1, 1, 1, 0, 0]
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


# ---------------------------------------------------------------- list file labels


def _list(tmp_path, *lines: str):
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(lines) + "\n")
    return lst


def test_list_file_integer_labels_far_beyond_the_lines_are_refused(tmp_path):
    beyond = r"line 2: label 99999999 is >= the number of labelled lines \(3\).*--num-classes"
    with pytest.raises(ValueError, match=beyond):
        list_file(_list(tmp_path, "a.jpg,0", "b.jpg,99999999", "c.jpg,1"))
    with pytest.raises(ValueError, match="line 3: label 5000"):
        list_file(_list(tmp_path, "# c", "a.jpg,0", "b.jpg,5000", "c.jpg,1"))
    ok = list_file(_list(tmp_path, "a.jpg,0", "b.jpg,2", "c.jpg,1"))
    assert ok.class_names == ["0", "1", "2"] and [lab for _, lab in ok.items] == [0, 2, 1]


def test_list_file_num_classes_allows_high_labels_below_it(tmp_path):
    lst = _list(tmp_path, "a.jpg,0", "b.jpg,999", "c.jpg,7")
    got = list_file(lst, num_classes=1000)
    assert len(got.class_names) == 1000 and got.class_names[999] == "999"
    assert [lab for _, lab in got.items] == [0, 999, 7]
    with pytest.raises(ValueError, match=r"line 2: label 999 is not < --num-classes 500"):
        list_file(lst, num_classes=500)
    with pytest.raises(ValueError, match="--num-classes 3 applies to integer labels"):
        list_file(_list(tmp_path, "a.jpg,cat", "b.jpg,dog"), num_classes=3)


@pytest.mark.parametrize("lines, message", [
    (["a.jpg,1", "b.jpg,2", "c.jpg,1O", "d.jpg,3"], r"line 3: label '1O' is a class name, but 3 lines have integer"),
    (["a.jpg,1", "b.jpg,1.5", "c.jpg,0"], r"line 2: label '1.5' is a number but not a class index"),
    (["a.jpg,1", "b.jpg,-1", "c.jpg,0"], r"line 2: label '-1' is a negative number"),
    (["a.jpg,cat", "b.jpg,dog", "c.jpg,-1"], r"line 3: label '-1' is a number, but 2 lines have class names"),
    (["a.jpg,cat", "b.jpg,7", "c.jpg,dog"], r"line 2: label '7' is an integer, but 2 lines have class names"),
    (["a.jpg,1", "b.jpg,", "c.jpg,0"], r"line 2: empty label after the comma"),
    (["a.jpg,1", "b.jpg", "c.jpg,0"], r"line 2: no label, unlike line 1"),
])
def test_list_file_bad_labels_name_the_line(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message) as e:
        list_file(_list(tmp_path, *lines))
    assert "\n" not in str(e.value) and str(tmp_path / "list.txt") in str(e.value)


def test_list_file_header_line_is_skipped(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="filterx.stages.shard_inputs"):
        got = list_file(_list(tmp_path, "# made by a script", "Path,Label", "a.jpg,cat", "b.jpg,dog"))
    assert got.class_names == ["cat", "dog"] and got.items == [("a.jpg", 0), ("b.jpg", 1)]
    assert "line 2 ('Path,Label') is a header; skipped" in caplog.text
    assert list_file(_list(tmp_path, "filename,class", "a.jpg,3", "b.jpg,0", "c.jpg,1", "d.jpg,2")).class_names == \
        ["0", "1", "2", "3"]
    # only the first line can be a header: later it is a path with a class name among integers
    with pytest.raises(ValueError, match="line 2: label 'label' is a class name"):
        list_file(_list(tmp_path, "a.jpg,0", "path,label", "b.jpg,1"))


def test_shard_cli_num_classes_and_bad_labels(image_folder, tmp_path):
    from click.testing import CliRunner

    from filterx.cli.commands import main

    files = sorted((image_folder / "class 0 é").glob("img_*.jpg"))[:3]
    lst = _list(tmp_path, *(f"{p},{lab}" for p, lab in zip(files, (0, 9, 4))))
    r = CliRunner().invoke(main, ["shard", str(lst), str(tmp_path / "no"), "-q"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "label 9" in r.stderr and "--num-classes" in r.stderr
    assert not (tmp_path / "no").exists()
    r = CliRunner().invoke(main, ["shard", str(lst), str(tmp_path / "yes"), "--num-classes", "10", "--workers", "1",
                                  "-q", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["num_classes"] == 10
    ds = Dataset.open(tmp_path / "yes")
    assert ds.num_classes == 10 and ds.labels.tolist() == [0, 9, 4]
    r = CliRunner().invoke(main, ["shard", str(image_folder), str(tmp_path / "f"), "--num-classes", "3", "-q"])
    assert r.exit_code == 2 and "is for list files with integer labels" in r.stderr


# ---------------------------------------------------------------- images and reports


def _gradient16(width=256, height=32) -> np.ndarray:
    return np.tile(np.linspace(0, 65535, width).round().astype(np.uint16), (height, 1))


def test_16_bit_png_keeps_its_brightness(tmp_path):
    import io

    src = tmp_path / "src"
    (src / "deep").mkdir(parents=True)
    Image.fromarray(_gradient16()).save(src / "deep" / "gradient.png")
    assert Image.open(src / "deep" / "gradient.png").mode == "I;16"
    shard(ShardConfig(src, tmp_path / "out", workers=1, quiet=True))
    (sample,) = wds.WebDataset(str(Dataset.open(tmp_path / "out").shard_path(0)), shardshuffle=False)
    out = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("L"), dtype=np.float64)
    assert out.mean() == pytest.approx(127.5, abs=2)
    row = out.mean(axis=0)  # still a gradient from black to white, not clipped
    assert row[:8].mean() < 8 and row[-8:].mean() > 247 and abs(row[128] - 128) < 4


@pytest.mark.parametrize("make, mode", [
    (lambda g: g.astype(">u2"), "I;16B"),
    (lambda g: g.astype(np.int32), "I"),                    # 16-bit values in a 32-bit image
    (lambda g: (g.astype(np.int32) >> 8), "I"),             # 8-bit values in a 32-bit image
    (lambda g: g.astype(np.int32) * 1000 - 7, "I"),         # beyond 16 bits: by its range
    (lambda g: g.astype(np.float32) / 65535, "F"),          # floats in 0..1
])
def test_wide_samples_are_scaled_to_8_bits(tmp_path, make, mode):
    import io

    from filterx.stages.shard import encode_jpeg

    im = Image.fromarray(make(_gradient16()))
    buf = io.BytesIO()
    im.save(buf, format="TIFF")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == mode
    out = np.asarray(Image.open(io.BytesIO(encode_jpeg(buf.getvalue(), None))).convert("L"), dtype=np.float64)
    assert out.mean() == pytest.approx(127.5, abs=2)


def _transparent_corner(mode: str) -> Image.Image:
    """A 32x32 image in ``mode`` whose left half is opaque dark red and whose right half is
    transparent over a bright green no viewer shows (as PNG optimisers leave it)."""
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:, :16] = (120, 0, 0, 255)
    rgba[:, 16:] = (0, 255, 0, 0)
    im = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        return im.convert("LA")
    if mode == "P":  # a palette image with one transparent index
        p = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.ADAPTIVE, colors=4)
        green = p.getpixel((20, 0))
        p.info["transparency"] = green
        return p
    return im


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_laid_over_white(tmp_path, mode):
    import io

    src = tmp_path / "src"
    (src / "icons").mkdir(parents=True)
    _transparent_corner(mode).save(src / "icons" / "icon.png")
    shard(ShardConfig(src, tmp_path / "out", workers=1, quiet=True))
    (sample,) = wds.WebDataset(str(Dataset.open(tmp_path / "out").shard_path(0)), shardshuffle=False)
    out = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float64)
    assert out[:, 20:].mean(axis=(0, 1)) == pytest.approx([255, 255, 255], abs=3)  # white, not green
    opaque = out[:, :12].mean(axis=(0, 1))
    assert opaque[0] > opaque[1] + 20 if mode != "LA" else opaque.max() < 100  # the opaque half kept


def test_skip_reasons_hold_no_object_addresses(dataset_dir):
    report = json.loads((dataset_dir / "shard_report.json").read_text())
    reasons = [r["reason"] for r in report["skipped_inputs"]]
    assert all(" at 0x" not in r and "<" not in r for r in reasons), reasons
    bad = {r["path"]: r["reason"] for r in report["skipped_inputs"]}
    assert bad["class 2 é/notes.jpg"] == "unreadable image (UnidentifiedImageError: cannot identify image file)"


def test_folder_symlink_loops_are_reported(image_folder, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(image_folder / "class 0 é", src / "a")
    (src / "a" / "sub").mkdir()
    shutil.copy(image_folder / "class 0 é" / "img_00.jpg", src / "a" / "sub" / "x.jpg")
    os.symlink("..", src / "a" / "sub" / "up")              # a loop: back to the class folder
    os.symlink("sub", src / "a" / "zz_again")               # the same folder a second time
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(image_folder / "class 0 é" / "img_01.jpg", tmp_path / "elsewhere" / "y.jpg")
    (src / "b").mkdir()
    os.symlink(tmp_path / "elsewhere", src / "b" / "linked")  # a folder outside the tree: followed
    s = shard(ShardConfig(src, tmp_path / "out", workers=1, quiet=True))
    report = json.loads((tmp_path / "out" / "shard_report.json").read_text())
    assert {r["path"]: r["reason"] for r in report["skipped_inputs"]} == {
        "a/sub/up": "directory symlink loop: leads back to 'a', already listed; not followed",
        "a/zz_again": "same folder as 'a/sub', already listed; not followed",
    }
    ds = Dataset.open(tmp_path / "out")
    originals = sorted(p.name for p in (image_folder / "class 0 é").iterdir())
    assert sorted(ds.paths) == sorted([f"a/{n}" for n in originals] + ["a/sub/x.jpg", "b/linked/y.jpg"])
    assert s.skipped == 2 and report["skipped"] == 2


# ---------------------------------------------------------------- OS errors and kills


def test_out_that_is_a_file_is_one_line(image_folder, tmp_path):
    from click.testing import CliRunner

    from filterx.cli.commands import main

    (tmp_path / "out").write_text("not a dir")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        shard(ShardConfig(image_folder, tmp_path / "out", quiet=True))
    r = CliRunner().invoke(main, ["shard", str(image_folder), str(tmp_path / "out"), "-q"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert str(tmp_path / "out") in r.stderr


def test_full_disk_while_writing_tars_is_one_line(image_folder, tmp_path, monkeypatch):
    import errno

    from click.testing import CliRunner

    from filterx.cli.commands import main

    calls = []

    def full(path, samples):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", f"{path}.tmp-1")
        return real(path, samples)

    real = tario.write_tar
    monkeypatch.setattr(tario, "write_tar", full)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["shard", str(image_folder), str(out), "--shard-size", "5", "--workers", "1", "-q"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"cannot write to {out}: no space left on the device" in r.stderr and "re-run" in r.stderr
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["000000.idx", "000000.tar"]  # kept for the re-run


def _cli(*args, crash: str | None = None):
    import subprocess
    import sys

    from filterx.core.faults import ENV

    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["OMP_NUM_THREADS"] = "1"
    if crash:
        env[ENV] = crash
    return subprocess.run([sys.executable, "-m", "filterx", *map(str, args), "-q"], capture_output=True, text=True,
                          env=env, timeout=300)


def _temporaries(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name)


def test_rerun_after_a_kill_removes_every_abandoned_temporary(image_folder, tmp_path):
    import subprocess

    from filterx.core.faults import CRASH_EXIT

    out = tmp_path / "ds"
    args = ["shard", image_folder, out, "--shard-size", "5", "--workers", "1"]
    assert _cli(*args, crash="commit:11").returncode == CRASH_EXIT  # killed with a tar under its temporary name
    assert any(t.startswith("shards/") for t in _temporaries(out))
    # The workers of a killed run outlive it for up to a second: temporaries whose writer is
    # still alive when the re-run starts, of a tar the re-run writes and of one it keeps.
    exiting = subprocess.Popen(["sleep", "1.5"])
    for name in ("000004.tar", "000000.idx"):
        (out / "shards" / f"{name}.tmp-{exiting.pid}").write_bytes(b"half a tar")
    proc = _cli(*args)
    exiting.wait()
    assert proc.returncode == 0, proc.stderr
    assert _temporaries(out) == []
    assert Dataset.open(out).num_samples == GOOD_IMAGES


def test_temporaries_of_live_processes_are_left_alone(image_folder, tmp_path, monkeypatch, caplog):
    import subprocess

    import filterx.stages.shard as shard_module

    monkeypatch.setattr(shard_module, "ORPHAN_WAIT_S", 0.2)
    out = tmp_path / "ds"
    (out / "shards").mkdir(parents=True)
    alive = subprocess.Popen(["sleep", "60"])
    try:
        tmp = out / "shards" / f"000001.tar.tmp-{alive.pid}"
        tmp.write_bytes(b"being written")
        shard(ShardConfig(image_folder, out, shard_size=5, workers=1, quiet=True))
        assert tmp.read_bytes() == b"being written"
        assert f"000001.tar.tmp-{alive.pid}" in caplog.text and "still running" in caplog.text
    finally:
        alive.kill()
        alive.wait()
