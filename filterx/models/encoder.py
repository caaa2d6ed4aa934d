"""The encoder: a model that embeds images (and, with a head, classifies them into the
target's classes), and the file train-encoder writes (training: :mod:`filterx.train.encoder`).

The saved file (``torch.save`` of a dict, written atomically) holds everything later commands
need: ``arch``, ``model_kwargs`` (the registry's layout options, e.g. a narrower ResNet with
the small-image stem; absent: the published layout), ``resolution``, ``class_names``,
``mean``/``std`` (the target's own pixel statistics), ``feature_dim``, the full ``state_dict``
(backbone + linear head), the target's fingerprint, ``train_ids``/``val_ids``, metrics, and a
``tag`` naming the embeddings it makes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn as nn

from filterx.io.dataset import Dataset
from filterx.core.runtime import load_marked_dict
from filterx.models.archs import backbone_and_head, build_model, list_models

log = logging.getLogger(__name__)

# Encoders are the trainer registry's ResNets (filterx.models.archs): one registry of models.
ARCHS = tuple(name for name in list_models() if name.startswith("resnet"))
ENCODER_FORMAT = 1


def build_resnet(arch: str, num_classes: int, **model_kwargs) -> nn.Module:
    """An untrained torchvision ResNet with a ``num_classes`` head (no downloads), built by the
    model registry; ``model_kwargs`` (``width``, ``stem``) as :func:`build_model` takes them."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    return build_model(arch, num_classes, **model_kwargs)


def state_tag(arch: str, resolution: int, state_dict: dict) -> str:
    """A short name for an encoder: arch, resolution and a hash of its weights."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return f"{arch}-r{resolution}-{h.hexdigest()[:10]}"


@dataclass(frozen=True)
class Encoder:
    """A loaded encoder: the full model, its feature extractor and head, and its metadata.

    ``head`` is None for a bare backbone spec (no classifier: train a probe for one)."""

    model: nn.Module
    features: nn.Module
    head: nn.Linear | None
    info: dict

    @property
    def tag(self) -> str:
        return self.info["tag"]

    @property
    def resolution(self) -> int:
        return int(self.info["resolution"])

    @property
    def crop_fraction(self) -> float:
        """The loader's center crop share of the short side (backbones: their library's)."""
        return float(self.info.get("crop_fraction", 0.875))


def read_encoder_file(path: str | Path) -> dict:
    """The dict ``train_encoder`` (or the probe, ``filterx.stages.probe``) saved, weights included,
    no model built; for a backbone spec (``filterx.models.backbones``), its description (tag,
    preprocessing) with no head. Clear errors for missing or foreign files."""
    from filterx.models import backbones

    if backbones.looks_like_spec(path):
        spec = backbones.parse_spec(path)
        return {**backbones.describe_info(spec), "state_dict": backbones.NoHead(spec.text)}
    info = load_marked_dict(path, "filterx_encoder", ENCODER_FORMAT, "encoder", "filterx train-encoder",
                            f"; make one with: filterx train-encoder TARGET {Path(path).expanduser()}")
    if "backbone" in info:
        backbones.check_weights_file(info["backbone"], path)
    return info


def load_encoder(path: str | Path, device: str = "cpu") -> Encoder:
    """Load an encoder as a model in eval mode on ``device``: a file written by ``train_encoder``
    or by the probe (a backbone + a linear head), or a backbone spec (no head)."""
    from filterx.models import backbones

    if backbones.looks_like_spec(path):
        bb = backbones.load_backbone(str(path), device)
        return Encoder(bb.features, bb.features, None, {**bb.info(), "state_dict": backbones.NoHead(bb.spec.text)})
    info = read_encoder_file(path)
    if "backbone" in info:
        return _load_probe(info, path, device)
    model = build_resnet(info["arch"], info["num_classes"], **info.get("model_kwargs", {}))
    model.load_state_dict(info.pop("state_dict"))
    model.eval().to(device)
    features, head = backbone_and_head(model)
    return Encoder(model, features, head, info)


def _load_probe(info: dict, path: str | Path, device: str) -> Encoder:
    """A backbone with the linear probe trained on its frozen features as the head."""
    from filterx.models import backbones

    bb = backbones.load_backbone(info["backbone"]["spec"], device)
    if bb.tag != info["tag"]:
        raise ValueError(f"encoder {path} was trained on features tagged {info['tag']}, but its backbone "
                         f"{info['backbone']['spec']} now gives {bb.tag}; retrain the probe")
    model, head = backbones.with_head(bb, info["state_dict"]["fc.weight"], info["state_dict"]["fc.bias"])
    return Encoder(model, bb.features, head, info)


def encoder_target_split(target: Dataset, info: dict) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, held-out ids) of ``target``: the encoder's own split when it was trained on
    this target (``info``: its file's contents), else every labelled sample and no held-out."""
    if info.get("target", {}).get("fingerprint") == target.fingerprint:
        return np.asarray(info["train_ids"], dtype=np.int64), np.asarray(info["val_ids"], dtype=np.int64)
    return np.flatnonzero(target.labels >= 0), np.zeros(0, dtype=np.int64)
