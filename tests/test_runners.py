"""The stage/runner seam (filterx.runners): a toy stage on the local runner, then shard and
embed on a real local Ray cluster, bit-identical to the local runner, through a killed actor
and a killed driver."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from filterx.core.faults import CRASH_EXIT, ENV
from filterx.runners import Runner, Work, get_runner

# ---------------------------------------------------------------- the seam, with a toy stage


class Squares:
    """A toy worker: writes unit**2 to out/<unit>.txt itself, ticks once per unit."""

    built: list = []

    def __init__(self, out: Path):
        self.out = out
        Squares.built.append(os.getpid())

    def __call__(self, units, tick):
        for u in units:
            (self.out / f"{u}.txt").write_text(str(u * u))
            tick(1)
        return [u * u for u in units]


def toy_stage(out: Path) -> list[int]:
    """The units of the toy stage: those without an output yet (resume lives in the stage)."""
    return [u for u in range(7) if not (out / f"{u}.txt").exists()]


def test_local_runner_maps_a_toy_stage_and_a_rerun_does_only_the_rest(tmp_path):
    from functools import partial

    Squares.built.clear()
    (tmp_path / "3.txt").write_text("9")
    units = toy_stage(tmp_path)
    work = Work("toy", units, partial(Squares, tmp_path), sizes=[2] * len(units), quiet=True)
    got = dict(Runner().map(work))
    assert units == [0, 1, 2, 4, 5, 6]
    assert got == {i: u * u for i, u in enumerate(units)}
    assert Squares.built == [os.getpid()]  # one worker, built once, in this process
    assert sorted(int(p.stem) for p in tmp_path.glob("*.txt")) == list(range(7)) and toy_stage(tmp_path) == []
    assert list(Runner().map(replace(work, units=[], sizes=[]))) == []  # nothing to do: no worker built
    assert Squares.built == [os.getpid()]


def test_local_runner_pool_and_whole_list_give_the_same_results(tmp_path):
    from functools import partial

    Squares.built.clear()
    work = Work("toy", list(range(6)), partial(Squares, tmp_path), processes=2, quiet=True)
    pooled = dict(Runner().map(work))
    assert pooled == {u: u * u for u in range(6)}
    assert Squares.built == []  # the workers were built in the pool's processes, not here
    whole = dict(Runner().map(replace(work, processes=1, whole_list=True)))
    assert whole == pooled and Squares.built == [os.getpid()]


def test_work_and_runner_choices_are_checked():
    with pytest.raises(ValueError, match="3 sizes for 2 units"):
        Work("toy", [1, 2], object, sizes=[1, 1, 1])
    with pytest.raises(ValueError, match="unknown runner 'spark'; valid: local, torchrun, ray"):
        get_runner("spark")
    with pytest.raises(ValueError, match="add --runner ray"):
        get_runner("local", address="auto")
    assert get_runner().name == "local" and get_runner("torchrun").share(range(5)) == [0, 1, 2, 3, 4]


def test_cli_refuses_ray_options_without_ray(tmp_path, image_folder):
    from clirun import one_line, run

    code, _, err = run("shard", image_folder, tmp_path / "x", "--address", "auto")
    assert code == 2 and "--address auto names a Ray cluster; add --runner ray" in one_line(err)
    code, _, err = run("embed", tmp_path, "--encoder", "torchvision:resnet18", "--actors", "2")
    assert code == 2 and "--actors counts Ray actors; add --runner ray" in one_line(err)


# ---------------------------------------------------------------- Ray

try:
    import ray

    from filterx.runners.ray_runner import RayRunner
except ImportError:  # the tests below skip (cluster); the seam tests above still run
    ray, RayRunner = None, Runner

KW = dict(backend="pil", device="cpu", batch_size=16, workers=0, quiet=True)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for this module; its address, for drivers in subprocesses."""
    if ray is None:
        pytest.skip('needs Ray: pip install "filterx[ray]"')
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             logging_level="WARNING", log_to_driver=False)
    # the pause wrapper below lives in this test file, which the actors cannot import
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _volatile(rel: Path) -> bool:
    return rel.name.endswith((".lock", "report.json", ".yaml")) or "configs" in rel.parts


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not _volatile(p.relative_to(root))}


def assert_same_files(ref: Path, got: Path) -> None:
    a, b = files(ref), files(got)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []


class PauseOnce:
    """Wraps a stage's worker factory: the first worker to reach the middle of a unit (its
    first tick) writes its pid to ``marker`` and waits there, to be killed; later workers,
    and the restarted one, run as they are."""

    def __init__(self, factory, marker: Path):
        self.factory, self.marker = factory, marker

    def __call__(self):
        worker = self.factory()

        def paused(units, tick):
            def pause_tick(n):
                if not self.marker.exists():
                    self.marker.write_text(str(os.getpid()))
                    time.sleep(120)
            return worker(units, pause_tick)
        return paused


class KillOneActor(RayRunner):
    """A Ray runner whose first worker to start a unit pauses mid-unit and is SIGKILLed: the
    pid comes from the actor itself, as an operator would find it."""

    def __init__(self, marker: Path):
        super().__init__()
        self.marker, self.killed = marker, []

    def map(self, work):
        stop = threading.Event()

        def killer():
            while not stop.is_set() and not self.marker.exists():
                time.sleep(0.05)
            while not stop.is_set() and self.marker.exists() and not self.killed:
                actors = list(self.actors)
                if actors:
                    pids = [pid for _, pid in ray.get([a.where.remote() for a in actors])]
                    paused = int(self.marker.read_text() or 0)
                    if paused in pids:
                        os.kill(paused, signal.SIGKILL)
                        self.killed.append(paused)
                time.sleep(0.05)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            yield from super().map(replace(work, worker=PauseOnce(work.worker, self.marker)))
        finally:
            stop.set()
            thread.join()


def test_ray_shard_is_bit_identical_to_local(cluster, image_folder, dataset_dir, tmp_path):
    from filterx.stages.shard import ShardConfig, shard

    out = tmp_path / "ray"
    summary = shard(ShardConfig(image_folder, out, shard_size=5, quiet=True), RayRunner())
    assert summary.num_shards == 6 and summary.num_samples == 27
    assert_same_files(dataset_dir, out)


@pytest.fixture(scope="module")
def local_embeddings(sample_dirs, encoder_file, tmp_path_factory):
    from filterx.stages.embed import EmbedConfig, embed

    src = tmp_path_factory.mktemp("local") / "source"
    shutil.copytree(sample_dirs[0], src)
    embed(EmbedConfig(src, encoder_file, **KW))
    return src


def _embeddings(src: Path, encoder_file) -> np.ndarray:
    from filterx.io.dataset import Dataset
    from filterx.models.encoder import read_encoder_file
    from filterx.stages.embed import read_embeddings

    return read_embeddings(Dataset.open(src), read_encoder_file(encoder_file)["tag"])


def test_ray_embed_with_a_killed_actor_is_bit_identical_to_local(cluster, sample_dirs, encoder_file,
                                                                  local_embeddings, tmp_path):
    from filterx.io.dataset import Dataset
    from filterx.stages.embed import EmbedConfig, embed

    src = tmp_path / "source"
    shutil.copytree(sample_dirs[0], src)
    runner = KillOneActor(tmp_path / "paused")
    summary = embed(EmbedConfig(src, encoder_file, **KW), runner)
    assert len(runner.killed) == 1  # killed mid-shard (after its first batch), then retried by Ray
    ds = Dataset.open(src)
    assert summary.embedded_shards == ds.num_shards == 5 and summary.skipped_shards == 0
    assert summary.samples == ds.num_samples and summary.bad_samples == 0
    np.testing.assert_array_equal(_embeddings(src, encoder_file), _embeddings(local_embeddings, encoder_file))


def test_ray_shard_with_a_killed_actor_mid_tar_is_bit_identical(cluster, image_folder, dataset_dir, tmp_path):
    from filterx.stages.shard import ShardConfig, shard

    out = tmp_path / "ray"
    runner = KillOneActor(tmp_path / "paused")
    shard(ShardConfig(image_folder, out, shard_size=5, quiet=True), runner)
    assert len(runner.killed) == 1
    assert_same_files(dataset_dir, out)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # the killed writer's partial tar is gone


@pytest.mark.slow  # ~90 s on 2 loaded cores: two full score runs (embedding + domain classifier) each
def test_ray_score_embeds_on_actors_and_scores_as_local(cluster, sample_dirs, encoder_file, tmp_path):
    from filterx.io.dataset import Dataset
    from filterx.stages.score import ScoreConfig, read_scores, score

    got = {}
    for runner in ("local", "ray"):
        for d in (0, 1):
            shutil.copytree(sample_dirs[d], tmp_path / runner / ("source", "target")[d])
        src, tgt = tmp_path / runner / "source", tmp_path / runner / "target"
        score(ScoreConfig("domain-cls", src, tgt, encoder_file, seed=0, device="cpu", backend="pil", workers=0,
                          batch_size=16, quiet=True, runner=runner))
        got[runner] = read_scores(Dataset.open(src), "domain-cls")[0]
    assert np.isfinite(got["ray"]).all()
    np.testing.assert_array_equal(got["ray"], got["local"])


def _cli(*args, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if crash:
        env[ENV] = crash
    return subprocess.run([sys.executable, "-m", "filterx", *map(str, args), "-q", "--json"], capture_output=True,
                          text=True, env=env, timeout=600)


def test_ray_embed_killed_driver_rerun_does_only_the_undone_shards(cluster, sample_dirs, encoder_file,
                                                                    local_embeddings, tmp_path):
    src = tmp_path / "source"
    shutil.copytree(sample_dirs[0], src)
    args = ["embed", src, "--encoder", encoder_file, "--backend", "pil", "--device", "cpu", "--batch-size", "16",
            "--workers", "0", "--runner", "ray", "--address", cluster, "--actors", "1"]
    killed = _cli(*args, crash="runner.unit:1")  # the driver dies with the first shard done
    assert killed.returncode == CRASH_EXIT, killed.stderr[-3000:]
    resumed = _cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert (summary["embedded_shards"], summary["skipped_shards"]) == (4, 1)
    np.testing.assert_array_equal(_embeddings(src, encoder_file), _embeddings(local_embeddings, encoder_file))


def test_ray_shard_killed_driver_keeps_the_finished_tars(cluster, image_folder, tmp_path):
    from filterx.stages.shard import ShardConfig, shard

    ref = tmp_path / "local"
    shard(ShardConfig(image_folder, ref, shard_size=2, workers=1, quiet=True))
    out = tmp_path / "ray"
    args = ["shard", image_folder, out, "--shard-size", "2", "--runner", "ray", "--address", cluster]
    killed = _cli(*args, crash="shard.tar:3")
    assert killed.returncode == CRASH_EXIT, killed.stderr[-3000:]
    tars = sorted((out / "shards").glob("*.tar"))
    kept = {p.name: p.stat().st_mtime_ns for p in tars if p.with_suffix(".idx").exists()}
    assert 3 <= len(kept) < 14
    resumed = _cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {name: (out / "shards" / name).stat().st_mtime_ns for name in kept} == kept  # not written again
    assert_same_files(ref, out)


def test_torchrun_ranks_share_the_shard_passes_and_give_the_same_dataset(image_folder, dataset_dir, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "filterx", "shard", str(image_folder), str(out), "--shard-size", "5", "--workers", "1", "-q", "--json"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["num_shards"] == 6  # one summary: rank 0's
    assert sorted(p.name for p in out.glob(".filterx-shard*.lock")) == [".filterx-shard-rank0.lock",
                                                                        ".filterx-shard-rank1.lock"]
    assert_same_files(dataset_dir, out)
