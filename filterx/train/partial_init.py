"""Partial initialisation and stage freezing for fine-tuning (instance-based transfer studies).

    check_blocks("resnet50", init_blocks=2, train_blocks=2, has_init=True)
    load_stages(model, "resnet50", state_dict, init_blocks=2)   # stem + layer1-2 from the file
    frozen = freeze_stages(model, "resnet50", train_blocks=2)   # stem + layer1-2 get no gradient

An architecture's backbone is a stem and S stages (:func:`filterx.models.archs.model_stages`).
``init_blocks`` N (0..S) copies the stem and the first N stages from a pre-trained state dict
and leaves the other stages at the architecture's fresh initialisation; ``None`` copies
everything. ``train_blocks`` K (0..S) trains the last K stages and the head and freezes the
stem and the stages before them: their parameters get no gradient and their modules stay in
eval mode, so BatchNorm running statistics stay as loaded and dropout is off; ``None`` trains
everything, 0 the head alone (what ``freeze_backbone`` means). Stages the partial
initialisation re-initialises cannot be frozen (they would stay random): with a checkpoint,
N + K >= S.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from filterx.models.archs import StageLayout, backbone_modules, head_name, model_stages


def stage_index(layout: StageLayout, name: str) -> int | None:
    """Where parameter, buffer or module ``name`` lies: 0 the stem, 1..S the stages, S + 1 the
    head; None for a module outside them all (a container, a shared parameterless module)."""
    def under(paths) -> bool:
        return any(name == p or name.startswith(p + ".") for p in paths)

    if under(layout.stem):
        return 0
    for i, (_, paths) in enumerate(layout.stages, start=1):
        if under(paths):
            return i
    if under((layout.head,)):
        return len(layout.stages) + 1
    return None


def _stage_list(layout: StageLayout) -> str:
    return ("the stem and " if layout.stem else "") + "stages " + ", ".join(layout.names)


def check_block_options(init_blocks: int | None, train_blocks: int | None, *, has_init: bool,
                        freeze_backbone: bool, method: str) -> None:
    """The checks that need no architecture: counts >= 0, ``init_blocks`` only with a
    checkpoint, ``freeze_backbone`` only with ``train_blocks`` 0 or unset, and dann (which
    adapts the backbone's features) with at least one trained stage."""
    for what, value in (("init_blocks", init_blocks), ("train_blocks", train_blocks)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{what} must be an integer >= 0 (or unset: all stages), got {value!r}")
    if init_blocks is not None and not has_init:
        raise ValueError(f"init_blocks={init_blocks} loads stages from a pre-trained checkpoint; "
                         "give init (--init) or leave init_blocks unset")
    if freeze_backbone and train_blocks not in (None, 0):
        raise ValueError(f"freeze_backbone trains the head alone, the same as train_blocks=0; it contradicts "
                         f"train_blocks={train_blocks}: give one of them")
    if method == "dann" and (freeze_backbone or train_blocks == 0):
        raise ValueError("dann adapts the backbone's features; it cannot run with a frozen backbone "
                         "(freeze_backbone or train_blocks=0); train at least one stage")


def check_blocks(arch: str, init_blocks: int | None, train_blocks: int | None, *, has_init: bool) -> StageLayout:
    """``arch``'s layout after checking that N and K are in 0..S and that no re-initialised
    stage would be frozen; ValueError naming the valid range otherwise."""
    layout = model_stages(arch)
    count = len(layout.stages)
    if count == 0 and (init_blocks is not None or train_blocks is not None):
        raise ValueError(f"arch {arch} declares no stages; init_blocks / train_blocks need a stage list in "
                         "its model registration")
    if init_blocks is not None and not 0 <= init_blocks <= count:
        raise ValueError(f"init_blocks {init_blocks} is out of range for {arch}: valid 0..{count} "
                         f"({_stage_list(layout)}; N loads the first N)")
    if train_blocks is not None and not 0 <= train_blocks <= count:
        raise ValueError(f"train_blocks {train_blocks} is out of range for {arch}: valid 0..{count} "
                         f"({_stage_list(layout)}; K trains the last K and the head, 0 the head alone)")
    if has_init and init_blocks is not None and train_blocks is not None and init_blocks + train_blocks < count:
        reinit = layout.names[init_blocks:count - train_blocks]
        raise ValueError(f"init_blocks={init_blocks} re-initialises {', '.join(reinit)} of {arch} but "
                         f"train_blocks={train_blocks} freezes them (frozen stages must come from the "
                         f"checkpoint): need init_blocks + train_blocks >= {count}")
    return layout


def load_stages(model: nn.Module, arch: str, state_dict: dict[str, torch.Tensor],
                init_blocks: int | None) -> list[str]:
    """Copy the stem and the first ``init_blocks`` stages of ``state_dict`` into ``model`` (a
    fresh ``arch``), everything when None; the rest keeps its fresh values. Returns the keys
    copied. The state dict must hold exactly the model's keys, or all but the head's (a
    self-supervised backbone, ``pretrain --objective moco``: the new head replaces it anyway)."""
    head = head_name(model) + "."
    own = set(model.state_dict())
    missing = sorted(k for k in own - set(state_dict) if not k.startswith(head))
    unexpected = sorted(set(state_dict) - own)
    if missing or unexpected:
        raise ValueError(f"the init checkpoint does not match a {arch}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if init_blocks is None:
        model.load_state_dict(state_dict, strict=False)
        return sorted(state_dict)
    layout = check_blocks(arch, init_blocks, None, has_init=True)
    keep = {k: v for k, v in state_dict.items() if stage_index(layout, k) <= init_blocks}
    model.load_state_dict(keep, strict=False)
    return sorted(keep)


def freeze_stages(model: nn.Module, arch: str, train_blocks: int | None) -> list[nn.Module]:
    """Freeze all but the last ``train_blocks`` stages and the head (None: freeze nothing): set
    their parameters' ``requires_grad`` to False and return the modules to put in eval mode at
    the start of every training epoch (all of the backbone for 0, as for a linear probe)."""
    if train_blocks is None:
        return []
    layout = check_blocks(arch, None, train_blocks, has_init=False)
    last_frozen = len(layout.stages) - train_blocks
    for name, p in model.named_parameters():
        if stage_index(layout, name) <= last_frozen:
            p.requires_grad_(False)
    if train_blocks == 0:  # parameterless modules outside the stages too (alexnet_lrn's dropout)
        return backbone_modules(model)
    frozen = []
    for name, module in model.named_modules():
        i = stage_index(layout, name) if name else None
        if i is not None and i <= last_frozen:
            frozen.append(module)
    return frozen


def block_record(arch: str, init_blocks: int | None, train_blocks: int | None, has_init: bool) -> dict:
    """What a run loaded, re-initialised, froze and trained, by stage name (for its files)."""
    layout = model_stages(arch)
    count = len(layout.stages)
    names = (("stem",) if layout.stem else ()) + layout.names
    offset = 1 if layout.stem else 0  # position of stage 1 in ``names``
    loaded = (names[:offset + (count if init_blocks is None else init_blocks)] if has_init else ())
    frozen = () if train_blocks is None else names[:offset + count - train_blocks]
    return {"init_blocks": init_blocks, "train_blocks": train_blocks, "stages": list(names),
            "loaded": list(loaded), "reinitialised": [n for n in names if n not in loaded],
            "frozen": list(frozen), "trained": [n for n in names if n not in frozen] + [layout.head]}
