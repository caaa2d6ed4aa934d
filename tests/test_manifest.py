import json

import numpy as np
import pytest
import torch
import webdataset as wds

from filterx.io.dataset import Dataset
from filterx.decode.loader import LoaderConfig, load_batches
from filterx.io.manifest import ManifestDataset, make_header, read_manifest, write_manifest
from filterx.io.scores import list_scores, read_scores, write_scores
from filterx.stages.select import SelectConfig, select


@pytest.fixture()
def scored(dataset_copy):
    ds = Dataset.open(dataset_copy)
    scores = np.random.default_rng(0).random(ds.num_samples).astype(np.float32)
    scores[[4, 9]] = np.nan
    write_scores(ds, "demo-scores", scores, {"method": "random", "encoder": {"tag": "resnet18-r112-abc"}})
    return ds, scores


def test_scores_store_round_trip(scored):
    ds, scores = scored
    assert list_scores(ds) == ["demo-scores"]
    got, attrs = read_scores(ds, "demo-scores")
    np.testing.assert_array_equal(got, scores)
    assert attrs["method"] == "random"
    with pytest.raises(ValueError, match="stored: demo-scores"):
        read_scores(ds, "clustering")


@pytest.mark.parametrize("fmt, name", [("jsonl", "m.jsonl"), ("npy", "m.npy"), ("txt", "m.txt"), ("wds", "m")])
def test_every_format_reads_back(scored, tmp_path, fmt, name):
    ds, scores = scored
    out = tmp_path / name
    summary = select(SelectConfig(ds.root, "demo-scores", out, count=10, quiet=True))
    assert summary.fmt == fmt and summary.selected == 10
    m = read_manifest(out)
    expect = np.lexsort((np.arange(len(scores)), -np.nan_to_num(scores, nan=-np.inf)))[:10]
    assert m.ids.tolist() == sorted(expect.tolist())
    if fmt != "npy":
        assert m.ranked.tolist() == expect.tolist()
    assert m.open_dataset().root == ds.root
    if fmt == "jsonl":
        lines = out.read_text().splitlines()
        header = json.loads(lines[0])
        assert header["filterx_manifest"] == 1 and header["count"] == 10 and header["budget"] == {"count": 10}
        assert header["fingerprint"] == ds.fingerprint
        row = json.loads(lines[1])
        assert set(row) == {"id", "key", "shard", "label", "score"}


def test_wds_subset_is_read_by_webdataset_and_dali(scored, tmp_path):
    ds, _ = scored
    out = tmp_path / "subset"
    select(SelectConfig(ds.root, "demo-scores", out, count=12, fmt="wds", quiet=True))
    m = read_manifest(out)
    assert m.tars and all(t.with_suffix(".idx").is_file() for t in m.tars)
    keys = [int(s["__key__"]) for t in m.tars for s in wds.WebDataset(str(t), shardshuffle=False)]
    assert keys == m.ids.tolist()
    # original bytes: the members equal the source dataset's
    first = next(iter(wds.WebDataset(str(m.tars[0]), shardshuffle=False)))
    src = {s["__key__"]: s for s in wds.WebDataset(str(ds.shard_path(int(ds.shards[int(first["__key__"])]))), shardshuffle=False)}
    assert src[first["__key__"]]["jpg"] == first["jpg"]
    batches = list(load_batches(m.tars, LoaderConfig(resolution=32, backend="dali", batch_size=5, workers=1)))
    assert sorted(torch.cat([b.ids for b in batches]).tolist()) == m.ids.tolist()
    assert torch.cat([b.labels for b in batches]).tolist() == ds.labels[torch.cat([b.ids for b in batches]).numpy()].tolist()


def test_manifest_dataset_for_plain_torch(scored, tmp_path):
    ds, _ = scored
    select(SelectConfig(ds.root, "demo-scores", tmp_path / "m.jsonl", count=6, quiet=True))
    mds = ManifestDataset(tmp_path / "m.jsonl")
    img, label, sample_id = mds[2]
    assert len(mds) == 6 and img.dtype == torch.uint8 and img.shape[0] == 3
    assert label == ds.labels[sample_id] and sample_id == read_manifest(tmp_path / "m.jsonl").ids[2]


def test_wrong_dataset_and_missing_dataset(scored, dataset_dir, tmp_path):
    ds, scores = scored
    path = tmp_path / "m.jsonl"
    other = Dataset.open(dataset_dir)
    header = make_header(other, "x", {"count": 2}, 2)
    header["fingerprint"] = "0123456789abcdef"
    write_manifest(path, "jsonl", other, np.array([0, 1]), np.array([1.0, 0.5]), header)
    with pytest.raises(ValueError, match="made for another dataset"):
        read_manifest(path).open_dataset()
    header = make_header(other, "x", {"count": 2}, 2)
    header["dataset"] = str(tmp_path / "gone")
    write_manifest(path, "jsonl", other, np.array([0, 1]), np.array([1.0, 0.5]), header)
    with pytest.raises(FileNotFoundError, match="gone, which does not exist"):
        read_manifest(path).open_dataset()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "trunc.jsonl").write_text(path.read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="truncated"):
        read_manifest(tmp_path / "trunc.jsonl")


def test_selection_is_byte_identical_across_runs(scored, tmp_path):
    ds, _ = scored
    for n in (1, 2):
        select(SelectConfig(ds.root, "demo-scores", tmp_path / f"{n}.jsonl", fraction=0.5, quiet=True))
    assert (tmp_path / "1.jsonl").read_bytes() == (tmp_path / "2.jsonl").read_bytes()


def test_refuses_scores_from_another_encoder(scored, tmp_path):
    ds, _ = scored
    with pytest.raises(ValueError, match="made with encoder resnet18-r112-abc"):
        select(SelectConfig(ds.root, "demo-scores", tmp_path / "m.jsonl", count=3, encoder_tag="resnet50-r224-x"))


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), fmt=st.sampled_from(["jsonl", "npy", "txt"]))
def test_manifest_round_trip_property(dataset_dir, tmp_path_factory, data, fmt):
    ds = Dataset.open(dataset_dir)
    ranked = np.array(data.draw(st.lists(st.integers(0, ds.num_samples - 1), unique=True, max_size=ds.num_samples)),
                      dtype=np.int64)
    scores = np.array(data.draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=len(ranked), max_size=len(ranked))),
                      dtype=np.float32)
    path = tmp_path_factory.mktemp("rt") / f"m.{fmt}"
    header = make_header(ds, "prop", {"count": len(ranked)}, len(ranked))
    write_manifest(path, fmt, ds, ranked, scores, header)
    m = read_manifest(path)
    assert m.ids.tolist() == sorted(ranked.tolist())
    assert m.fingerprint == ds.fingerprint and m.header["method"] == "prop"
    if fmt != "npy":
        assert m.ranked.tolist() == ranked.tolist()
    if fmt == "jsonl":
        np.testing.assert_array_equal(m.scores, scores)
