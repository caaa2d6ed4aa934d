"""The trainer's commands: pretrain and finetune, their options made from the config dataclasses
(defaults and choices read from PretrainConfig / FinetuneConfig, by :class:`ConfigOption`)."""

from __future__ import annotations

from pathlib import Path

import click

from filterx.cli.common import BACKEND_HELP, DEVICE_HELP, backend_names, common, finish_rank0, model_names, setup
from filterx.cli.configs import inside
from filterx.cli.group import main
from filterx.cli.params import ConfigChoice, ConfigOption, RegistryChoice


def pretrain_config():
    from filterx.train.pretrain import PretrainConfig

    return PretrainConfig


def finetune_config():
    from filterx.train.finetune import FinetuneConfig

    return FinetuneConfig


def _schedules():
    from filterx.train.common import SCHEDULES

    return SCHEDULES


def _objectives():
    from filterx.train.pretrain import OBJECTIVES

    return OBJECTIVES


def _norms():
    from filterx.train.adversarial import NORMS

    return NORMS


def _methods():
    from filterx.train.finetune import METHODS

    return METHODS


CONFIGS = {"pretrain": pretrain_config, "finetune": finetune_config}

_TRAINING_HELP = {
    "pretrain": {"lr": "Learning rate for a global batch of 256, scaled with the global batch "
                       "(ResNets: Goyal et al.; alexnet_lrn: the BVLC AlexNet solver).",
                 "lr_shown": "0.1 ResNets, 0.01 alexnet_lrn",
                 "val_fraction": "Without --val: share of DATA held out to evaluate on (0: none)."},
    "finetune": {"lr": "The backbone's learning rate (the new head's is x10); not scaled.",
                 "val_fraction": "Share of each training class held out to choose the epoch reported "
                                 "(0: none, the last epoch is reported); never the test data.",
                 "test_fraction": "Without --test: share of each TARGET class held out as the test split."},
}


def training_options(command: str):
    """Options shared by pretrain and finetune; unset ones take the defaults of CONFIGS[command]."""
    config, h = CONFIGS[command], _TRAINING_HELP[command]

    def opt(*decls, **kwargs):
        return click.option(*decls, cls=ConfigOption, config=config, **kwargs)

    def decorate(fn):
        for option in reversed([
            opt("--resolution", type=click.IntRange(16),
                help="Input size in pixels (224 or 112 as in the literature; smaller for CPU runs)."),
            opt("--epochs", type=click.IntRange(1), unset=True, help="Training epochs."),
            opt("--batch-size", type=click.IntRange(1), unset=True,
                help="Per-rank batch size (the global batch is this x the ranks)."),
            opt("--lr", type=float, unset=True, help=h["lr"], **({"show_default": h["lr_shown"]} if "lr_shown" in h else {})),
            opt("--weight-decay", type=float, unset=True, help="L2 weight decay."),
            opt("--schedule", type=ConfigChoice(_schedules), unset=True,
                help="step: x0.1 every --lr-step-epochs; inv: lr (1 + 10p)^-0.75; cosine."),
            opt("--lr-step-epochs", type=click.IntRange(1), unset=True,
                help="Epochs between x0.1 steps (--schedule step)."),
            click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt after a kill."),
            opt("--seed", type=int, help="Random seed."),
            opt("--device", type=click.Choice(["auto", "cpu", "cuda"]), help=DEVICE_HELP),
            opt("--backend", type=RegistryChoice("backend", backend_names), help=BACKEND_HELP),
            opt("--workers", type=click.IntRange(0), unset=True, show_default="min(4, cores)",
                help="Decode worker processes/threads; default: the cores available, at most 4."),
        ]):
            fn = option(fn)
        return fn

    return decorate


def _given(**kwargs) -> dict:
    """The options the user set (None means: keep the config's literature default)."""
    return {k: v for k, v in kwargs.items() if v is not None}


@main.command(short_help="Pre-train a model on a manifest or dataset dir.")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--arch", cls=ConfigOption, config=pretrain_config, type=RegistryChoice("arch", model_names),
              help="Model, trained from scratch (alexnet_lrn: AlexNet with LRN).")
@click.option("--val", type=click.Path(exists=True, path_type=Path), help="Dataset dir or manifest to evaluate on.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), cls=ConfigOption, config=pretrain_config,
              unset=True, help=_TRAINING_HELP["pretrain"]["val_fraction"])
@click.option("--objective", cls=ConfigOption, config=pretrain_config, type=ConfigChoice(_objectives),
              help="moco: MoCo v2 without labels; unset options then take its recipe: 200 epochs, lr 0.03 per 256, "
                   "cosine, weight decay 1e-4.")
@click.option("--moco-queue", type=click.IntRange(1), default=None, show_default="65536, less for a small dataset",
              help="moco: negatives in the queue (largest power of two up to half the images when under 131072).")
@click.option("--moco-momentum", cls=ConfigOption, config=pretrain_config, type=click.FloatRange(0, 1, max_open=True),
              help="moco: key encoder momentum (moving average).")
@click.option("--moco-temperature", cls=ConfigOption, config=pretrain_config, type=click.FloatRange(0, min_open=True),
              help="moco: InfoNCE temperature.")
@click.option("--adv-eps", cls=ConfigOption, config=pretrain_config, type=click.FloatRange(0),
              help="PGD adversarial training (Madry et al.) with this radius, in pixels [0, 1] (0: standard "
                   "training). Robust-transfer studies: L2 1 and 3 at 224 px; Madry et al.: L-inf 8/255 = 0.0314.")
@click.option("--adv-norm", cls=ConfigOption, config=pretrain_config, type=ConfigChoice(_norms),
              help="The ball of the attack: L2 over the whole image, or L-inf per pixel value.")
@click.option("--adv-steps", cls=ConfigOption, config=pretrain_config, type=click.IntRange(1),
              help="PGD steps, from a random point of the ball (7: the robustness library's default; "
                   "Salman et al.'s robust ImageNet models: 3).")
@click.option("--adv-step-size", type=click.FloatRange(0, min_open=True), cls=ConfigOption, config=pretrain_config,
              unset=True, show_default="2.5 * eps / steps", help="PGD step size (the rule of Madry et al. and the "
                                                     "robustness library).")
@training_options("pretrain")
@common
def pretrain(data, out, arch, val, val_fraction, objective, moco_queue, moco_momentum, moco_temperature, adv_eps,
             adv_norm, adv_steps, adv_step_size, resolution, epochs, batch_size, lr, weight_decay, schedule,
             lr_step_epochs, resume, seed, device, backend, workers, quiet, verbose, as_json):
    """Pre-train a model on DATA: a manifest (any format) or a whole dataset dir.

    Defaults follow the literature: SGD momentum 0.9, lr 0.1 per 256 images for ResNets (0.01
    for alexnet_lrn), weight decay 1e-4, x0.1 every 30 epochs, 90 epochs. Writes, in the
    directory OUT, checkpoint.pt every epoch (continue after a kill with --resume),
    metrics.jsonl (per-epoch loss, top-1, lr, img/s) and the final model.pt. Under torchrun
    it trains with DDP. With --adv-eps it trains on PGD adversarial examples of each augmented
    batch and logs val_robust_top1 (the held-out data under the same attack) beside val_top1.

    --objective moco (labels unread): MoCo v2 (Chen et al. 2020): momentum key encoder
    (0.999), a queue of 65536 negatives, InfoNCE at temperature 0.2, an MLP projection head
    (2048-2048-128 for resnet50), two crops with RandomResizedCrop(0.2-1), colour jitter
    0.4/0.4/0.4/0.1 (p 0.8), grayscale (p 0.2), Gaussian blur (p 0.5) and flips; SGD lr 0.03
    per 256, weight decay 1e-4, cosine, 200 epochs. Under torchrun: shuffled BatchNorm and
    the keys of every rank in the queue. OUT also gets model_torchvision.pth (the backbone
    as a plain torchvision state dict, no fc); finetune --init OUT/model.pt takes it.

    \b
    Saves its options to: OUT/filterx-pretrain.yaml

    \b
    Examples:
      filterx pretrain subset.jsonl ws/pre --arch resnet50 --resolution 112
      filterx pretrain subset.jsonl ws/moco --objective moco --arch resnet50
      torchrun --nproc_per_node 8 -m filterx pretrain ws/subset ws/pre
      filterx pretrain ws/subset ws/pre-l2-3 --adv-eps 3 --val-fraction 0.05
    """
    from filterx.train.pretrain import PretrainConfig, pretrain as run

    setup(quiet, verbose)
    given = _given(workers=workers, val_fraction=val_fraction, epochs=epochs, batch_size=batch_size, lr=lr,
                   weight_decay=weight_decay, schedule=schedule, lr_step_epochs=lr_step_epochs)
    if objective == "moco":
        from filterx.train.moco_pretrain import MOCO_DEFAULTS

        ctx = click.get_current_context()
        for key, value in MOCO_DEFAULTS.items():  # what the run takes is what its options file says
            if ctx.params.get(key) is None:
                ctx.params[key] = value
        given = {**MOCO_DEFAULTS, **given}
    cfg = PretrainConfig(data, out, arch=arch, resolution=resolution, seed=seed, device=device, backend=backend,
                         resume=resume, val=val, quiet=quiet, objective=objective, moco_queue=moco_queue,
                         moco_momentum=moco_momentum, moco_temperature=moco_temperature, adv_eps=adv_eps,
                         adv_norm=adv_norm, adv_steps=adv_steps, adv_step_size=adv_step_size, **given)
    finish_rank0(run(cfg), as_json, inside(out, "pretrain"))


@main.command(short_help="Fine-tune on the target; report its test top-1.")
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--init", type=click.Path(exists=True, path_type=Path),
              help="A pretrain model.pt / checkpoint.pt or an encoder; omit to train from scratch.")
@click.option("--arch", type=RegistryChoice("arch", model_names),
              help="Architecture when training from scratch; with --init, a check that it matches.")
@click.option("--test", type=click.Path(exists=True, path_type=Path), help="Target test dataset dir or manifest.")
@click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), cls=ConfigOption,
              config=finetune_config, unset=True, help=_TRAINING_HELP["finetune"]["test_fraction"])
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), cls=ConfigOption, config=finetune_config,
              unset=True, help=_TRAINING_HELP["finetune"]["val_fraction"])
@click.option("--method", cls=ConfigOption, config=finetune_config, type=ConfigChoice(_methods),
              help="plain; or, with --unlabeled, domain adaptation.")
@click.option("--unlabeled", type=click.Path(exists=True, path_type=Path),
              help="Unlabelled target-domain dataset dir or manifest for dann / pseudo-label.")
@click.option("--freeze-backbone", is_flag=True,
              help="Train the new head only (the same as --train-blocks 0); BatchNorm statistics stay as loaded.")
@click.option("--init-blocks", type=click.IntRange(0), metavar="N",
              help="With --init: load only the stem and the first N stages, re-initialise the rest. "
                   "Stages: ResNets layer1-4 (N 0-4), alexnet_lrn conv1-5, fc6, fc7 (N 0-7; no stem). "
                   "Default: all.")
@click.option("--train-blocks", type=click.IntRange(0), metavar="K",
              help="Train only the last K stages and the head; the stem and earlier stages are frozen "
                   "(no gradient, modules in eval mode: BatchNorm statistics stay fixed, dropout off). "
                   "0: the head alone. Default: everything trains.")
@click.option("--pseudo-threshold", type=click.FloatRange(0, 1, min_open=True), cls=ConfigOption,
              config=finetune_config, unset=True,
              help="pseudo-label: confidence an unlabelled image needs.")
@training_options("finetune")
@common
def finetune(target, out, init, arch, test, test_fraction, val_fraction, method, unlabeled, freeze_backbone,
             init_blocks, train_blocks, pseudo_threshold, resolution, epochs, batch_size, lr, weight_decay, schedule, lr_step_epochs, resume,
             seed, device, backend, workers, quiet, verbose, as_json):
    """Fine-tune on the TARGET dataset dir or manifest: a new head (lr x10), reporting the
    target validation and test top-1 per epoch.

    The epoch reported is the one of best validation top-1 (a split of the training data);
    the test top-1 given is that epoch's (and the last's): test data never chooses.

    Default schedule: the inverse decay lr (1 + 10p)^-0.75 of domain adaptation. With
    --unlabeled, --method dann (gradient reversal) or pseudo-label adapts to that domain.
    Writes, in the directory OUT, checkpoint.pt every epoch (--resume continues),
    metrics.jsonl and the final model.pt.

    \b
    Saves its options to: OUT/filterx-finetune.yaml

    \b
    Examples:
      filterx finetune ws/target ws/ft --init ws/pre/model.pt \\
          --test ws/target-test
      filterx finetune ws/target ws/ft-scratch --arch resnet50  # no pre-training
    """
    from filterx.train.pretrain import FinetuneConfig, finetune as run

    setup(quiet, verbose)
    if init is None and arch is None:
        raise click.UsageError("give --init (a pre-trained model) or --arch (to train from scratch)")
    cfg = FinetuneConfig(target, out, init=init, arch=arch, test=test, unlabeled=unlabeled, method=method,
                         freeze_backbone=freeze_backbone, init_blocks=init_blocks, train_blocks=train_blocks,
                         resolution=resolution, seed=seed, device=device,
                         backend=backend, resume=resume, quiet=quiet,
                         **_given(workers=workers, test_fraction=test_fraction, val_fraction=val_fraction,
                                  pseudo_threshold=pseudo_threshold, epochs=epochs,
                                  batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule,
                                  lr_step_epochs=lr_step_epochs))
    finish_rank0(run(cfg), as_json, inside(out, "finetune"))
