"""pretrain --objective moco under torchrun: two gloo ranks on the CPU, real process groups.

What two ranks add to one process: the query encoder under DDP, the key batch shuffled across
ranks for its BatchNorm, every rank's keys gathered into one queue, and a checkpoint that must
hold enough (key encoder, queue, pointer) for a resumed two-rank run to continue exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from filterx.io.sampledata import make_sample_data
from filterx.stages.shard import ShardConfig, shard
from filterx.train.common import MODEL

REPO = Path(__file__).resolve().parent.parent
SCRIPT = """
import json, os, sys
from pathlib import Path
from filterx.train.pretrain import PretrainConfig, pretrain
cfg = json.loads(sys.argv[1])
cfg["data"], cfg["out"] = Path(cfg["data"]), Path(cfg["out"])
s = pretrain(PretrainConfig(**cfg))
if os.environ["RANK"] == "0":  # one line: two ranks printing at once can share a line of the pipe
    print(json.dumps({"losses": [r["loss"] for r in s.history], "start_epoch": s.start_epoch}))
"""


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """13 classes x 4 images (52: two ranks x 13 x 2 steps per epoch)."""
    root = tmp_path_factory.mktemp("moco_ranks")
    sd = make_sample_data(root / "raw", per_class=4, target_per_class=2, photos=2, textures=1, size_range=(32, 40))
    shard(ShardConfig(sd.source, root / "src", shard_size=20, workers=1, quiet=True))
    return root / "src"


def _torchrun(data: Path, tmp_path: Path, out: Path, **kw) -> dict:
    """pretrain --objective moco on two ranks; (per-epoch losses, start epoch) from rank 0."""
    cfg = {**dict(data=str(data), out=str(out), arch="resnet18", objective="moco", epochs=2, batch_size=13,
                  lr=0.03, schedule="step", seed=3, resolution=32, workers=0, device="cpu", quiet=True), **kw}
    script = tmp_path / "run_moco.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), json.dumps(cfg)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][0])


def test_two_ranks_gather_one_queue_and_resume_exactly(pool, tmp_path):
    full = _torchrun(pool, tmp_path, tmp_path / "full")
    _torchrun(pool, tmp_path, tmp_path / "half", epochs=1)
    resumed = _torchrun(pool, tmp_path, tmp_path / "half", resume=True)
    assert resumed["start_epoch"] == 1 and full["losses"] == resumed["losses"]
    a = torch.load(tmp_path / "full" / MODEL, weights_only=False)
    b = torch.load(tmp_path / "half" / MODEL, weights_only=False)
    assert a["settings"]["world_size"] == 2 and a["settings"]["global_batch"] == 26
    # both ranks' keys reach the queue: the pointer moves by the global batch at every step
    assert a["moco"]["queue_ptr"] == (2 * 2 * 26) % a["settings"]["moco_queue"]
    for k in a["moco"]:  # key encoder, queue and pointer: the resumed run continued exactly
        assert torch.equal(a["moco"][k], b["moco"][k]), k
    assert torch.isfinite(a["moco"]["queue"]).all()
