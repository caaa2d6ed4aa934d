import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from filterx.dataset import Dataset
from filterx.faults import CRASH_EXIT
from filterx.embed import EmbedConfig, embed, embeddings_complete, read_embeddings
from filterx.encoder import load_encoder
from filterx.loader import LoaderConfig, load_batches

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


def test_torchrun_two_gloo_ranks_split_the_shards(sample_dirs, encoder_file, embedded, tmp_path):
    import shutil

    src = tmp_path / "source"
    shutil.copytree(sample_dirs[0], src)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "filterx", "embed", str(src), "--encoder", str(encoder_file), "--backend", "pil",
           "--device", "cpu", "--batch-size", "16", "--workers", "0", "-q", "--json"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    ds = Dataset.open(src)
    tag = load_encoder(encoder_file).tag
    assert '"world_size": 2' in run.stdout
    np.testing.assert_array_equal(read_embeddings(ds, tag), read_embeddings(Dataset.open(embedded[0]), tag))


def test_incomplete_embeddings_are_refused(sample_dirs, encoder_file):
    ds = Dataset.open(sample_dirs[1])
    with pytest.raises(ValueError, match="missing or incomplete"):
        read_embeddings(ds, "resnet18-r32-0000000000")
