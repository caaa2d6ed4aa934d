"""pretrain / finetune on tiny real shards (32 px, tens of images, 1-2 epochs, CPU)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import filterx
from filterx.io.dataset import Dataset
from filterx.decode.loader import LoaderConfig, load_batches
from filterx.models.archs import build_model, get_head
from filterx.core.runtime import seed_everything
from filterx.io.sampledata import make_sample_data
from filterx.stages.shard import ShardConfig, shard
from filterx.train.pretrain import PretrainConfig, pretrain
from filterx.core.faults import CRASH_EXIT, ENV as CRASH_ENV
from filterx.train.common import CHECKPOINT, METRICS, MODEL, Schedule, load_checkpoint
from filterx.train.data import batches_per_epoch, resolve_training_data
from filterx.train.common import TrainSummary
from filterx.train.finetune import (
    DomainClassifier, FinetuneConfig, FinetuneNet, dann_lambda, finetune, finetune_loss,
    grad_reverse, initial_model, pseudo_label_loss, selected_epoch, split_target,
)

REPO = Path(filterx.__file__).resolve().parent.parent
RES = 32
# Small everywhere: 32 px images, a 256-wide alexnet_lrn, no loader worker processes.
COMMON = dict(resolution=RES, workers=0, device="cpu", quiet=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shards: ``src`` 13 classes x 4 images, ``val`` the same 13 classes x 1 (odd on purpose:
    two ranks must pad), ``tgt`` 5 classes x 6."""
    root = tmp_path_factory.mktemp("train_data")
    sd = make_sample_data(root / "raw", per_class=4, target_per_class=6, photos=2, textures=1,
                          size_range=(32, 40))
    held = make_sample_data(root / "raw_val", per_class=1, target_per_class=1, photos=2, textures=1,
                            size_range=(32, 40), seed=1)
    out = {}
    for name, src, size in (("src", sd.source, 20), ("val", held.source, 20), ("tgt", sd.target, 16)):
        shard(ShardConfig(src, root / name, shard_size=size, workers=1, quiet=True))
        out[name] = root / name
    out["root"] = root
    return out


def _pretrain_cfg(dirs, out, **kw):
    base = dict(data=dirs["src"], out=out, arch="resnet18", epochs=2, batch_size=13, val=dirs["val"], seed=3,
                **COMMON)
    return PretrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """An uninterrupted 2-epoch resnet18 run (with augmentation): the reference for the resume
    test and the init for the fine-tuning tests."""
    out = tmp_path_factory.mktemp("pre") / "run"
    summary = pretrain(_pretrain_cfg(data, out))
    return out, summary


def _run_script(args: list[str], env_extra: dict, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env_extra}
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


_SCRIPT = """
import json, sys
from pathlib import Path
from filterx.train.pretrain import FinetuneConfig, PretrainConfig, finetune, pretrain
kind, cfg = sys.argv[1], json.loads(sys.argv[2])
for k in ("data", "out", "val", "target", "test", "unlabeled", "init"):
    if cfg.get(k):
        cfg[k] = Path(cfg[k])
pretrain(PretrainConfig(**cfg)) if kind == "pretrain" else finetune(FinetuneConfig(**cfg))
"""


def _script_args(tmp_path: Path, cfg, kind: str = "pretrain") -> list[str]:
    """A command line running ``pretrain`` / ``finetune`` with ``cfg`` in a fresh interpreter."""
    script = tmp_path / "run_training.py"
    script.write_text(_SCRIPT)
    return [str(script), kind, json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()})]


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------- pieces


def test_schedules_follow_their_formulas():
    step = Schedule("step", steps_per_epoch=10, total_steps=900, step_epochs=30, gamma=0.1)
    assert [step.factor(s) for s in (0, 299, 300, 599, 600)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    inv = Schedule("inv", steps_per_epoch=10, total_steps=100)
    assert inv.factor(50) == pytest.approx((1 + 10 * 0.5) ** -0.75)
    assert inv.factor(100) == pytest.approx(11**-0.75)
    cos = Schedule("cosine", 10, 100, warmup_steps=10)
    assert cos.factor(0) == pytest.approx(0.1 * 1.0) and cos.factor(50) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="valid: step, cosine, inv"):
        Schedule("linear", 1, 1)
    assert dann_lambda(0.0) == 0.0 and dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)


@pytest.mark.parametrize("n,batch,workers,world", [(52, 13, 0, 1), (52, 5, 0, 2), (27, 4, 0, 2), (27, 4, 2, 1)])
def test_steps_per_epoch_match_the_loader(data, n, batch, workers, world):
    ds = Dataset.open(data["src"])
    ids = np.arange(n)
    cfg = LoaderConfig(resolution=16, backend="pil", batch_size=batch, workers=workers, shuffle=True)
    for rank in range(world):
        sizes = [len(b.ids) for b in load_batches(ds.tar_paths(), cfg, rank=rank, world_size=world, ids=ids)]
        assert sum(s >= 2 for s in sizes) == batches_per_epoch(n, batch, workers, world, "torchvision")


def test_steps_per_epoch_match_dali_ranks(data):
    # DALI pads its reader shards to ceil(52 / 3) = 18 images each: batches of 4, 4, 4, 4, 2
    pytest.importorskip("nvidia.dali")
    tars = Dataset.open(data["src"]).tar_paths()
    cfg = LoaderConfig(resolution=16, backend="dali", batch_size=4, workers=1, shuffle=True)
    usable = [sum(len(b.ids) >= 2 for b in load_batches(tars, cfg, rank=r, world_size=3)) for r in range(3)]
    assert usable == [5, 5, 5] == [batches_per_epoch(52, 4, 1, 3, "dali")] * 3
    cfg = LoaderConfig(resolution=16, backend="dali", batch_size=5, workers=1, shuffle=True)
    sizes = [len(b.ids) for b in load_batches(tars, cfg, rank=1, world_size=2)]
    assert sizes == [5, 5, 5, 5, 5, 1] and batches_per_epoch(52, 5, 1, 2, "dali") == 5


def test_resolve_dataset_dir_and_clear_errors(data, tmp_path):
    d = resolve_training_data(data["src"])
    ds = Dataset.open(data["src"])
    assert d.ids is None and d.tars == ds.tar_paths() and d.num_classes == 13 == len(d.class_names)
    assert np.array_equal(d.labels, ds.labels) and d.count == 52
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        resolve_training_data(missing)
    junk = tmp_path / "junk.txt"
    junk.write_text("not a manifest\n")
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(str(junk))):
        resolve_training_data(junk)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        pretrain(_pretrain_cfg(data, tmp_path / "out", data=missing))
    with pytest.raises(ValueError, match="valid: alexnet_lrn, resnet18"):
        PretrainConfig(data=data["src"], out=tmp_path, arch="vgg")
    with pytest.raises(ValueError, match="needs an unlabeled"):
        FinetuneConfig(target=data["tgt"], out=tmp_path, arch="resnet18", method="dann")


def _manifest(path: Path, fmt: str, source: Path, ids: np.ndarray, **header_changes) -> Path:
    from filterx.io.manifest import make_header, write_manifest

    ds = Dataset.open(source)
    header = {**make_header(ds, "random", {"count": len(ids)}, len(ids)), **header_changes}
    return write_manifest(path, fmt, ds, ids, np.zeros(len(ids), np.float32), header)


@pytest.mark.parametrize("fmt", ["jsonl", "wds"])
def test_manifest_selects_its_ids(data, tmp_path, fmt):
    pytest.importorskip("filterx.io.manifest")
    ds = Dataset.open(data["src"])
    ids = np.arange(0, 52, 3)
    d = resolve_training_data(_manifest(tmp_path / f"sel.{fmt}", fmt, data["src"], ids[::-1]))
    assert np.array_equal(d.sample_ids, ids) and np.array_equal(d.labels, ds.labels[ids]) and d.num_classes == 13
    if fmt == "wds":  # materialised: whole tars (DALI can read them), no id filter
        assert d.ids is None and all(str(tmp_path) in str(t) for t in d.tars)
    else:
        assert np.array_equal(d.ids, ids) and d.tars == ds.tar_paths()
    got = np.concatenate([b.ids.numpy() for b in load_batches(
        d.tars, LoaderConfig(resolution=16, backend="pil", workers=0), ids=d.ids)])
    assert sorted(got.tolist()) == ids.tolist()


def test_manifest_errors_name_the_path(data, tmp_path):
    pytest.importorskip("filterx.io.manifest")
    gone = tmp_path / "moved_dataset"
    m = _manifest(tmp_path / "orphan.jsonl", "jsonl", data["src"], np.arange(5), dataset=str(gone))
    with pytest.raises(FileNotFoundError, match=re.escape(str(gone))):
        resolve_training_data(m)
    wrong = _manifest(tmp_path / "wrong.jsonl", "jsonl", data["src"], np.arange(5), fingerprint="0123456789abcdef")
    with pytest.raises(ValueError, match=re.escape(str(wrong))):
        resolve_training_data(wrong)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none.jsonl"))):
        pretrain(_pretrain_cfg(data, tmp_path / "out", data=tmp_path / "none.jsonl"))


# ---------------------------------------------------------------- pretrain


def test_pretrain_writes_checkpoint_metrics_and_model(data, pretrained):
    out, summary = pretrained
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows == summary.history
    for r in rows:
        assert r["images"] == 52 and r["val_count"] == 13 and 0 <= r["val_top1"] <= r["val_top5"] <= 1
        assert np.isfinite(r["loss"]) and r["img_s"] > 0
        assert r["lr"] == pytest.approx(0.1 * 13 / 256)  # resnet18: 0.1 per 256 images
    ck = load_checkpoint(out / CHECKPOINT)
    assert ck["epoch"] == 2 and ck["arch"] == "resnet18" and ck["num_classes"] == 13
    assert ck["settings"]["global_batch"] == 13 and set(ck["rng"]) >= {"torch", "numpy", "python"}
    assert ck["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert ck["optimizer"]["param_groups"][0]["weight_decay"] == 1e-4
    final = load_checkpoint(out / MODEL)
    for k, v in final["model"].items():
        assert torch.equal(v, ck["model"][k])
    assert "optimizer" not in final
    with pytest.raises(ValueError, match="resume"):
        pretrain(_pretrain_cfg(data, out))


# 52 images in batches of 13: 4 steps an epoch; per epoch the checkpoint is the 1st atomic
# commit and the metrics the 2nd. (crash, epochs saved when it struck)
KILLS = [("train.epoch:1", 1), ("train.step:6", 1), ("train.step:2", 0), ("commit:3", 1)]


@pytest.mark.parametrize("crash,saved", KILLS, ids=[k for k, _ in KILLS])
def test_resume_after_a_kill_anywhere_is_bit_identical(data, pretrained, tmp_path, crash, saved):
    """Killed after an epoch, mid-epoch, before any checkpoint, or while saving one: the
    re-run with --resume ends with the same weights, optimiser state and metrics."""
    ref_out, ref = pretrained
    out = tmp_path / "crashed"
    # one thread, as in this process: bit-identical results need the same reduction order
    proc = _run_script([sys.executable, *_script_args(tmp_path, _pretrain_cfg(data, out))],
                       {CRASH_ENV: crash, "OMP_NUM_THREADS": "1"}, tmp_path)
    assert proc.returncode == CRASH_EXIT, proc.stderr[-3000:]
    assert not (out / MODEL).exists()
    assert (load_checkpoint(out / CHECKPOINT)["epoch"] if saved else (out / CHECKPOINT).exists()) == saved
    if saved:
        with pytest.raises(ValueError, match=r"lr: 0.1 -> 0.02"):
            pretrain(_pretrain_cfg(data, out, resume=True, lr=0.02))
    resumed = pretrain(_pretrain_cfg(data, out, resume=True))
    assert resumed.start_epoch == saved
    a, b = _state(ref_out / CHECKPOINT), _state(out / CHECKPOINT)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:  # parameters and BatchNorm buffers
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    keep = ("loss", "train_top1", "val_top1", "val_loss", "lr")
    assert [{k: r[k] for k in keep} for r in ref.history] == [{k: r[k] for k in keep} for r in resumed.history]


def test_two_gloo_ranks_match_one_process(data, tmp_path):
    # alexnet_lrn has no BatchNorm (torch has no CPU SyncBatchNorm, so a BN network's
    # statistics would be per rank); dropout and augmentation are off because their random
    # draws depend on how samples are split between ranks; the torchvision backend deals one
    # shared shuffle round-robin to the ranks (DALI gives each rank a contiguous part of the
    # data, so its global batches depend on the world size). Everything else must agree: the
    # global batch (2 x 13 = 1 x 26), the data order, the DDP-averaged gradients, and the
    # evaluation (13 images: rank 1 gets a padded duplicate that evaluate() must drop).
    opts = dict(arch="alexnet_lrn", model_options={"dropout": 0.0, "fc_dim": 256}, augment=False,
                backend="torchvision")
    two = tmp_path / "two"
    proc = _run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        *_script_args(tmp_path, _pretrain_cfg(data, two, batch_size=13, **opts))],
                       {"OMP_NUM_THREADS": "1"}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = pretrain(_pretrain_cfg(data, tmp_path / "one", batch_size=26, **opts))
    a, b = _state(tmp_path / "one" / MODEL), _state(two / MODEL)
    assert b["settings"]["world_size"] == 2 and b["settings"]["global_batch"] == 26
    seed_everything(3)  # pretrain's initial weights
    start = build_model("alexnet_lrn", 13, **opts["model_options"]).state_dict()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5, msg=k)
        assert not torch.equal(a["model"][k], start[k]), k  # every layer trained
    for ra, rb in zip(one.history, b["history"]):
        assert ra["images"] == rb["images"] == 52 and ra["val_count"] == rb["val_count"] == 13
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb["val_top1"] == ra["val_top1"] and rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)


# ---------------------------------------------------------------- finetune


def _finetune_cfg(dirs, out, **kw):
    base = dict(target=dirs["tgt"], out=out, epochs=1, batch_size=8, seed=5, **COMMON)
    return FinetuneConfig(**{**base, **kw})


def test_frozen_backbone_stays_bit_identical_and_head_learns(data, pretrained, tmp_path):
    pre_out, _ = pretrained
    cfg = _finetune_cfg(data, tmp_path / "ft", init=pre_out / MODEL, freeze_backbone=True)
    summary = finetune(cfg)
    init = load_checkpoint(pre_out / MODEL)["model"]
    out = load_checkpoint(tmp_path / "ft" / MODEL)
    assert out["num_classes"] == 5 and out["model"]["fc.weight"].shape == (5, 512)
    backbone = [k for k in out["model"] if not k.startswith("fc.")]
    assert any("running_mean" in k for k in backbone)
    for k in backbone:  # weights, BatchNorm running statistics and batch counters
        assert torch.equal(out["model"][k], init[k]), k
    seed_everything(cfg.seed)
    start, _, _ = initial_model(cfg, 5)
    assert not torch.equal(out["model"]["fc.weight"], start.fc.weight.detach())
    groups = load_checkpoint(tmp_path / "ft" / CHECKPOINT)["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [pytest.approx(0.01)]  # the head alone, at 10x
    r = summary.history[0]
    # 30 target images: 1 of each class's 6 held out for test, 1 of the other 5 for validation
    assert r["test_count"] == 5 and 0 <= r["test_top1"] <= 1 and "test_top5" in r
    assert r["val_count"] == 5 and 0 <= r["val_top1"] <= 1 and r["images"] == 20
    assert out["best_val_epoch"] == 0 and out["test_top1_at_best_val"] == r["test_top1"] == out["test_top1_last"]


def test_selected_epoch_is_chosen_by_validation_never_by_test():
    # test top-1 peaks at epoch 1, validation at epoch 2 (tied with 3: the earlier wins)
    history = [{"epoch": e, "val_top1": v, "test_top1": t}
               for e, (v, t) in enumerate([(0.2, 0.3), (0.4, 0.9), (0.6, 0.5), (0.6, 0.7), (0.5, 0.4)])]
    assert selected_epoch(history) == {"best_val_top1": 0.6, "best_val_epoch": 2, "test_top1_at_best_val": 0.5,
                                       "test_top1_last": 0.4}
    line = TrainSummary("finetune", Path("o"), Path("o/model.pt"), 5, 0, 1, 1.0, history).line()
    assert "val_top1 50.0% (best 60.0% at epoch 2)" in line
    assert "test_top1 50.0% at epoch 2, the best on val (last epoch 40.0%)" in line and "90.0%" not in line
    no_val = [{"epoch": 0, "test_top1": 0.3}, {"epoch": 1, "test_top1": 0.2}]
    assert selected_epoch(no_val) == {"best_val_top1": None, "best_val_epoch": None,
                                      "test_top1_at_best_val": None, "test_top1_last": 0.2}
    assert "test_top1 20.0% (last epoch)" in TrainSummary("finetune", Path("o"), Path("o/m"), 2, 0, 1, 1.0,
                                                          no_val).line()


def test_finetune_splits_are_disjoint_and_validation_picks_the_epoch(data, pretrained, tmp_path):
    pre_out, _ = pretrained
    cfg = _finetune_cfg(data, tmp_path / "ft", init=pre_out / MODEL, freeze_backbone=True, epochs=3)
    train, val, test = split_target(cfg)
    ids = [set(d.sample_ids.tolist()) for d in (train, val, test)]
    assert [len(i) for i in ids] == [20, 5, 5] and set.union(*ids) == set(range(30))
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for d in (val, test):  # stratified: one image of every class
        assert sorted(d.labels.tolist()) == [0, 1, 2, 3, 4]
    finetune(cfg)
    rows = [json.loads(line) for line in (tmp_path / "ft" / METRICS).read_text().splitlines()]
    assert len(rows) == 3 and all(r["val_count"] == 5 and r["test_count"] == 5 for r in rows)
    val_top1 = [r["val_top1"] for r in rows]
    chosen = int(np.argmax(val_top1))  # the first of the best
    saved = load_checkpoint(tmp_path / "ft" / MODEL)
    assert saved["best_val_epoch"] == chosen and saved["best_val_top1"] == val_top1[chosen]
    assert saved["test_top1_at_best_val"] == rows[chosen]["test_top1"]
    assert saved["test_top1_last"] == rows[-1]["test_top1"] and "best_test_top1" not in saved
    # with its own test data, validation is carved from the target alone
    train2, val2, test2 = split_target(_finetune_cfg(data, tmp_path / "x", test=data["tgt"], init=pre_out / MODEL))
    assert (train2.count, val2.count, test2.count) == (25, 5, 30)
    assert not set(train2.sample_ids.tolist()) & set(val2.sample_ids.tolist())
    with pytest.raises(ValueError, match="val_fraction must be in"):
        _finetune_cfg(data, tmp_path / "y", init=pre_out / MODEL, val_fraction=1.0)


def _tiny_net(num_classes=5, seed=0):
    torch.manual_seed(seed)
    return build_model("resnet18", num_classes)


def test_gradient_reversal_flips_the_domain_gradient_into_the_backbone():
    x_s, x_u = torch.randn(4, 3, RES, RES), torch.randn(4, 3, RES, RES)
    ft = FinetuneNet(_tiny_net(), DomainClassifier(512, 16)).eval()  # eval: no dropout, fixed BN

    def grads(lam):
        ft.zero_grad()
        _, dom = ft(x_s, x_u, lam)
        F.binary_cross_entropy_with_logits(dom.squeeze(1), torch.tensor([1.0] * 4 + [0.0] * 4)).backward()
        return ft.net.layer4[1].conv2.weight.grad.clone(), ft.domain.layers[0].weight.grad.clone()

    back_rev, dom_rev = grads(0.5)
    back_id, dom_id = grads(-1.0)  # -(-1) x gradient: no reversal
    torch.testing.assert_close(back_rev, -0.5 * back_id)
    torch.testing.assert_close(dom_rev, dom_id)
    assert float(back_id.abs().max()) > 0
    x = torch.randn(3, requires_grad=True)
    grad_reverse(x, 0.25).sum().backward()
    assert x.grad.tolist() == [-0.25] * 3


def test_dann_step_updates_domain_classifier_backbone_and_head():
    ft = FinetuneNet(_tiny_net(), DomainClassifier(512, 16)).train()
    before = {k: v.clone() for k, v in ft.state_dict().items()}
    opt = torch.optim.SGD(ft.parameters(), lr=0.1)
    logits, dom = ft(torch.randn(4, 3, RES, RES), torch.randn(4, 3, RES, RES), 0.5)
    assert logits.shape == (8, 5) and dom.shape == (8, 1)
    loss, stats = finetune_loss(logits, dom, torch.tensor([0, 1, 2, 3]), method="dann")
    loss.backward()
    opt.step()
    after = ft.state_dict()
    for prefix in ("domain.layers.0.", "domain.layers.6.", "net.conv1.", "net.layer4.1.conv2.", "net.fc."):
        changed = [k for k in after if k.startswith(prefix) and not torch.equal(after[k], before[k])]
        assert changed, prefix
    assert float(stats["domain_loss"]) > 0 and float(stats["domain_n"]) == 8


@pytest.mark.parametrize("confident", [True, False])
def test_pseudo_labels_join_the_loss_only_when_confident(confident):
    net = _tiny_net()
    head = get_head(net)
    with torch.no_grad():  # logits = bias for every image: confidence is set by hand
        head.weight.zero_()
        head.bias.copy_(torch.tensor([10.0, 0, 0, 0, 0]) if confident else torch.zeros(5))
    ft = FinetuneNet(net)
    y = torch.tensor([1, 2, 3, 1])
    logits, _ = ft(torch.randn(4, 3, RES, RES), torch.randn(6, 3, RES, RES))
    loss, stats = finetune_loss(logits, None, y, method="pseudo-label", pseudo_threshold=0.95, pseudo_weight=0.5)
    loss.backward()
    p = torch.softmax(head.bias.detach(), 0)
    expected = (p - F.one_hot(y, 5).float()).mean(0)
    if confident:
        expected += 0.5 * (p - F.one_hot(torch.tensor(0), 5).float())  # all 6 of 6 kept
    torch.testing.assert_close(head.bias.grad, expected)
    assert float(stats["pseudo_kept"]) == (6 if confident else 0) and float(stats["unlabeled"]) == 6
    # the loss term itself: exact zeros when nothing passes the cut-off
    lu = torch.tensor([[3.0, 0.0], [0.1, 0.0]], requires_grad=True)
    val, mask = pseudo_label_loss(lu, 0.9)
    assert mask.tolist() == [True, False]
    assert val.item() == pytest.approx(F.cross_entropy(lu[:1], torch.tensor([0])).item() / 2)
    val.backward()
    assert lu.grad[1].tolist() == [0.0, 0.0]


def test_dann_and_pseudo_label_finetune_end_to_end(data, pretrained, tmp_path):
    pre_out, _ = pretrained
    cfg = _finetune_cfg(data, tmp_path / "dann", init=pre_out / MODEL, method="dann", unlabeled=data["val"],
                        dann_hidden=32, test=data["tgt"])
    dann = finetune(cfg)
    r = dann.history[0]
    assert 0 <= r["domain_acc"] <= 1 and r["domain_loss"] > 0 and r["test_count"] == 30
    ck = load_checkpoint(tmp_path / "dann" / CHECKPOINT)
    assert [g["initial_lr"] for g in ck["optimizer"]["param_groups"]] == pytest.approx([0.001, 0.01, 0.01])
    init = load_checkpoint(pre_out / MODEL)["model"]
    assert not torch.equal(ck["model"]["conv1.weight"], init["conv1.weight"])  # backbone adapted
    seed_everything(cfg.seed)  # rebuild the starting point as finetune did
    initial_model(cfg, 5)
    start = DomainClassifier(512, 32).state_dict()
    assert start.keys() == ck["domain"].keys()
    assert all(not torch.equal(start[k], v) for k, v in ck["domain"].items())  # every layer learned
    # from scratch (the baseline) with a cut-off every prediction passes: all unlabelled kept
    pl = finetune(_finetune_cfg(data, tmp_path / "pl", arch="resnet18", method="pseudo-label",
                                unlabeled=data["val"], pseudo_threshold=0.01))
    assert pl.history[0]["pseudo_share"] == 1.0 and pl.history[0]["test_count"] == 5
    assert pl.history[0]["val_count"] == 5
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        finetune(_finetune_cfg(data, tmp_path / "x", init=tmp_path / "missing.pt"))


@pytest.fixture(scope="module")
def dann_reference(data, pretrained, tmp_path_factory):
    """An uninterrupted 2-epoch DANN fine-tuning run: (its dir, summary, the config keywords)."""
    kw = dict(init=pretrained[0] / MODEL, method="dann", unlabeled=data["val"], dann_hidden=32, epochs=2)
    out = tmp_path_factory.mktemp("dann") / "ref"
    return out, finetune(_finetune_cfg(data, out, **kw)), kw


# 20 training images (30 less 5 test, 5 validation) in batches of 8: 3 steps an epoch; step 4
# is the first of epoch 2
@pytest.mark.parametrize("crash", ["train.epoch:1", "train.step:4"])
def test_dann_finetune_resumes_bit_identically(data, dann_reference, tmp_path, crash):
    # the unlabelled stream, the DANN schedule and the domain classifier must all pick up
    # where the killed run left them, after an epoch or in the middle of one
    ref_out, ref, kw = dann_reference
    out = tmp_path / "crashed"
    proc = _run_script([sys.executable, *_script_args(tmp_path, _finetune_cfg(data, out, **kw), "finetune")],
                       {CRASH_ENV: crash, "OMP_NUM_THREADS": "1"}, tmp_path)
    assert proc.returncode == CRASH_EXIT, proc.stderr[-3000:]
    assert load_checkpoint(out / CHECKPOINT)["epoch"] == 1
    resumed = finetune(_finetune_cfg(data, out, resume=True, **kw))
    assert resumed.start_epoch == 1
    a, b = _state(ref_out / CHECKPOINT), _state(out / CHECKPOINT)
    for part in ("model", "domain"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert [r["loss"] for r in ref.history] == [r["loss"] for r in resumed.history]


def test_foreign_files_are_refused_with_one_line(tmp_path):
    from filterx.models.encoder import read_encoder_file

    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    torch.save({"something": 1}, tmp_path / "other.pt")
    for read, what in ((load_checkpoint, "checkpoint"), (read_encoder_file, "encoder")):
        with pytest.raises(ValueError, match=f"junk.pt is not a readable {what} file"):
            read(tmp_path / "junk.pt")
        with pytest.raises(ValueError, match=f"other.pt is not a filterx {what} file"):
            read(tmp_path / "other.pt")
        with pytest.raises(FileNotFoundError, match=f"{what} '.*gone.pt' does not exist"):
            read(tmp_path / "gone.pt")


# ---------------------------------------------------------------- defaults


def test_pretrain_lr_defaults_follow_each_arch_recipe(pretrained):
    from filterx.train.pretrain import default_lr

    assert default_lr("resnet18") == default_lr("resnet50") == 0.1  # Goyal et al.: 0.1 per 256
    assert default_lr("alexnet_lrn") == 0.01  # BVLC AlexNet: 0.01 at batch 256
    pre_out, _ = pretrained  # resnet18, one rank, batch 13, lr left unset
    ck = load_checkpoint(pre_out / CHECKPOINT)
    assert ck["settings"]["lr"] == 0.1  # the one it used
    assert [g["initial_lr"] for g in ck["optimizer"]["param_groups"]] == [pytest.approx(0.1 * 13 / 256)]
    from click.testing import CliRunner

    from filterx.cli.commands import main

    out = " ".join(CliRunner().invoke(main, ["pretrain", "--help"]).stdout.split())
    assert "lr 0.1 per 256 images for ResNets (0.01 for alexnet_lrn)" in out
    assert "[default: 0.1 ResNets, 0.01 alexnet_lrn]" in out


def test_training_workers_default_to_the_cores_available(data, tmp_path):
    from click.testing import CliRunner

    from filterx.cli.commands import main

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert PretrainConfig(data=data["src"], out=tmp_path).workers == min(4, cores)
    assert FinetuneConfig(target=data["tgt"], out=tmp_path, arch="resnet18").workers == min(4, cores)
    for command in ("pretrain", "finetune"):
        out = " ".join(CliRunner().invoke(main, [command, "--help"]).stdout.split())
        assert "the cores available, at most 4. [default: min(4, cores); x>=0]" in out, command


# ---------------------------------------------------------------- train-encoder on a tiny target


def _cli(*args):
    from click.testing import CliRunner

    from filterx.cli.commands import main

    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    """A target of two classes with one image each: no held-out split is possible."""
    from PIL import Image

    root = tmp_path_factory.mktemp("two")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / "raw" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "raw" / name / "a.jpg")
    shard(ShardConfig(root / "raw", root / "ds", shard_size=10, workers=1, quiet=True))
    return root


def test_train_encoder_refuses_a_target_with_no_held_out_split(two_images):
    opts = ("--resolution", 64, "--epochs", 1, "--backend", "pil", "--device", "cpu", "--workers", 0, "-q")
    code, out, err = _cli("train-encoder", two_images / "ds", two_images / "enc.pt", *opts)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "has 2 images, no class with 2 or more" in err and "val_fraction 0.1" in err
    assert "--val-fraction 0" in err and "Traceback" not in err
    assert not (two_images / "enc.pt").exists()
    # asked for explicitly, no held-out split trains, says so, and influence refuses it in one line
    code, out, err = _cli("train-encoder", two_images / "ds", two_images / "enc0.pt", "--val-fraction", 0, *opts)
    assert code == 0, err
    assert "no held-out split (accuracy not measured; influence cannot use this encoder)" in out and "nan" not in out
    code, out, err = _cli("score", "--method", "influence", "--source", two_images / "ds", "--target",
                          two_images / "ds", "--encoder", two_images / "enc0.pt", "--backend", "pil", "--device",
                          "cpu", "--workers", 0, "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "influence needs the encoder's held-out split of the target" in err and "retrain it with" in err
