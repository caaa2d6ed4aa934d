"""MoCo v2 (filterx.train.moco, moco_augment, train_moco, encoder_moco) on tiny data: 32 px, CPU."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from clirun import one_line, run
from filterx.io.dataset import Dataset
from filterx.models.encoder import load_encoder
from filterx.train.encoder import decode_dataset
from filterx.math.splits import stratified_split
from filterx.stages.moco_encoder import MocoEncoderConfig, frozen_features, train_moco_encoder
from filterx.decode.loader import Batch
from filterx.train.moco import MoCo, GroupedBN, bn_groups, default_queue_size, info_nce
from filterx.decode.colour import _jitter_op
from filterx.train.moco_views import (SMALL_IMAGE_VIEWS, crop_boxes, MocoAugment, moco_augment,
                                      resized_crops, two_crops)
from filterx.math.probe import fit_linear_probe
from filterx.stages.probe import _accuracy
from filterx.io.sampledata import make_sample_data
from filterx.stages.shard import ShardConfig, shard
from filterx.train.pretrain import FinetuneConfig, PretrainConfig, finetune, pretrain
from filterx.train.common import CHECKPOINT, MODEL, Runtime, Schedule, reseed
from filterx.train.moco_pretrain import TORCHVISION_STATE, moco_epoch, view_source

pytestmark = pytest.mark.usefixtures("one_thread")
RES = 32
COMMON = dict(resolution=RES, workers=0, device="cpu", quiet=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``src``: 13 classes x 4 images; ``tgt``: 5 classes x 6 (the demo data, tiny)."""
    root = tmp_path_factory.mktemp("moco_data")
    sd = make_sample_data(root / "raw", per_class=4, target_per_class=6, photos=2, textures=1, size_range=(32, 40))
    shard(ShardConfig(sd.source, root / "src", shard_size=20, workers=1, quiet=True))
    shard(ShardConfig(sd.target, root / "tgt", shard_size=16, workers=1, quiet=True))
    return {"src": root / "src", "tgt": root / "tgt"}


def _small_cnn(width: int = 16) -> nn.Module:
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(3, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2),
                         *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())


# ---------------------------------------------------------------- the objective


def test_queue_writes_at_the_pointer_and_wraps():
    moco = MoCo(_small_cnn(4), 16, dim=3, queue_size=10)
    batches = [torch.full((4, 3), float(i + 1)) for i in range(3)]
    for i, keys in enumerate(batches):
        moco.enqueue(keys)
        assert int(moco.queue_ptr) == (4 * (i + 1)) % 10
    q = moco.queue
    assert torch.equal(q[:, 4:8], batches[1].T)  # second batch where the first ended
    assert torch.equal(q[:, 8:10], batches[2][:2].T) and torch.equal(q[:, 0:2], batches[2][2:].T)  # wrapped
    assert torch.equal(q[:, 2:4], batches[0][2:].T)  # the oldest keys not yet overwritten
    with pytest.raises(ValueError, match="do not fit a queue of 10"):
        moco.enqueue(torch.zeros(11, 3))


def test_info_nce_is_the_cross_entropy_of_the_positive():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    k = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(8, 20, generator=g), dim=0)
    loss, hit = info_nce(q, k, queue, 0.2)
    pos = (q * k).sum(1) / 0.2
    neg = (q @ queue) / 0.2
    expected = -(pos - torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(hit, pos > neg.max(1).values)


def test_key_encoder_is_the_moving_average_and_gets_no_gradient():
    torch.manual_seed(0)
    moco = MoCo(_small_cnn(4), 16, dim=3, queue_size=8, momentum=0.9)
    with torch.no_grad():
        for p in moco.query.parameters():
            p.add_(1.0)
    before = [p.clone() for p in moco.key.parameters()]
    moco.momentum_update()
    for pk, k0, pq in zip(moco.key.parameters(), before, moco.query.parameters()):
        torch.testing.assert_close(pk, 0.9 * k0 + 0.1 * pq)
        assert not pk.requires_grad


def test_queue_size_shrinks_for_small_datasets():
    assert default_queue_size(1_281_167, 256) == 65536
    assert default_queue_size(50_000, 256) == 16384
    assert default_queue_size(300, 64) == 128
    assert default_queue_size(20, 16) == 16  # never below one global batch
    assert bn_groups(256, 32) == 8 and bn_groups(32, 32) == 1 and bn_groups(3, 32) == 1


# ---------------------------------------------------------------- the views


def test_colour_ops_match_torchvision_and_crops_are_exact():
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    refs = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op, (f, ref) in enumerate(zip((1.3, 0.7, 1.4, 0.08), refs)):
        mine = _jitter_op(x, op, torch.full((3,), f))
        torch.testing.assert_close(mine, torch.stack([ref(xi, f) for xi in x]), atol=1e-5, rtol=0)
    box = torch.tensor([[4.0, 2.0, 6.0, 6.0]] * 3)
    torch.testing.assert_close(resized_crops(x, box, torch.tensor([False, True, False]), 6)[[0, 2]],
                               x[[0, 2], :, 2:8, 4:10], atol=1e-5, rtol=0)
    boxes = crop_boxes(2000, 40, MocoAugment(), torch.Generator().manual_seed(0))
    area = boxes[:, 2] * boxes[:, 3] / 1600
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 40).all() and (boxes[:, 1] + boxes[:, 3] <= 40).all()
    assert area.min() >= 0.18 and area.max() <= 1.0 and 0.5 < area.mean() < 0.7  # U(0.2, 1) of the area


def test_two_crops_are_seeded_and_differ():
    images = torch.rand(6, 3, 37, 37, generator=torch.Generator().manual_seed(2))
    a = two_crops(images, RES, torch.Generator().manual_seed(5))
    b = two_crops(images, RES, torch.Generator().manual_seed(5))
    assert a[0].shape == (6, 3, RES, RES) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], a[1])


# ---------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def pool_images(tmp_path_factory):
    """The demo pool (16 classes: digits, photos, textures) decoded at the views' source size."""
    root = tmp_path_factory.mktemp("moco_pool")
    sd = make_sample_data(root / "raw", per_class=12, target_per_class=2, photos=3, textures=3, size_range=(32, 40))
    shard(ShardConfig(sd.source, root / "src", shard_size=100, workers=1, quiet=True))
    ds = Dataset.open(root / "src")
    return decode_dataset(ds, view_source(RES), backend="pil", workers=0, quiet=True), ds.labels


def _train_small(images, seed, epochs, lr=0.06, batch=32, width=16, queue=64, aug=MocoAugment()):
    torch.manual_seed(seed)
    moco = MoCo(_small_cnn(width), 4 * width, dim=64, queue_size=queue, momentum=0.99)
    start = {k: v.clone() for k, v in moco.query.backbone.state_dict().items()}
    opt = torch.optim.SGD(moco.query.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = len(images) // batch
    sched = Schedule("cosine", steps, steps * epochs).scheduler(opt)
    query, losses = GroupedBN(moco.query, 16), []
    for epoch in range(epochs):
        reseed(seed, epoch, 0)
        perm = torch.randperm(len(images))
        batches = [Batch(perm[i : i + batch], images[perm[i : i + batch]].float() / 255, perm[i : i + batch])
                   for i in range(0, steps * batch, batch)]
        sums = moco_epoch(moco, query, opt, sched, batches, steps, resolution=RES, seed=seed, epoch=epoch,
                          rt=Runtime("cpu"), aug=aug)
        losses.append(float(sums["loss"] / sums["n"]))
    return moco, start, losses


def _probe_accuracy(backbone, images, labels) -> float:
    tr, va = stratified_split(labels, 0.3, 0)
    f = frozen_features(backbone, images, RES, "cpu")
    f = (f - f[tr].mean(0)) / (f[tr].std(0) + 1e-6)
    w, b, _ = fit_linear_probe(f[tr], labels[tr], int(labels.max()) + 1, 1e-2)
    return _accuracy(f[va], labels[va], w, b)


# ---------------------------------------------------------------- pretrain --objective moco


def _moco_cfg(data, out, **kw):
    base = dict(data=data["src"], out=out, arch="resnet18", objective="moco", epochs=2, batch_size=13, lr=0.03,
                schedule="cosine", seed=3, **COMMON)
    return PretrainConfig(**{**base, **kw})


def test_resume_is_bit_identical_queue_and_key_encoder_included(data, tmp_path):
    # a step schedule: its lr does not depend on the total epochs, so 1 epoch + 1 resumed = 2
    full = pretrain(_moco_cfg(data, tmp_path / "full", schedule="step"))
    pretrain(_moco_cfg(data, tmp_path / "half", epochs=1, schedule="step"))
    resumed = pretrain(_moco_cfg(data, tmp_path / "half", epochs=2, resume=True, schedule="step"))
    assert resumed.start_epoch == 1
    a = torch.load(tmp_path / "full" / MODEL, weights_only=False)
    b = torch.load(tmp_path / "half" / MODEL, weights_only=False)
    assert a["moco"]["queue_ptr"] == b["moco"]["queue_ptr"] == (2 * 52) % a["settings"]["moco_queue"]
    assert a["settings"]["moco_queue"] == 16  # 52 images: a power of two up to half of them
    for k in a["moco"]:
        assert torch.equal(a["moco"][k], b["moco"][k]), k
    assert any(k.startswith("key.") for k in a["moco"]) and "queue" in a["moco"]
    assert [r["loss"] for r in full.history] == [r["loss"] for r in resumed.history]
    # a plain torchvision state dict beside, the backbone without a head
    import torchvision

    sd = torch.load(tmp_path / "full" / TORCHVISION_STATE, weights_only=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    assert torch.equal(sd["conv1.weight"], a["moco"]["query.backbone.conv1.weight"])


def test_finetune_init_takes_the_moco_backbone(data, tmp_path):
    pretrain(_moco_cfg(data, tmp_path / "pre", epochs=1))
    summary = finetune(FinetuneConfig(data["tgt"], tmp_path / "ft", init=tmp_path / "pre" / MODEL, epochs=1,
                                      batch_size=8, **COMMON))
    assert summary.epochs == 1 and "test_top1" in summary.final
    with pytest.raises(ValueError, match="no labels"):
        pretrain(_moco_cfg(data, tmp_path / "bad", val_fraction=0.2))


# ---------------------------------------------------------------- the command line


def test_cli_pretrain_moco_and_its_help(data, tmp_path):
    code, out, err = run("pretrain", "--help")
    assert code == 0
    for default in ("0.999", "65536", "0.2", "0.03", "200 epochs", "2048-2048-128"):
        assert default in out, default
    code, out, err = run("pretrain", data["src"], tmp_path / "run", "--objective", "moco", "--arch", "resnet18",
                         "--resolution", RES, "--epochs", 1, "--batch-size", 13, "--workers", 0, "--device", "cpu",
                         "-q", "--json")
    assert code == 0, err
    saved = (tmp_path / "run" / "filterx-pretrain.yaml").read_text()
    assert "objective: moco" in saved and "lr: 0.03" in saved and "schedule: cosine" in saved
    assert (tmp_path / "run" / TORCHVISION_STATE).is_file() and (tmp_path / "run" / CHECKPOINT).is_file()
    code, _, err = run("pretrain", data["src"], tmp_path / "bad", "--objective", "simclr")
    assert code == 2 and "simclr" in one_line(err)


def test_cli_train_encoder_moco_with_pool_gives_an_encoder_with_a_head(data, tmp_path):
    out = tmp_path / "moco.pt"
    code, _, err = run("train-encoder", data["tgt"], out, "--objective", "moco", "--with-pool", data["src"],
                       "--resolution", "64", "--epochs", 1, "--batch-size", 16, "--workers", 0, "--device", "cpu",
                       "-q")
    assert code == 0, err
    enc = load_encoder(out)
    assert enc.head is not None and enc.head.out_features == 5 and enc.info["objective"] == "moco"
    assert enc.info["config"]["weight_decay"] == 5e-4 and enc.info["config"]["label_smoothing"] == 0.0
    assert enc.info["metrics"]["history"][0]["images"] == 82  # target 30 + pool 52, labels unread
    assert "epochs: 1" in out.with_name("moco.pt.filterx.yaml").read_text()
    code, _, err = run("train-encoder", data["tgt"], tmp_path / "x.pt", "--with-pool", data["src"])
    assert code == 2 and "--objective moco" in one_line(err)


def test_pretrain_moco_draws_its_views_with_the_configured_augment(data, tmp_path):
    paper = pretrain(_moco_cfg(data, tmp_path / "paper", epochs=1))
    again = pretrain(_moco_cfg(data, tmp_path / "again", epochs=1))
    small = pretrain(_moco_cfg(data, tmp_path / "small", epochs=1, moco_views={"scale": [0.5, 1.0]}))
    ck = [torch.load(s.model, weights_only=True) for s in (paper, again, small)]
    assert "moco_views" not in ck[0]["settings"] and ck[2]["settings"]["moco_views"] == {"scale": [0.5, 1.0]}
    assert torch.equal(ck[0]["model"]["conv1.weight"], ck[1]["model"]["conv1.weight"])
    assert not torch.equal(ck[0]["model"]["conv1.weight"], ck[2]["model"]["conv1.weight"])
    with pytest.raises(ValueError, match="unknown MoCo view parameter.*'scales'"):
        _moco_cfg(data, tmp_path / "bad", moco_views={"scales": (0.5, 1.0)})
    with pytest.raises(ValueError, match="only moco draws two views"):
        _moco_cfg(data, tmp_path / "bad", objective="supervised", moco_views={"scale": (0.5, 1.0)})


def test_moco_encoder_draws_its_views_with_the_configured_augment(data, tmp_path):
    def backbone(name, **kw):
        cfg = MocoEncoderConfig(data["tgt"], tmp_path / f"{name}.pt", resolution=32, epochs=1, batch_size=16,
                                workers=0, device="cpu", quiet=True, **kw)
        train_moco_encoder(cfg)
        return load_encoder(cfg.out)

    paper, again, small = backbone("paper"), backbone("again"), backbone("small", augment=MocoAugment(scale=(0.5, 1.0)))
    assert paper.info["config"]["augment"]["scale"] == (0.2, 1.0) and small.info["config"]["augment"]["scale"] == (0.5, 1.0)
    sd = [dict(e.features.state_dict()) for e in (paper, again, small)]
    key = next(k for k in sd[0] if k.endswith("conv1.weight"))
    assert torch.equal(sd[0][key], sd[1][key]) and not torch.equal(sd[0][key], sd[2][key])


def test_train_encoder_init_fine_tunes_the_moco_backbone_on_the_labels(data, tmp_path):
    moco = tmp_path / "moco.pt"
    code, _, err = run("train-encoder", data["tgt"], moco, "--objective", "moco", "--resolution", "64", "--epochs", 1,
                       "--batch-size", 16, "--workers", 0, "--device", "cpu", "-q")
    assert code == 0, err
    args = ("--resolution", "64", "--epochs", 1, "--batch-size", 16, "--workers", 0, "--device", "cpu", "-q")
    frozen, tuned = tmp_path / "lr0.pt", tmp_path / "ft.pt"
    assert run("train-encoder", data["tgt"], frozen, "--init", moco, "--lr", 0, *args)[0] == 0
    assert run("train-encoder", data["tgt"], tuned, "--init", moco, *args)[0] == 0
    start, kept, ft = (torch.load(p, weights_only=False) for p in (moco, frozen, tuned))
    weights = [k for k in start["state_dict"] if k.endswith("weight") and not k.startswith("fc.")]
    assert len(weights) > 10
    for k in weights:  # with no step the backbone is MoCo's, tensor for tensor
        assert torch.equal(kept["state_dict"][k], start["state_dict"][k]), k
    assert any(not torch.equal(ft["state_dict"][k], start["state_dict"][k]) for k in weights)  # trained
    assert not torch.equal(kept["state_dict"]["fc.weight"], start["state_dict"]["fc.weight"])  # a fresh head
    assert kept["mean"] == pytest.approx(start["mean"]) and kept["std"] == pytest.approx(start["std"])  # the normalisation it was trained with
    assert ft["config"]["init"] == str(moco) and ft["val_ids"] and ft["metrics"]["val_acc"] >= 0
    code, _, err = run("train-encoder", data["tgt"], tmp_path / "x.pt", "--init", moco, "--arch", "resnet34", *args)
    assert code == 2 and "holds a resnet18" in one_line(err)
    code, _, err = run("train-encoder", data["tgt"], tmp_path / "z.pt", "--init", moco, "--stem", "small", *args)
    assert code == 2 and "built with {}, not {'stem': 'small'}" in one_line(err)  # the published layout's 7x7 conv1
    code, _, err = run("train-encoder", data["tgt"], tmp_path / "y.pt", "--init", moco, "--objective", "moco")
    assert code == 2 and "--init" in one_line(err)


def test_a_narrow_small_stem_layout_goes_from_moco_through_init_to_embed(data, tmp_path):
    from filterx.io.dataset import Dataset
    from filterx.stages.embed import EmbedConfig, embed, read_embeddings

    moco, tuned = tmp_path / "moco.pt", tmp_path / "ft.pt"
    args = ("--resolution", "32", "--epochs", 1, "--batch-size", 16, "--workers", 0, "--device", "cpu", "-q")
    code, _, err = run("train-encoder", data["tgt"], moco, "--objective", "moco", "--width", 8, "--stem", "small", *args)
    assert code == 0, err
    assert run("train-encoder", data["tgt"], tuned, "--init", moco, *args)[0] == 0  # the init's layout, unasked
    for path in (moco, tuned):
        enc = load_encoder(path)
        assert enc.info["model_kwargs"] == {"width": 8, "stem": "small"}
        assert enc.model.conv1.stride == (1, 1) and enc.info["feature_dim"] == 64
    embed(EmbedConfig(data["tgt"], tuned, device="cpu", workers=0, quiet=True))
    assert read_embeddings(Dataset.open(data["tgt"]), load_encoder(tuned).tag).shape == (30, 64)
    code, _, err = run("train-encoder", data["tgt"], tmp_path / "x.pt", "--init", moco, "--width", 16, *args)
    assert code == 2 and "built with {'width': 8, 'stem': 'small'}, not {'width': 16}" in one_line(err)
    code, _, err = run("train-encoder", data["tgt"], tmp_path / "y.pt", "--probe-only", "--backbone",
                       "torchvision:resnet18", "--stem", "small")
    assert code == 2 and "--stem does not apply to a probe" in one_line(err)


@pytest.mark.slow
def test_info_nce_falls_over_training(pool_images):
    images, _ = pool_images
    for seed in (0, 1):
        _, _, losses = _train_small(images, seed, epochs=12)
        # epoch 0 is left out: its queue still holds random vectors, easy negatives
        first, last = np.mean(losses[1:3]), np.mean(losses[-2:])
        assert last < first - 0.1, (seed, losses)


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    """The demo's pool (16 classes x 48) and target (digits 0-4 x 40), decoded at the views' source size."""
    root = tmp_path_factory.mktemp("moco_demo")
    sd = make_sample_data(root / "raw", per_class=48, target_per_class=40, photos=3, textures=3, size_range=(32, 40))
    out = {}
    for name, tree in (("src", sd.source), ("tgt", sd.target)):
        shard(ShardConfig(tree, root / name, shard_size=200, workers=1, quiet=True))
        ds = Dataset.open(root / name)
        out[name] = decode_dataset(ds, view_source(RES), backend="pil", workers=0, quiet=True), np.asarray(ds.labels)
    return out


# MoCo v2's views with the overrides for 32 px images (filterx.train.moco_views.SMALL_IMAGE_VIEWS)
SMALL_IMAGES = moco_augment(SMALL_IMAGE_VIEWS)


@pytest.mark.slow
def test_probe_on_moco_features_beats_the_probe_on_random_init(demo_images):
    # --with-pool: contrastive training on the pool and the target, labels unread; then the same
    # probe, standardisation and split on the learned features and on the same network at its
    # initialisation (the weights MoCo started from)
    (src, src_y), (tgt, tgt_y) = demo_images["src"], demo_images["tgt"]
    digits = src_y < 10
    tasks = {"pool": (src, src_y), "pool digits": (src[torch.from_numpy(digits)], src_y[digits]),
             "target": (tgt, tgt_y)}
    gains = {task: [] for task in tasks}
    for seed in (0, 1):
        moco, start, losses = _train_small(torch.cat([src, tgt]), seed, epochs=100, lr=0.03, width=32, queue=256,
                                           aug=SMALL_IMAGES)
        assert np.mean(losses[-3:]) < np.mean(losses[1:4]) - 0.3, (seed, losses)
        random_init = _small_cnn(32)
        random_init.load_state_dict(start)
        for task, (images, labels) in tasks.items():
            learned = _probe_accuracy(moco.query.backbone, images, labels)
            baseline = _probe_accuracy(random_init, images, labels)
            assert learned > baseline, (seed, task, learned, baseline)
            gains[task].append(learned - baseline)
    for task, g in gains.items():
        assert np.mean(g) > 0.05, (task, gains)
