"""train-encoder: a torchvision ResNet trained on the target dataset only.

The target is small (hundreds to tens of thousands of images), so it is decoded once, at the
resize size of the chosen resolution, into a uint8 tensor in memory; each epoch then draws
random resized crops and flips from it on the training device. A seeded, stratified held-out
split (``val_fraction``, at least one image of every class that has two or more) measures
accuracy, and is recorded in the encoder file (:mod:`filterx.models.encoder`) so that later
stages (influence) can use the same split.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import filterx
from filterx.core.progress import progress
from filterx.core.runtime import resolve_device, seed_everything
from filterx.decode.loader import LoaderConfig, load_batches
from filterx.io import atomic
from filterx.io.dataset import Dataset
from filterx.math.splits import stratified_split
from filterx.models.archs import RESNET_DEFAULTS, head_name
from filterx.models.encoder import ENCODER_FORMAT, build_resnet, state_tag
from filterx.train.checkpoints import load_initial_weights
from filterx.train.evaluation import evaluate, tensor_batches
from filterx.train.runtime import Runtime, autocast, to_input

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderConfig:
    target: Path
    out: Path
    arch: str = "resnet18"
    resolution: int = 112
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    val_fraction: float = 0.1
    backend: str = "auto"
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    quiet: bool = False
    # a backbone to start from (a MoCo encoder file, pretrain's model.pt, another encoder): its
    # weights but the head, its layout, and the input normalisation they were trained with;
    # None: from scratch
    init: Path | None = None
    # build_model's layout options for the ResNet (filterx.models.archs): {"width": 32, "stem":
    # "small"} for 32-64 px images on a CPU; {}: the published layout (with init: the init's)
    model_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EncoderSummary:
    out: Path
    tag: str
    train_count: int
    val_count: int
    val_acc: float
    train_acc: float
    seconds: float  # the whole command: decode, training, evaluation, saving
    history: list = field(default_factory=list)
    epochs: int = 0
    train_seconds: float = 0.0  # the training loop alone

    def line(self) -> str:
        rate = self.epochs * self.train_count / max(self.train_seconds, 1e-9)
        held = (f"held-out accuracy {self.val_acc:.1%} on {self.val_count} images" if self.val_count
                else "no held-out split (accuracy not measured; influence cannot use this encoder)")
        return (
            f"trained {self.tag} for {self.epochs} epochs on {self.train_count} target images in "
            f"{self.seconds:.1f}s ({rate:.0f} img/s in training): {held} "
            f"(train {self.train_acc:.1%}); saved to {self.out}"
        )


def check_held_out(ds: Dataset, val_fraction: float) -> None:
    """Refuse a target that leaves the held-out split empty (ValueError naming the counts).

    stratified_split holds out images only of classes with 2 or more (a class's one image is
    kept for training), so a target whose every class has a single image has no held-out
    split: its accuracy cannot be measured and influence, which needs that split's loss,
    cannot run. With val_fraction 0 the split is empty on purpose; a warning says so.
    """
    counts = np.bincount(ds.labels[ds.labels >= 0], minlength=ds.num_classes)
    if val_fraction == 0:
        log.warning("target %s: val_fraction 0 keeps no held-out split; the encoder's accuracy is not "
                    "measured and score --method influence cannot use it", ds.root)
        return
    if counts.max(initial=0) < 2:
        raise ValueError(
            f"target {ds.root} has {int(counts.sum())} images, no class with 2 or more, so the held-out "
            f"split (val_fraction {val_fraction}) would be empty; a class needs at least 2 images to give "
            "one held-out image (held-out accuracy and --method influence need it); or train without "
            "a held-out split with val_fraction 0 (--val-fraction 0)")


def empty_classes(ds: Dataset) -> list[str]:
    """Names of the classes of ``ds`` with no sample (e.g. every image of the folder was bad)."""
    counts = np.bincount(ds.labels[ds.labels >= 0], minlength=ds.num_classes)
    return [c.name for c in ds.classes if counts[c.index] == 0]


def decode_dataset(ds: Dataset, size: int, *, backend: str, workers: int, quiet: bool,
                   batch_size: int = 128) -> torch.Tensor:
    """Every image of ``ds`` as uint8 (N, 3, size, size) (short side resized, center crop), by id."""
    # mean 0, std 1/255: the loader's "normalised" output is then the pixel values themselves.
    cfg = LoaderConfig(resolution=size, backend=backend, device="cpu", batch_size=batch_size,
                       workers=workers, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, crop_fraction=1.0)
    out = torch.empty((ds.num_samples, 3, size, size), dtype=torch.uint8)
    bar = progress(total=ds.num_samples, desc="decode target", quiet=quiet)
    for b in load_batches(ds.tar_paths(), cfg):
        out[b.ids] = b.images.round().clamp_(0, 255).to(torch.uint8)
        bar.update(len(b.ids))
    bar.close()
    return out


def _augment(images: torch.Tensor, out_size: int, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop (area 0.25-1, aspect 3/4-4/3) + horizontal flip of a uint8 batch."""
    import torchvision.transforms.v2.functional as TF

    n, _, h, w = images.shape
    out = torch.empty((n, 3, out_size, out_size), dtype=torch.float32, device=images.device)
    area = torch.empty(n).uniform_(0.25, 1.0, generator=gen)
    logr = torch.empty(n).uniform_(np.log(3 / 4), np.log(4 / 3), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    for i in range(n):
        ar = float(torch.exp(logr[i]))
        cw = int(min(w, round(float(torch.sqrt(area[i] * h * w * ar)))))
        ch = int(min(h, round(float(torch.sqrt(area[i] * h * w / ar)))))
        y = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        x = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = TF.resized_crop(images[i].float(), y, x, ch, cw, [out_size, out_size], antialias=True)
        out[i] = TF.horizontal_flip(crop) if flips[i] else crop
    return out


def initial_backbone(init: Path, arch: str, num_classes: int,
                     model_options: dict) -> tuple[nn.Module, dict, torch.Tensor, torch.Tensor]:
    """(model, its build_model kwargs, mean, std): a fresh ``arch`` with a ``num_classes`` head,
    built in ``init``'s layout (its ``model_kwargs``; ``model_options``, where given, must agree),
    holding ``init``'s weights but its head; mean and std (3,), 0-255 scale, those the weights
    were trained with."""
    w = load_initial_weights(init)
    if w["arch"] != arch:
        raise ValueError(f"--init {init} holds a {w['arch']}, not the --arch {arch} asked for; pass --arch {w['arch']}")
    built = {**RESNET_DEFAULTS, **w["model_kwargs"]}  # an option the init does not record has its default
    clash = {k: v for k, v in model_options.items() if built.get(k, v) != v}
    if clash:
        raise ValueError(f"--init {init} holds a {w['arch']} built with {w['model_kwargs']}, not {clash}; leave the "
                         "layout options unset to take the init's")
    kwargs = {**w["model_kwargs"], **model_options}
    model = build_resnet(arch, num_classes, **kwargs)
    head = head_name(model)
    state = {k: v for k, v in w["state_dict"].items() if not k.startswith(head + ".")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(head + ".") for k in missing):
        raise ValueError(f"--init {init} does not fit a {arch}: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    return model, kwargs, torch.tensor(w["mean"]) * 255, torch.tensor(w["std"]) * 255


def train_encoder(cfg: EncoderConfig) -> EncoderSummary:
    """Train ``cfg.arch`` on the target dataset ``cfg.target`` and save it to ``cfg.out``."""
    t0 = time.perf_counter()
    ds = Dataset.open(cfg.target)
    if ds.num_classes < 2 or len(np.unique(ds.labels[ds.labels >= 0])) < 2:
        raise ValueError(
            f"target {ds.root} has {len(np.unique(ds.labels[ds.labels >= 0]))} class(es) with images; "
            "a classifier needs at least 2. For a one-class target, train the encoder on a labelled dataset "
            "of similar images, such as the pool (filterx train-encoder POOL encoder.pt), and score with "
            "--method clustering or domain-cls, which use its features but not its classes"
        )
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")
    check_held_out(ds, cfg.val_fraction)
    empty = empty_classes(ds)
    if empty:
        # The head keeps an output for every class of the dataset, so that its indices stay the
        # dataset's labels (entropy, influence and finetune --init read them as such); a class
        # with no image is never a training label: its logit is only trained towards label
        # smoothing's small share, never towards being predicted.
        log.warning("target %s: %d of %d classes have no image and are not trained on (the head "
                    "keeps their outputs): %s", ds.root, len(empty), ds.num_classes, ", ".join(empty))
    out = Path(cfg.out)
    with atomic.run_lock(out.parent, f"train-encoder-{out.name}"):
        return _train_and_save(cfg, ds, empty, t0)


def _train_and_save(cfg: EncoderConfig, ds: Dataset, empty: list[str], t0: float) -> EncoderSummary:
    """Decode the target, train, evaluate and save ``cfg.out`` atomically (under train_encoder's lock)."""
    device = resolve_device(cfg.device)
    rt = Runtime(device)
    seed_everything(cfg.seed)
    train_ids, val_ids = stratified_split(ds.labels, cfg.val_fraction, cfg.seed)
    size = int(round(cfg.resolution / 0.875))
    images = decode_dataset(ds, size, backend=cfg.backend, workers=cfg.workers, quiet=cfg.quiet)
    if cfg.init is not None:
        model, model_kwargs, mean, std = initial_backbone(cfg.init, cfg.arch, ds.num_classes, cfg.model_options)
    else:
        model = build_resnet(cfg.arch, ds.num_classes, **cfg.model_options)
        model_kwargs = dict(cfg.model_options)
        flat = images[torch.from_numpy(train_ids)].float()
        mean = flat.mean(dim=(0, 2, 3))
        std = flat.std(dim=(0, 2, 3)).clamp_min(1.0)
        del flat
    labels = torch.from_numpy(ds.labels)
    mean_d, std_d = mean.view(1, 3, 1, 1).to(device), std.view(1, 3, 1, 1).to(device)

    model = model.to(device)
    model = model.to(memory_format=torch.channels_last) if device.startswith("cuda") else model

    def top1(ids: np.ndarray) -> float:
        """Top-1 accuracy on center crops of the decoded images ``ids`` (NaN for none)."""
        idx = torch.from_numpy(ids)
        batches = tensor_batches(images[idx], labels[idx], idx, resolution=cfg.resolution, mean=mean_d, std=std_d,
                                 device=device)
        return evaluate(model, batches, rt, num_classes=ds.num_classes)["val_top1"]

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr * cfg.batch_size / 256, momentum=0.9,
                          weight_decay=cfg.weight_decay, nesterov=True)
    steps_per_epoch = max(1, int(np.ceil(len(train_ids) / cfg.batch_size)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr * cfg.batch_size / 256,
                                                total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    bar = progress(total=cfg.epochs * len(train_ids), desc="train-encoder", quiet=cfg.quiet)
    t_train = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.from_numpy(train_ids)[torch.randperm(len(train_ids), generator=gen)]
        loss_sum, correct = 0.0, 0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            x = (_augment(images[idx], cfg.resolution, gen).to(device) - mean_d) / std_d
            y = labels[idx].to(device)
            with autocast(rt):
                logits = model(to_input(x, rt))
                loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            bar.update(len(idx))
        row = {"epoch": epoch, "loss": loss_sum / len(perm), "train_acc": correct / len(perm)}
        if epoch == cfg.epochs - 1 or (epoch + 1) % 5 == 0:
            row["val_acc"] = top1(val_ids)
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['train_acc']:.2f}")
        log.info("epoch %d %s", epoch, row)
    bar.close()
    train_seconds = time.perf_counter() - t_train

    val_acc = history[-1]["val_acc"]
    train_acc = top1(train_ids)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tag = state_tag(cfg.arch, cfg.resolution, state)
    payload = {
        "filterx_encoder": ENCODER_FORMAT,
        "filterx_version": filterx.__version__,
        "tag": tag,
        "arch": cfg.arch,
        "model_kwargs": model_kwargs,
        "resolution": cfg.resolution,
        "num_classes": ds.num_classes,
        "class_names": [c.name for c in ds.classes],
        "empty_classes": empty,
        "mean": (mean / 255).tolist(),
        "std": (std / 255).tolist(),
        "feature_dim": int(model.fc.in_features),
        "state_dict": state,
        "target": {"root": str(ds.root), "fingerprint": ds.fingerprint},
        "train_ids": train_ids.tolist(),
        "val_ids": val_ids.tolist(),
        "metrics": {"val_acc": val_acc, "train_acc": train_acc, "history": history},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic.write_bytes(cfg.out, buf.getvalue())
    return EncoderSummary(Path(cfg.out), tag, len(train_ids), len(val_ids), val_acc, train_acc,
                          time.perf_counter() - t0, history, cfg.epochs, train_seconds)
