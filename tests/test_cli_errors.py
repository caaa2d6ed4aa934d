"""OS errors and bad parameter values reach the user as one line with exit status 2, and leave
no temporary behind: a full disk, a read-only output, an output that is a directory, a
parameter of the wrong type, a second concurrent `score`."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from filterx.io.atomic import TMP_MARK

TINY = 384 * 1024  # bytes of the small file system: room for the index but not for every tar


def cli(*args):
    return subprocess.run([sys.executable, "-m", "filterx", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def one_line(proc, command: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith(("WARNING", "INFO"))]
    assert len(lines) == 1 and lines[0].startswith(f"filterx {command}: error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TMP_MARK in p.name]


def _mount_tmpfs(mnt: Path, size: int) -> None:
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")


@pytest.fixture()
def small_fs(tmp_path):
    """A real, small tmpfs: ENOSPC when full; needs root."""
    _mount_tmpfs(tmp_path / "mnt", TINY)
    yield tmp_path / "mnt"
    subprocess.run(["umount", "-l", str(tmp_path / "mnt")], check=False)


@pytest.fixture()
def read_only_copy(tmp_path, sample_dirs):
    """The sample pool copied onto a tmpfs that is then remounted read-only (EROFS)."""
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, 64 << 20)
    shutil.copytree(sample_dirs[0], mnt / "source")
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _big_folder(root: Path, n: int = 24) -> Path:
    """An ImageFolder of noise JPEGs (incompressible) that needs more than TINY bytes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n // 2):
            Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(root / f"c{c}/{i}.jpg",
                                                                                     quality=95)
    return root


def test_shard_onto_a_full_disk_is_one_line_and_leaves_no_temporary(small_fs, tmp_path):
    src = _big_folder(tmp_path / "imgs")
    proc = cli("shard", src, small_fs / "ds", "--shard-size", 4, "--workers", 1, "-q")
    line = one_line(proc, "shard")
    assert "no space left on" in line.lower() and "re-run" in line
    assert temporaries(small_fs) == []


def test_select_wds_onto_a_full_disk_is_one_line_and_leaves_no_temporary(small_fs, tmp_path):
    src = _big_folder(tmp_path / "imgs")
    assert cli("shard", src, tmp_path / "ds", "--shard-size", 4, "--workers", 1, "-q").returncode == 0
    assert cli("score", "--method", "random", "--source", tmp_path / "ds", "-q").returncode == 0
    proc = cli("select", "--source", tmp_path / "ds", "--method", "random", "--fraction", 1.0, "--format", "wds",
               "-o", small_fs / "subset", "-q")
    assert "No space left on device" in one_line(proc, "select")
    assert temporaries(small_fs) == []


def test_a_read_only_output_is_one_line(read_only_copy, sample_dirs, tmp_path):
    # score takes a lock file inside the dataset dir: EROFS there
    proc = cli("score", "--method", "random", "--source", read_only_copy / "source", "-q")
    assert "Read-only file system" in one_line(proc, "score")
    src = tmp_path / "source"
    shutil.copytree(sample_dirs[0], src)
    assert cli("score", "--method", "random", "--source", src, "-q").returncode == 0
    proc = cli("select", "--source", src, "--method", "random", "--count", 3, "-o", read_only_copy / "subset.jsonl",
               "-q")
    assert "Read-only file system" in one_line(proc, "select")


def test_a_parameter_of_the_wrong_type_is_one_line(sample_dirs, encoder_file):
    proc = cli("score", "--method", "clustering", "--source", sample_dirs[0], "--target", sample_dirs[1],
               "--encoder", encoder_file, "-p", "niter=abc", "-q")
    line = one_line(proc, "score")
    assert "parameter niter takes int, got 'abc'" in line


def test_a_second_score_run_is_refused_before_it_embeds(sample_dirs, encoder_file, tmp_path):
    """The lock covers the whole run: a second run writing the same scores does not embed the
    pool (minutes to hours) before finding that the first holds them."""
    from filterx.io.atomic import run_lock
    from filterx.io.dataset import Dataset
    from filterx.stages.embed import load_encoder_tag

    src = tmp_path / "source"
    shutil.copytree(sample_dirs[0], src)
    shutil.rmtree(src / "embeddings", ignore_errors=True)
    with run_lock(src, "score-domain-cls"):
        proc = cli("score", "--method", "domain-cls", "--source", src, "--target", sample_dirs[1], "--encoder",
                   encoder_file, "--backend", "pil", "--device", "cpu", "--workers", 0, "-q")
    assert f"being written by score-domain-cls in process {os.getpid()}" in one_line(proc, "score")
    assert not Dataset.open(src).embeddings_path(load_encoder_tag(encoder_file)).exists()


def test_filterx_alone_prints_its_help_not_an_error_line():
    proc = subprocess.run([sys.executable, "-m", "filterx"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("Usage: filterx") and "error:" not in proc.stderr
