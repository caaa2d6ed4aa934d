"""info: counts and metadata of a dataset dir, read-only."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import BAD_IMAGES, GOOD_IMAGES
from filterx.io.dataset import Dataset
from filterx.report.info import dataset_info
from filterx.io.scores import write_scores


@pytest.fixture()
def scored_copy(dataset_copy):
    """The conftest dataset (27 good images in shards of 5, an empty class, 4 bad inputs
    skipped) with two score arrays and a half-done embeddings store."""
    import zarr

    ds = Dataset.open(dataset_copy)
    s = np.linspace(-1.0, 1.0, ds.num_samples, dtype=np.float32)
    s[:3] = np.nan
    write_scores(ds, "lin", s, {"method": "clustering", "params": {"k": 5, "distance": "min"}, "seed": 7,
                                "encoder": {"tag": "resnet18-r32-abc"}, "candidates": "source",
                                "source_fingerprint": ds.fingerprint})
    write_scores(ds, "stale", np.zeros(ds.num_samples, np.float32),
                 {"method": "random", "seed": 1, "candidates": "source", "source_fingerprint": "0000"})
    g = zarr.open_group(ds.embeddings_path("resnet18-r32-abc"), mode="w")
    g.create_array("emb", shape=(ds.num_samples, 16), dtype="float16", chunks=(5, 16))
    done = g.create_array("done", shape=(ds.num_shards,), dtype=bool, chunks=(1,), fill_value=False)
    done[:2] = True
    g.attrs.update({"encoder_tag": "resnet18-r32-abc", "arch": "resnet18", "resolution": 32})
    return dataset_copy, s


def test_info_counts(scored_copy):
    root, s = scored_copy
    info = dataset_info(root)
    ds = Dataset.open(root)
    assert info.samples == GOOD_IMAGES == 27
    assert info.num_classes == 4 and info.empty_classes == ("empty class",)
    per_class = np.bincount(ds.labels, minlength=4)
    assert [c.count for c in info.top_classes] == sorted(per_class[per_class > 0].tolist(), reverse=True)
    assert info.top_classes[0].count == per_class.max()
    assert info.num_shards == 6 and info.shard_sizes == (5, 5, 5, 5, 5, 2)
    tars = sum(ds.shard_path(i).stat().st_size + ds.index_path(i).stat().st_size for i in range(6))
    assert info.shard_bytes == tars and info.total_bytes > tars
    assert info.indexes_present and not info.missing_tars
    assert info.skipped_inputs == BAD_IMAGES
    assert info.fingerprint == ds.fingerprint and info.filterx_version == ds.attrs["filterx_version"]
    assert info.source_root == ds.attrs["source_root"]

    (emb,) = info.embeddings
    assert (emb.tag, emb.shape, emb.dtype, emb.shards_done, emb.num_shards, emb.complete) == \
        ("resnet18-r32-abc", (27, 16), "float16", 2, 6, False)

    lin, stale = info.scores
    assert (lin.name, lin.method, lin.params, lin.encoder_tag, lin.seed) == \
        ("lin", "clustering", {"k": 5, "distance": "min"}, "resnet18-r32-abc", 7)
    assert (lin.scored, lin.nan) == (24, 3)
    valid = s[3:]
    assert lin.min == pytest.approx(valid.min()) and lin.max == pytest.approx(1.0)
    assert lin.median == pytest.approx(float(np.median(valid)))
    assert lin.same_dataset is True and stale.same_dataset is False

    d = info.to_dict()
    assert json.loads(json.dumps(d)) == d and d["indexes_present"] is True
    assert d["embeddings"][0]["complete"] is False and d["scores"][0]["nan"] == 3
    text = info.text()
    assert "27" in text and "empty class" in text and "2/6 shards done" in text
    assert "lin" in text and "3 NaN" in text and "MADE FOR ANOTHER DATASET" in text
    assert "4 inputs skipped" in text and "all present" in text
    assert info.line().startswith(f"{info.root}: 27 samples, 4 classes (1 empty), 6 shards")


def test_info_reports_missing_indexes_and_tars(dataset_copy):
    ds = Dataset.open(dataset_copy)
    ds.index_path(1).unlink()
    ds.index_path(4).unlink()
    ds.shard_path(5).unlink()
    info = dataset_info(dataset_copy)
    assert info.missing_indexes == (1, 4) and not info.indexes_present
    assert info.missing_tars == (5,)
    assert info.scores == () and info.embeddings == ()
    assert "missing for shards 1, 4" in info.text() and "MISSING tars for shards 5" in info.text()


def test_info_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        dataset_info(tmp_path / "nope")
    assert "\n" not in str(e.value)
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="not a filterx dataset dir") as e:
        dataset_info(tmp_path / "plain")
    assert "\n" not in str(e.value)


def test_info_is_read_only(dataset_dir, tmp_path):
    copy = tmp_path / "ro"
    shutil.copytree(dataset_dir, copy)
    before = sorted((p.relative_to(copy), p.stat().st_mtime_ns) for p in copy.rglob("*"))
    dataset_info(copy).text()
    assert sorted((p.relative_to(copy), p.stat().st_mtime_ns) for p in copy.rglob("*")) == before


def test_info_lists_saved_configs_and_takes_them_for_nothing_else(scored_copy):
    root, _ = scored_copy
    before = dataset_info(root)
    configs = root / "configs"
    configs.mkdir()
    (configs / "score-lin.yaml").write_text("method: clustering\n")
    (configs / "embed-resnet18-r32-abc.yaml").write_text("encoder: /x/enc.pt\n")
    (configs / "score-x.yaml.tmp-123").write_text("half written")  # a killed write
    (configs / "notes.txt").write_text("not a config")
    info = dataset_info(root)
    assert info.configs == ("embed-resnet18-r32-abc.yaml", "score-lin.yaml")
    assert (info.scores, info.embeddings, info.samples) == (before.scores, before.embeddings, before.samples)
    assert info.to_dict()["configs"] == ["embed-resnet18-r32-abc.yaml", "score-lin.yaml"]
    assert f"configs      {configs}: embed-resnet18-r32-abc.yaml, score-lin.yaml" in info.text()
    assert "\nconfigs " not in before.text() and before.configs == ()


def test_info_reports_truncated_and_mismatched_shards(dataset_copy):
    ds = Dataset.open(dataset_copy)
    assert dataset_info(dataset_copy).healthy and dataset_info(dataset_copy).damaged_shards == ()
    tar2 = ds.shard_path(2)
    size = tar2.stat().st_size
    tar2.write_bytes(tar2.read_bytes()[: size // 2])  # a copy cut off half-way
    tar3 = ds.shard_path(3)
    tar3.write_bytes(tar3.read_bytes()[:-10240])  # only the end-of-archive record lost
    ds.index_path(0).write_text(ds.index_path(1).read_text().replace("v1.2 5", "v1.2 4", 1).rsplit("\n", 2)[0] + "\n")
    ds.index_path(4).unlink()  # no index: checked from the tar's headers, whole
    info = dataset_info(dataset_copy)
    got = {d.shard: d.problem for d in info.damaged_shards}
    assert got == {0: "index", 2: "truncated", 3: "truncated"}
    detail2 = next(d.detail for d in info.damaged_shards if d.shard == 2)
    assert detail2.startswith(f"{size // 2} bytes of the ") and "its index needs" in detail2
    assert info.missing_indexes == (4,) and not info.healthy
    text = info.text()
    assert f"DAMAGED shard 2: truncated, {size // 2} bytes" in text
    assert text.splitlines()[-1] == ("WARNING: 3 of 6 shards unreadable (3 damaged: shards 0, 2, 3); readers will "
                                     "fail on them: restore them or re-shard the dataset")
    assert "3 SHARDS UNREADABLE" in info.line()
    d = info.to_dict()
    assert d["healthy"] is False
    assert [(x["shard"], x["problem"]) for x in d["damaged_shards"]] == \
        [(0, "index"), (2, "truncated"), (3, "truncated")]


def test_info_without_an_index_reads_the_tar_headers(dataset_copy):
    ds = Dataset.open(dataset_copy)
    ds.index_path(2).unlink()
    tar = ds.shard_path(2)
    tar.write_bytes(tar.read_bytes()[:1500])
    (d,) = dataset_info(dataset_copy).damaged_shards
    assert (d.shard, d.problem) == (2, "unreadable") and d.detail.startswith("no DALI index and not a complete tar")


def test_info_command_warns_and_exits_1_on_damaged_shards(dataset_copy):
    from click.testing import CliRunner

    from filterx.cli.commands import main

    r = CliRunner().invoke(main, ["info", str(dataset_copy), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["damaged_shards"] == [] and r.stderr == ""
    ds = Dataset.open(dataset_copy)
    ds.shard_path(1).write_bytes(ds.shard_path(1).read_bytes()[:3000])
    ds.shard_path(5).unlink()
    r = CliRunner().invoke(main, ["info", str(dataset_copy), "--json"])
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["damaged_shards"][0]["shard"] == 1 and d["missing_tars"] == [5] and d["healthy"] is False
    assert r.stderr.count("\n") == 1
    assert "WARNING: 2 of 6 shards unreadable (1 damaged, 1 missing: shards 1, 5)" in r.stderr
    r = CliRunner().invoke(main, ["info", str(dataset_copy)])
    assert r.exit_code == 1 and "DAMAGED shard 1: truncated, 3000 bytes" in r.stdout
    assert r.stdout.rstrip().splitlines()[-1].startswith("WARNING: 2 of 6 shards unreadable")
