"""Kill every writing stage at several points, re-run it, and get what an uninterrupted run gets.

Each case runs the command in a fresh interpreter with ``FILTERX_CRASH_AT=<point>:<n>``
(``os._exit`` at that moment, as ``kill -9`` would), checks what the kill left (no final output
that is incomplete, an older output untouched), re-runs the same command without it, and
compares every file of the result byte for byte with an uninterrupted run made at the same
path (so that paths recorded in the outputs agree).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from filterx.io.dataset import Dataset
from filterx.core.faults import CRASH_EXIT, ENV, crash_point, parse


def _volatile(rel: Path) -> bool:
    """Files that legitimately differ between two runs: lock files, a report's timing, and the
    saved configs (they name the output path, which differs where a test writes two outputs)."""
    name = rel.name
    return (name.endswith((".lock", "report.json", ".filterx.yaml"))
            or (name.startswith("filterx-") and name.endswith(".yaml")) or "configs" in rel.parts)


def cli(*args, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["OMP_NUM_THREADS"] = "1"
    if crash:
        env[ENV] = crash
    return subprocess.run([sys.executable, "-m", "filterx", *map(str, args), "-q"], capture_output=True,
                          text=True, env=env, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def killed(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == CRASH_EXIT, f"exit {proc.returncode}, not killed:\n{proc.stderr[-3000:]}"
    return proc


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), minus the volatile ones."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not _volatile(p.relative_to(root))}


def assert_same_files(ref: Path, got: Path) -> None:
    a, b = files(ref), files(got)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"files differ from the uninterrupted run: {differ}"


def leftovers(root: Path) -> list[str]:
    """Temporary or partial entries under ``root`` (what a killed run may leave, and a finished one must not)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial"))


class Stage:
    """A command to kill and resume: ``build(root)`` makes its inputs, ``args(root)`` its command
    line; the uninterrupted reference is made once, at ``root``, then moved aside."""

    def __init__(self, root: Path, build, args):
        self.root, self.build, self.args = root, build, args
        self.ref = root.with_name(root.name + "-reference")
        build(root)
        ok(cli(*args(root)))
        root.rename(self.ref)

    def kill(self, crash: str) -> subprocess.CompletedProcess:
        if self.root.exists():
            shutil.rmtree(self.root)
        self.build(self.root)
        return killed(cli(*self.args(self.root), crash=crash))

    def resume(self) -> subprocess.CompletedProcess:
        proc = ok(cli(*self.args(self.root)))
        assert leftovers(self.root) == []
        return proc


# ---------------------------------------------------------------- the mechanism


def test_crash_spec_is_parsed_and_checked():
    assert parse("embed.shard:2, commit") == {"embed.shard": 2, "commit": 1}
    with pytest.raises(ValueError, match="unknown crash point 'nope'; valid: commit"):
        parse("nope:1")
    with pytest.raises(ValueError, match="not POINT:N"):
        parse("commit:x")


def test_crash_point_exits_on_the_nth_pass_only():
    code = ("from filterx.core.faults import crash_point\n"
            "for i in range(5):\n    crash_point('select.tar'); print(i, flush=True)\n")
    env = {**os.environ, ENV: "select.tar:3"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == CRASH_EXIT and proc.stdout.split() == ["0", "1"]
    crash_point("select.tar")  # this process has no crash spec: a no-op


# ---------------------------------------------------------------- shard


@pytest.fixture(scope="module")
def shard_stage(image_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-shard") / "ds"
    return Stage(root, lambda r: None,
                 lambda r: ["shard", image_folder, r, "--shard-size", "5", "--workers", "1"])


@pytest.mark.parametrize("crash", ["shard.tar:2", "commit:1", "commit:9"])
def test_shard_killed_then_resumed(shard_stage, crash):
    shard_stage.kill(crash)
    assert not (shard_stage.root / "index.zarr").exists()  # not a dataset until complete
    shard_stage.resume()
    assert_same_files(shard_stage.ref, shard_stage.root)


# ---------------------------------------------------------------- embed and score


def _copy_pair(sample_dirs):
    def build(root: Path) -> None:
        shutil.copytree(sample_dirs[0], root / "source")
        shutil.copytree(sample_dirs[1], root / "target")
    return build


@pytest.fixture(scope="module")
def embed_stage(sample_dirs, encoder_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-embed") / "ws"
    return Stage(root, _copy_pair(sample_dirs),
                 lambda r: ["embed", r / "source", "--encoder", encoder_file, "--backend", "pil",
                            "--device", "cpu", "--batch-size", "16", "--workers", "0"])


@pytest.mark.parametrize("crash", ["embed.shard:1", "commit:1"])
def test_embed_killed_then_resumed(embed_stage, crash):
    embed_stage.kill(crash)
    summary = json.loads(ok(cli(*embed_stage.args(embed_stage.root), "--json")).stdout)
    assert summary["skipped_shards"] == (1 if crash == "embed.shard:1" else 0)  # finished shards are kept
    assert leftovers(embed_stage.root) == []
    assert_same_files(embed_stage.ref, embed_stage.root)


@pytest.fixture(scope="module")
def score_stage(sample_dirs, encoder_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-score") / "ws"
    return Stage(root, _copy_pair(sample_dirs),
                 lambda r: ["score", "--method", "clustering", "--k", "3", "--source", r / "source",
                            "--target", r / "target", "--encoder", encoder_file, "--backend", "pil",
                            "--device", "cpu", "--batch-size", "16", "--workers", "0", "--seed", "5"])


@pytest.mark.parametrize("crash", ["embed.shard:3", "score.solved:1", "commit:4"])
def test_score_killed_then_resumed(score_stage, crash):
    score_stage.kill(crash)
    if crash == "score.solved:1":  # scored but not stored: no scores visible
        assert not (score_stage.root / "source" / "scores.zarr" / "clustering").exists()
    score_stage.resume()
    assert_same_files(score_stage.ref, score_stage.root)


# ---------------------------------------------------------------- select


@pytest.fixture(scope="module")
def scored(sample_dirs, tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("faults-select") / "source"
    shutil.copytree(sample_dirs[0], src)
    ok(cli("score", "--method", "random", "--source", src, "--seed", "1"))
    return src


@pytest.mark.parametrize("name,crash", [("subset.jsonl", "commit:1"), ("subset.npy", "commit:1"),
                                         ("subset.npy", "commit:2"), ("subset", "select.tar:1"),
                                         ("subset", "commit:3")])
def test_select_killed_then_resumed(scored, tmp_path, name, crash):
    args = ["select", "--source", scored, "--method", "random", "--fraction", "0.6"]
    ok(cli(*args, "-o", tmp_path / "ref" / name))
    out = tmp_path / "run" / name
    killed(cli(*args, "-o", out, crash=crash))
    assert not out.exists()  # the manifest appears only when complete
    if crash == "select.tar:1":  # the first tar is done and is kept
        partial = out.with_name(name + ".partial")
        kept = partial / "shards" / "000000.tar"
        assert sorted(p.name for p in (partial / "shards").iterdir()) == ["000000.idx", "000000.tar"]
        stamp = kept.stat().st_mtime_ns
    ok(cli(*args, "-o", out))
    if crash == "select.tar:1":
        assert (out / "shards" / "000000.tar").stat().st_mtime_ns == stamp  # not written again
    assert leftovers(tmp_path / "run") == []
    assert_same_files(tmp_path / "ref", tmp_path / "run")


def test_select_wds_discards_a_partial_of_another_selection(scored, tmp_path):
    args = ["select", "--source", scored, "--method", "random", "-o", tmp_path / "subset"]
    killed(cli(*args, "--fraction", "0.9", crash="select.tar:1"))
    ok(cli(*args, "--fraction", "0.5"))
    ok(cli(*args[:-1], tmp_path / "ref", "--fraction", "0.5"))
    assert_same_files(tmp_path / "ref", tmp_path / "subset")


# ---------------------------------------------------------------- report


@pytest.mark.parametrize("crash", ["report.plot:2", "commit:1"])
def test_report_killed_keeps_the_old_report_then_resumes(scored, tmp_path, crash):
    args = ["report", scored, "--grid", "4"]
    ok(cli(*args, "--fraction", "0.5", "-o", tmp_path / "ref"))
    out = tmp_path / "run"
    ok(cli(*args, "--fraction", "0.2", "-o", out))
    before = files(out)
    killed(cli(*args, "--fraction", "0.5", "-o", out, crash=crash))
    assert files(out) == before  # the earlier report is intact
    ok(cli(*args, "--fraction", "0.5", "-o", out))
    assert leftovers(tmp_path) == []
    a, b = files(tmp_path / "ref"), files(out)
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a if k.endswith(".png"))
    assert sum(k.endswith(".png") for k in a) >= 2
    ref_md = (tmp_path / "ref" / "report.md").read_text().replace(str(tmp_path / "ref"), "OUT")
    assert ref_md == (out / "report.md").read_text().replace(str(out), "OUT")


def test_scores_in_a_crashed_store_are_never_read(scored, tmp_path):
    """A kill while replacing a score array leaves the old array readable and the same."""
    src = tmp_path / "source"
    shutil.copytree(scored, src)
    before = np.asarray(zarr.open_array(src / "scores.zarr" / "random", mode="r")[:])
    killed(cli("score", "--method", "random", "--source", src, "--seed", "2", crash="commit:1"))
    after = np.asarray(zarr.open_array(src / "scores.zarr" / "random", mode="r")[:])
    np.testing.assert_array_equal(before, after)
    info = json.loads(ok(cli("info", src, "--json")).stdout)
    assert [s["name"] for s in info["scores"]] == ["random"]


# ---------------------------------------------------------------- a second writer


def _lock_cases(image_folder, sample_dirs, encoder_file, scored, tmp):
    """(command line, directory, lock name, what the refused run must not have written)."""
    from filterx.stages.embed import load_encoder_tag

    tag = load_encoder_tag(encoder_file)
    pool = Dataset.open(scored)
    return {
        "shard": (["shard", image_folder, tmp / "ds", "--workers", "1"], tmp / "ds", "shard", tmp / "ds" / "index.zarr"),
        "embed": (["embed", scored, "--encoder", encoder_file, "--backend", "pil", "--workers", "0"],
                  pool.embeddings_path(tag).parent, f"embed-{tag}-rank0", pool.embeddings_path(tag)),
        "score": (["score", "--method", "random", "--source", scored, "--name", "second"], scored, "score-second",
                  scored / "scores.zarr" / "second"),
        "select": (["select", "--source", scored, "--method", "random", "--count", "3", "-o", tmp / "s.jsonl"],
                   tmp, "select-s.jsonl", tmp / "s.jsonl"),
        "report": (["report", scored, "-o", tmp / "rep"], tmp, "report-rep", tmp / "rep"),
        "train-encoder": (["train-encoder", sample_dirs[1], tmp / "enc.pt", "--resolution", "64", "--epochs", "1",
                           "--backend", "pil", "--workers", "0"], tmp, "train-encoder-enc.pt", tmp / "enc.pt"),
        "pretrain": (["pretrain", sample_dirs[1], tmp / "pre", "--arch", "resnet18", "--resolution", "32",
                      "--epochs", "1", "--workers", "0", "--backend", "pil"], tmp / "pre", "pretrain",
                     tmp / "pre" / "checkpoint.pt"),
    }


@pytest.mark.parametrize("command", ["shard", "train-encoder", "embed", "score", "select", "report", "pretrain"])
def test_a_second_writer_is_refused(image_folder, sample_dirs, encoder_file, scored, tmp_path, command):
    """While one run holds an output, another run writing it stops with one line and writes nothing."""
    from filterx.io.atomic import run_lock

    args, where, name, output = _lock_cases(image_folder, sample_dirs, encoder_file, scored, tmp_path)[command]
    with run_lock(where, name):
        proc = cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"filterx {command}: error:") and f"being written by {name} in process {os.getpid()}" in line
    assert not output.exists()


def test_workers_of_a_killed_stage_neither_hold_its_lock_nor_outlive_it(tmp_path):
    """A stage's forked workers inherit its lock; killed with SIGKILL, the stage must leave no
    orphan that keeps the lock (a re-run would be refused) or keeps writing."""
    import signal
    import time

    from filterx.io.atomic import run_lock

    code = ("import os, sys, time\n"
            "from concurrent.futures import ProcessPoolExecutor\n"
            "from filterx.io import atomic\n"
            "with atomic.run_lock(sys.argv[1], 'stage'):\n"
            "    pool = ProcessPoolExecutor(2, initializer=atomic.worker_init)\n"
            "    pids = {pool.submit(os.getpid).result() for _ in range(8)}\n"
            "    print(' '.join(map(str, pids)), flush=True)\n"
            "    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    with run_lock(tmp_path, "stage"):  # free at once, although the workers may still be exiting
        pass
    deadline = time.monotonic() + 5
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "orphaned workers outlived the killed stage"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) counts as gone
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return True


# ---------------------------------------------------------------- kill -9 from outside, at random moments


@pytest.fixture(scope="module")
def big_pool(tmp_path_factory, encoder_file):
    """The demo-sized sample pool (3000 images) as an ImageFolder, for runs long enough to kill."""
    from filterx.io.sampledata import make_sample_data

    root = tmp_path_factory.mktemp("faults-big")
    return make_sample_data(root / "data", seed=3).source


def _sigkill_rounds(args: list, rounds: int, longest: float, seed: int) -> int:
    """Start ``args`` up to ``rounds`` times, each killed with SIGKILL after a random delay in
    [0.3, longest] s if still running; stop early once a run finishes by itself. Returns how many
    runs were killed."""
    import random
    import signal
    import time

    rng, kills = random.Random(seed), 0
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["OMP_NUM_THREADS"] = "1"
    for _ in range(rounds):
        proc = subprocess.Popen([sys.executable, "-m", "filterx", *map(str, args), "-q"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.3, longest))
        if proc.poll() is not None:  # finished before the kill: nothing left to interrupt
            err = proc.stderr.read()
            proc.stderr.close()
            assert proc.returncode == 0, err[-2000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kills += 1
    return kills


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["shard", "embed", "select-wds"])
def test_sigkill_at_random_moments_then_finish(big_pool, encoder_file, tmp_path, stage):
    """kill -9 at moments the code does not choose, several times over the same output, then a
    run to the end: the files equal an uninterrupted run's. (Slow: make test-all.)"""
    import time

    def args(root: Path) -> list:
        if stage == "shard":
            # re-encoding every image makes the run long enough to be killed in several places
            return ["shard", big_pool, root / "ds", "--shard-size", "100", "--workers", "2", "--resize-short", "48"]
        if stage == "embed":
            return ["embed", root / "ds", "--encoder", encoder_file, "--backend", "pil", "--device", "cpu",
                    "--batch-size", "50", "--workers", "0"]
        return ["select", "--source", root / "ds", "--method", "random", "--fraction", "0.5", "--format", "wds",
                "-o", root / "subset"]

    def build(root: Path) -> None:
        if stage != "shard":
            shutil.copytree(prepared, root / "ds")

    prepared = tmp_path / "prepared"
    if stage != "shard":
        ok(cli("shard", big_pool, prepared, "--shard-size", "100", "--workers", "2"))
        if stage == "select-wds":
            ok(cli("score", "--method", "random", "--source", prepared, "--seed", "4"))
    root = tmp_path / "run"
    build(root)
    t0 = time.perf_counter()
    ok(cli(*args(root)))
    took = time.perf_counter() - t0
    ref = tmp_path / "reference"
    root.rename(ref)
    build(root)
    kills = _sigkill_rounds(args(root), rounds=8, longest=0.6 * took, seed=len(stage))
    assert kills >= 2
    if not (root / "ds" / "index.zarr").exists() or stage != "shard":
        ok(cli(*args(root)))  # (a finished shard refuses to run again over its dataset)
    assert leftovers(root) == []
    assert_same_files(ref, root)
