import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from filterx.io.dataset import Dataset
from filterx.core.faults import CRASH_EXIT
from filterx.stages.embed import EmbedConfig, embed, embeddings_complete, read_embeddings
from filterx.models.encoder import load_encoder
from filterx.decode.loader import LoaderConfig, load_batches

KW = dict(backend="pil", device="cpu", batch_size=16, workers=0, quiet=True)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "filterx", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def embedded(sample_dirs, encoder_file, tmp_path_factory):
    import shutil

    src = tmp_path_factory.mktemp("emb") / "source"
    shutil.copytree(sample_dirs[0], src)
    summary = embed(EmbedConfig(src, encoder_file, **KW))
    return src, summary


def test_embeddings_match_the_encoder_features(embedded, encoder_file):
    src, summary = embedded
    ds = Dataset.open(src)
    enc = load_encoder(encoder_file)
    emb = read_embeddings(ds, enc.tag)
    assert emb.shape == (ds.num_samples, enc.info["feature_dim"]) and np.isfinite(emb).all()
    store = zarr.open_group(ds.embeddings_path(enc.tag), mode="r")
    assert store["emb"].dtype == np.float16 and store["emb"].chunks[0] == max(ds.shard_counts)
    assert summary.samples == ds.num_samples and summary.embedded_shards == ds.num_shards
    cfg = LoaderConfig(resolution=enc.resolution, backend="pil", batch_size=8, workers=0,
                       mean=tuple(enc.info["mean"]), std=tuple(enc.info["std"]))
    batch = next(load_batches([ds.shard_path(1)], cfg))
    with torch.inference_mode():
        ref = enc.features(batch.images).numpy()
    np.testing.assert_allclose(emb[batch.ids.numpy()], ref, rtol=2e-3, atol=2e-3)  # float16 storage


def test_rerun_does_nothing(embedded, encoder_file):
    src, _ = embedded
    again = embed(EmbedConfig(src, encoder_file, **KW))
    assert again.embedded_shards == 0 and again.skipped_shards == Dataset.open(src).num_shards


def test_kill_and_resume_finishes_without_redoing(sample_dirs, encoder_file, embedded, tmp_path):
    import shutil

    src = tmp_path / "source"
    shutil.copytree(sample_dirs[0], src)
    args = ["embed", str(src), "--encoder", str(encoder_file), "--backend", "pil", "--device", "cpu",
            "--batch-size", "16", "--workers", "0", "-q"]
    killed = _cli(*args, env={"FILTERX_CRASH_AT": "embed.shard:2"})
    assert killed.returncode == CRASH_EXIT, killed.stderr
    ds = Dataset.open(src)
    tag = load_encoder(encoder_file).tag
    done = zarr.open_group(ds.embeddings_path(tag), mode="r")["done"][:]
    assert done.sum() == 2 and not embeddings_complete(ds, tag)
    resumed = _cli(*args, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert '"embedded_shards": %d' % (ds.num_shards - 2) in resumed.stdout
    np.testing.assert_array_equal(read_embeddings(ds, tag), read_embeddings(Dataset.open(embedded[0]), tag))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _embed_args(src, encoder_file) -> list[str]:
    return ["-m", "filterx", "embed", str(src), "--encoder", str(encoder_file), "--backend", "pil",
            "--device", "cpu", "--batch-size", "16", "--workers", "0", "-q", "--json"]


@pytest.mark.parametrize("ranks", [2, 3])
def test_torchrun_ranks_split_the_shards_and_give_the_same_embeddings(ranks, sample_dirs, encoder_file, embedded,
                                                                      tmp_path):
    """1 (the in-process reference), 2 and 3 gloo ranks: bit-identical embeddings."""
    import shutil

    src = tmp_path / "source"
    shutil.copytree(sample_dirs[0], src)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(_free_port()), *_embed_args(src, encoder_file)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    ds = Dataset.open(src)
    tag = load_encoder(encoder_file).tag
    assert f'"world_size": {ranks}' in run.stdout
    np.testing.assert_array_equal(read_embeddings(ds, tag), read_embeddings(Dataset.open(embedded[0]), tag))


def test_two_nodes_rendezvous_over_c10d_on_localhost(sample_dirs, encoder_file, embedded, tmp_path):
    """The README's multi-node command, as 2 "nodes" x 1 process meeting at a c10d endpoint on
    127.0.0.1 and sharing the dataset dir (a shared file system in a real cluster)."""
    import shutil

    src = tmp_path / "source"
    shutil.copytree(sample_dirs[0], src)
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                               "--rdzv_id", "filterx-test", *_embed_args(src, encoder_file)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
             for rank in (0, 1)]
    outs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outs):
        assert node.returncode == 0, err[-3000:]
    assert '"world_size": 2' in outs[0][0] + outs[1][0]
    tag = load_encoder(encoder_file).tag
    np.testing.assert_array_equal(read_embeddings(Dataset.open(src), tag),
                                  read_embeddings(Dataset.open(embedded[0]), tag))


def test_incomplete_embeddings_are_refused(sample_dirs, encoder_file):
    ds = Dataset.open(sample_dirs[1])
    with pytest.raises(ValueError, match="missing or incomplete"):
        read_embeddings(ds, "resnet18-r32-0000000000")


def test_store_layout_is_the_documented_one(embedded, encoder_file):
    src, _ = embedded
    ds = Dataset.open(src)
    enc = load_encoder(encoder_file)
    store = zarr.open_group(ds.embeddings_path(enc.tag), mode="r")
    assert sorted(store.array_keys()) == ["done", "emb"]
    assert store["done"].shape == (ds.num_shards,) and store["done"].chunks == (1,) and store["done"].dtype == bool
    assert dict(store.attrs) == {"encoder_tag": enc.tag, "arch": enc.info["arch"], "resolution": enc.resolution,
                                 "feature_dim": enc.info["feature_dim"], "dataset_fingerprint": ds.fingerprint,
                                 "shard_counts": ds.shard_counts}


def test_embed_refuses_a_store_made_for_another_dataset(embedded, encoder_file, tmp_path):
    import shutil

    src = tmp_path / "source"
    shutil.copytree(embedded[0], src)
    ds = Dataset.open(src)
    path = ds.embeddings_path(load_encoder(encoder_file).tag)
    zarr.open_group(path, mode="r+").attrs["dataset_fingerprint"] = "0123456789abcdef"
    with pytest.raises(ValueError, match="another version of this dataset; remove it and re-run embed"):
        embed(EmbedConfig(src, encoder_file, **KW))
    assert path.is_dir()  # refused, never overwritten


# ------------------------------------------------------------------ rowstore (factored out of embed)


@pytest.mark.parametrize("row_shape,dtype", [((), "float32"), ((3,), "float16")])
def test_rowstore_collector_writes_whole_shards_from_batches_spanning_them(tmp_path, row_shape, dtype):
    from filterx.io import rowstore

    layout = rowstore.RowLayout("rows", row_shape, dtype, (4, 4, 2), "fp", {"key": {"a": (1, 2)}})
    path = tmp_path / "store.zarr"
    rowstore.create(path, layout, arrays={"extra": np.arange(5.0)}, extra_attrs={"note": "x"})
    store = rowstore.open_rows(path, layout)
    assert store.undone() == [0, 1, 2] and store.attrs["note"] == "x"
    np.testing.assert_array_equal(store.array("extra"), np.arange(5.0))
    values = np.arange(10, dtype=np.float32).reshape(10, *([1] * len(row_shape))) * np.ones((1, *row_shape))
    written = []
    col = store.collector([1, 2], after_shard=written.append)
    assert col.add(np.array([9, 4, 5]), values[[9, 4, 5]]) == []  # spans shards 1 and 2, out of order
    assert col.add(np.array([8, 7, 6]), values[[8, 7, 6]]) == [1, 2] and written == [1, 2]
    assert col.unfinished() == [] and store.undone() == [0]
    rows = store.rows()
    assert rows.shape == (10, *row_shape) and rows.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(rows[4:], values[4:].astype(dtype))
    assert np.isnan(rows[:4]).all()
    col = store.collector([0])
    col.add(np.array([0, 1]), values[:2])
    assert col.unfinished() == [0] and store.undone() == [0]  # a partial shard is never written
    with pytest.raises(ValueError, match="ids of shard 1"):
        col.add(np.array([4]), values[4:5])


def test_rowstore_mismatch_raises_or_discards(tmp_path):
    from dataclasses import replace

    from filterx.io import rowstore

    layout = rowstore.RowLayout("rows", (), "float32", (2, 2), "fp", {"damping": 0.1})
    path = tmp_path / "store.zarr"
    assert rowstore.open_rows(path, layout) is None
    rowstore.create(path, layout)
    assert rowstore.open_rows(path, layout) is not None
    with pytest.raises(ValueError, match=r"other settings \(differs in: damping\); remove it and re-run embed"):
        rowstore.open_rows(path, replace(layout, attrs={"damping": 0.2}), hint="embed")
    with pytest.raises(ValueError, match="another version of this dataset"):
        rowstore.open_rows(path, replace(layout, fingerprint="other"))
    with pytest.raises(ValueError, match="differs in: rows"):
        rowstore.open_rows(path, replace(layout, row_shape=(4,)))
    assert path.is_dir()
    assert rowstore.open_rows(path, replace(layout, attrs={"damping": 0.2}), on_mismatch="discard") is None
    assert not path.exists()
    with pytest.raises(ValueError, match="valid: raise, discard"):
        rowstore.open_rows(path, layout, on_mismatch="ignore")


def _damage_member(ds_root, shard: int, nth: int) -> int:
    """Overwrite the header of the nth JPEG of a shard in place (same size): returns its sample id."""
    from filterx.io import tario

    tar = Dataset.open(ds_root).shard_path(shard)
    e = [e for e in tario.read_index(tario.index_path(tar)) if e.ext == "jpg"][nth]
    with open(tar, "r+b") as f:
        f.seek(e.offset + 2)
        f.write(bytes(min(200, e.size - 4)))
    return int(e.key)


@pytest.mark.parametrize("backend", ["pil", "torchvision", "dali"])
def test_a_damaged_jpeg_is_skipped_reported_and_scores_nan(backend, sample_dirs, encoder_file, embedded, tmp_path):
    import shutil

    from filterx.stages.embed import read_bad_samples
    from filterx.decode.dali_backend import dali_available

    if backend == "dali" and not dali_available():
        pytest.skip("needs nvidia-dali")
    src = tmp_path / "source"
    shutil.copytree(sample_dirs[0], src)
    bad_id = _damage_member(src, 1, 3)
    summary = embed(EmbedConfig(src, encoder_file, **{**KW, "backend": backend}))
    ds = Dataset.open(src)
    tag = load_encoder(encoder_file).tag
    assert summary.bad_samples == 1 and summary.samples == ds.num_samples - 1
    assert embeddings_complete(ds, tag)  # one bad image does not stop a shard
    bad = read_bad_samples(ds, tag)
    assert [b["id"] for b in bad] == [bad_id]
    assert bad[0]["tar"] == str(ds.shard_path(1)) and bad[0]["member"] == f"{bad_id:010d}.jpg"
    emb = read_embeddings(ds, tag)
    good = np.arange(ds.num_samples) != bad_id
    assert np.isnan(emb[bad_id]).all() and np.isfinite(emb[good]).all()
    if backend == "pil":  # the other rows are exactly what an undamaged run gives
        np.testing.assert_array_equal(emb[good], read_embeddings(Dataset.open(embedded[0]), tag)[good])
    # the scores of the bad sample are NaN, so no selection can take it
    from filterx.stages.score import ScoreConfig, read_scores, score

    score(ScoreConfig("domain-cls", src, sample_dirs[1], encoder_file, seed=0, device="cpu", backend="pil",
                      workers=0, quiet=True))
    s, _ = read_scores(ds, "domain-cls")
    assert np.isnan(s[bad_id]) and np.isfinite(s[good]).all()


def test_a_damaged_jpeg_without_skipping_names_tar_and_member(sample_dirs, tmp_path):
    import shutil

    src = tmp_path / "source"
    shutil.copytree(sample_dirs[0], src)
    bad_id = _damage_member(src, 0, 2)
    ds = Dataset.open(src)
    with pytest.raises(ValueError, match=rf"{ds.shard_path(0)}: cannot decode {bad_id:010d}\.jpg"):
        for _ in load_batches(ds.tar_paths(), LoaderConfig(resolution=32, backend="pil", workers=0)):
            pass
