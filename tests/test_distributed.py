"""Collectives on the group's device, under an emulation of NCCL's device rule on gloo ranks.

NCCL serves CUDA tensors only; a CPU tensor handed to it raises "No backend type associated
with device type cpu". A CPU-only machine has no NCCL, so the script below runs real gloo
ranks and makes them behave like an NCCL group on a fake CUDA device: the group declares
"cuda" as its device (``collectives.group_device``), a copy made for that device is tagged as
living there (``collectives.move``), and ``torch.distributed.all_reduce`` refuses any tensor
without the tag, with NCCL's message. ``fit`` must then reduce its epoch statistics.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import filterx
from filterx.core import collectives

REPO = Path(filterx.__file__).resolve().parent.parent

_EMULATED_NCCL_RANK = r"""
import json, os, sys
from pathlib import Path

import torch
import torch.distributed as dist

from filterx.core import collectives
from filterx.train.common import Run, Runtime, fit

FAKE = torch.device("cuda", 0)  # never allocated: the tag below stands for "on this device"
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

real_move, real_all_reduce = collectives.move, dist.all_reduce
seen = []


def move(t, device):
    out = real_move(t, torch.device("cpu"))
    if torch.device(device) == FAKE:
        out.on_fake_cuda = True
    return out


def nccl_all_reduce(t, *args, **kwargs):
    seen.append(getattr(t, "on_fake_cuda", False))
    if not getattr(t, "on_fake_cuda", False):
        raise RuntimeError(f"No backend type associated with device type {t.device.type}")
    return real_all_reduce(t, *args, **kwargs)


collectives.group_device = lambda: FAKE
collectives.move = move
dist.all_reduce = nccl_all_reduce

out = Path(sys.argv[1])
param = torch.nn.Parameter(torch.zeros(1))
sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([param], lr=0.1), lambda s: 1.0)


def train_epoch(epoch, bar):
    # what a rank's loop accumulates: float64 sums that differ per rank
    return {"n": torch.tensor(10.0 + rank, dtype=torch.float64),
            "loss": torch.tensor(2.0 * (rank + 1) + epoch, dtype=torch.float64)}


run = Run(out, "emulated", 2, 10 * world, train_epoch, lambda t: {"loss": t["loss"] / t["n"]},
          lambda epoch: {}, lambda: {}, sched, seed=0)
history = fit(run, Runtime("cpu", rank, world), 0, quiet=True)
gathered = collectives.all_gather_object(rank * 100)
total = collectives.all_reduce_sum(torch.tensor([rank + 1.0]))
collectives.barrier()
(out.parent / f"result_{rank}.json").write_text(json.dumps({"rank": rank, "images": [r["images"] for r in history],
                            "loss": [r["loss"] for r in history], "gathered": gathered,
                            "total": total.tolist(), "on_fake_cuda": seen}))
dist.destroy_process_group()
# Leave without the interpreter's and torch's teardown: under load a rank sometimes aborted
# there ("terminate called without an active exception", SIGABRT) after the group was
# destroyed and its result written, which fails the torchrun job. What this test checks is
# written above; exit-time teardown of the CLI's own torchrun runs is covered by their tests.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


@pytest.mark.parametrize("world", [2, 3])
def test_epoch_statistics_reduce_on_the_group_device_under_emulated_nccl(world, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(_EMULATED_NCCL_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(world), str(script), str(tmp_path / "run")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in range(world)]
    assert [r["rank"] for r in results] == list(range(world))
    images = sum(10 + r for r in range(world))  # n: 10 + rank, summed over the ranks
    for r in results:
        # loss: sum over ranks of 2 (rank + 1) + epoch, divided by the summed n, on every rank
        assert r["images"] == [images, images]
        assert r["loss"] == pytest.approx([sum(2 * (k + 1) + e for k in range(world)) / images for e in (0, 1)])
        assert r["gathered"] == [100 * k for k in range(world)] and r["total"] == [world * (world + 1) / 2]
        assert r["on_fake_cuda"] == [True, True, True]  # two epochs' statistics, then the direct call


def test_one_process_collectives_are_local():
    t = torch.tensor([1.0, 2.0], dtype=torch.float64)
    out = collectives.all_reduce_sum(t)
    assert torch.equal(out, t) and out is not t and out.device == t.device
    assert collectives.all_gather_object({"a": 1}) == [{"a": 1}]
    collectives.barrier()  # no group: returns at once
    assert not collectives.is_distributed()
