"""score --params last-block: a run killed in the pool pass resumes from its work store and
gives bit-identical scores; a run with other settings does not reuse that work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from filterx.io.dataset import Dataset
from filterx.core.faults import CRASH_EXIT
from filterx.scorers.lastblock import shard_aligned_batches
from filterx.report.info import dataset_info
from filterx.decode.loader import Batch
from filterx.stages.score import ScoreConfig, list_scores, read_scores, score, work_path

pytestmark = pytest.mark.usefixtures("one_thread")

# ResNet-18's layer4 has 8.4M parameters: strong damping and 2 CG steps keep the solve short.
SOLVE = ["--solver", "cg", "--damping", "10", "-p", "cg_max_iter=2", "-p", "cg_tol=1e-3"]
# Batches of 16 in shards of 40: loader batches straddle shard ends, and a resumed run's
# loader batches differ from an uninterrupted run's.
RUN = ["--backend", "pil", "--device", "cpu", "--batch-size", "16", "--workers", "0", "--json"]


def _score_cli(source, target, encoder, *extra, crash_at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FILTERX_CRASH_AT", None)
    if crash_at:
        env["FILTERX_CRASH_AT"] = crash_at
    cmd = [sys.executable, "-m", "filterx", "score", "--method", "influence", "--params", "last-block",
           "--source", str(source), "--target", str(target), "--encoder", str(encoder), *SOLVE, *RUN, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _summary(run) -> dict:
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def clean(sample_dirs, encoder_file, tmp_path_factory):
    """An uninterrupted run (a subprocess, as the runs it is compared with): (scores, summary)."""
    src = tmp_path_factory.mktemp("clean") / "source"
    shutil.copytree(sample_dirs[0], src)
    summary = _summary(_score_cli(src, sample_dirs[1], encoder_file))
    ds = Dataset.open(src)
    assert not work_path(ds, "influence").exists()
    return read_scores(ds, "influence")[0], summary


def test_killed_pool_pass_resumes_bit_identically(sample_dirs, encoder_file, clean, tmp_path):
    src = tmp_path / "source"
    shutil.copytree(sample_dirs[0], src)
    ds = Dataset.open(src)
    assert ds.num_shards >= 3 and len(set(ds.shard_counts[:-1])) == 1

    killed = _score_cli(src, sample_dirs[1], encoder_file, crash_at="influence.shard:1")
    assert killed.returncode == CRASH_EXIT, killed.stderr[-3000:]
    work = work_path(ds, "influence")
    assert not (ds.scores_path / "influence").exists()
    store = zarr.open_group(work, mode="r")
    done = store["done"][:]
    assert done.tolist() == [True] + [False] * (ds.num_shards - 1)
    stored = store["scores"][:]
    # the done shard's rows are the final ones; the others were never written
    np.testing.assert_array_equal(stored[: ds.shard_counts[0]], clean[0][: ds.shard_counts[0]])
    assert np.isnan(stored[ds.shard_counts[0] :]).all()
    assert store["s_test"].shape == (store.attrs["solve"]["num_params"],)
    assert list_scores(ds) == [] and dataset_info(src).scores == ()  # work is not a score

    resumed = _score_cli(src, sample_dirs[1], encoder_file)
    summary = _summary(resumed)
    assert summary["attrs"]["shards_reused"] == 1
    assert summary["attrs"]["shards_scored"] == ds.num_shards - 1
    assert f"1 of {ds.num_shards} shards already scored" in resumed.stderr
    assert "reusing the solve" in resumed.stderr and "last-block influence solve" not in resumed.stderr
    assert summary["scored"] == ds.num_samples
    scores, attrs = read_scores(ds, "influence")
    np.testing.assert_array_equal(scores, clean[0])
    assert np.isfinite(scores).all() and scores.std() > 0
    # the stored solve is the one the killed run made, and it agrees with the clean run's
    for key in ("residual", "iterations", "num_params", "val_loss", "damping"):
        assert attrs["result"][key] == clean[1]["attrs"][key]
    assert clean[1]["attrs"]["shards_scored"] == ds.num_shards and clean[1]["attrs"]["shards_reused"] == 0
    assert not work.exists() and list_scores(ds) == ["influence"]


class _Killed(Exception):
    pass


def test_changed_damping_does_not_reuse_stale_work(sample_dirs, encoder_file, tmp_path, monkeypatch):
    import filterx.scorers.lastblock as ip

    src = tmp_path / "source"
    shutil.copytree(sample_dirs[0], src)
    ds = Dataset.open(src)
    kw = dict(device="cpu", backend="pil", batch_size=16, workers=0, quiet=True)
    params = {"params": "last-block", "solver": "cg", "cg_max_iter": 2, "cg_tol": 1e-3}

    passed = []

    def kill_after_two(point):
        passed.append(point)
        if len(passed) == 2:
            raise _Killed

    monkeypatch.setattr(ip, "crash_point", kill_after_two)
    with pytest.raises(_Killed):
        score(ScoreConfig("influence", src, sample_dirs[1], encoder_file, {**params, "damping": 10.0}, **kw))
    monkeypatch.undo()
    work = work_path(ds, "influence")
    store = zarr.open_group(work, mode="r+")
    assert store["done"][:].sum() == 2 and passed == ["influence.shard"] * 2
    store["scores"][: 2 * ds.shard_counts[0]] = 1e9  # rows a reuse would carry into the result

    s = score(ScoreConfig("influence", src, sample_dirs[1], encoder_file, {**params, "damping": 20.0}, **kw))
    assert s.attrs["shards_scored"] == ds.num_shards and s.attrs["shards_reused"] == 0
    scores, attrs = read_scores(ds, "influence")
    assert np.isfinite(scores).all() and np.abs(scores).max() < 1e8
    assert attrs["result"]["damping"] == 20.0 and attrs["params"]["damping"] == 20.0  # solved again
    assert not work.exists()


def _batch(ids):
    ids = torch.tensor(ids, dtype=torch.int64)
    return Batch(ids, ids.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone(), torch.zeros_like(ids))


def test_shard_aligned_batches_depend_on_the_dataset_only():
    starts = np.array([0, 5, 10, 13])  # shards of 5, 5, 3
    # out of order and straddling shard ends, as interleaved loader workers deliver them
    loader = [_batch([0, 2, 4, 6]), _batch([1, 3, 5, 7]), _batch([8, 10, 12]), _batch([9, 11])]
    out = list(shard_aligned_batches(loader, starts, block=3))
    got = sorted(tuple(ids.tolist()) for ids, _ in out)
    assert got == [(0, 1, 2), (3, 4), (5, 6, 7), (8, 9), (10, 11, 12)]
    for ids, images in out:
        assert images.shape == (len(ids), 3, 2, 2)
        np.testing.assert_array_equal(images[:, 0, 0, 0].numpy(), ids.astype(np.float32))
    # a resumed run reading shards 1-2 only gets the same blocks for them
    again = list(shard_aligned_batches([_batch(list(range(5, 13)))], starts, block=3))
    assert [tuple(i.tolist()) for i, _ in again] == [(5, 6, 7), (8, 9), (10, 11, 12)]
    with pytest.raises(RuntimeError, match=r"shards \[0\] were not read completely"):
        list(shard_aligned_batches([_batch([0, 1, 2, 3])], starts, block=3))
