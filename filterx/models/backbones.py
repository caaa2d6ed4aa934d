"""Pretrained backbones as encoders: torchvision, timm and open_clip models named by a spec.

    torchvision:MODEL[:WEIGHTS][@FILE]   torchvision.models.get_model(MODEL, weights=WEIGHTS)
    timm:MODEL[:TAG][@FILE]              timm.create_model("MODEL.TAG", pretrained=True)
    open_clip:MODEL:TAG                  open_clip.create_model_and_transforms(MODEL, TAG)
    open_clip:MODEL[:TAG]@FILE

WEIGHTS / TAG omitted (torchvision, timm): the library's default pretrained weights. ``none``:
random init (seeded with 0, so a spec always means the same weights; for tests and plumbing).
``@FILE``: the weights from a local file (a state dict, or a checkpoint holding one under
``state_dict`` / ``model``; .safetensors too), WEIGHTS / TAG then only choose the
preprocessing. Nothing is downloaded by filterx itself; a library that must download and
cannot gives one error saying to use ``@FILE``.

The embedding is taken where each library takes it: torchvision classification nets, the
input of their last ``nn.Linear`` (the penultimate features; that layer becomes Identity);
timm, ``forward_head(forward_features(x), pre_logits=True)``; open_clip, ``encode_image``
L2-normalised, as CLIP retrieval does.

Preprocessing is read from the library (torchvision ``weights.transforms()``, timm
``resolve_data_config``, open_clip's ``preprocess_cfg``) and mapped onto filterx's loader:
crop size, resize of the short side, mean and std. What the loader does differently is named
in ``Preprocess.notes`` (filterx resizes with antialiased bilinear interpolation; a library
asking for bicubic, or for a "squash" resize, is approximated).

timm and open_clip are optional extras, imported only here, inside their loaders.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from filterx.models.backbone_libs import EXTRAS, LIBS, RANDOM_INIT, BackboneSpec, Preprocess  # noqa: F401 - re-exported

LIBRARIES = ("torchvision", "timm", "open_clip")
FORMS = ("a file from filterx train-encoder, or a backbone spec: torchvision:MODEL[:WEIGHTS|none][@FILE], "
         "timm:MODEL[:TAG|none][@FILE], open_clip:MODEL:TAG|none or open_clip:MODEL[:TAG]@FILE "
         "(e.g. torchvision:resnet50:IMAGENET1K_V2, timm:resnet18:none)")
RANDOM_INIT_SEED = 0


def looks_like_spec(value: str | os.PathLike) -> bool:
    """Whether ``value`` names a backbone (LIB:...) rather than an encoder file."""
    text = str(value)
    lib, sep, _ = text.partition(":")
    return bool(sep) and lib in LIBRARIES and not Path(text).expanduser().is_file()


def parse_spec(value: str | os.PathLike) -> BackboneSpec:
    """``LIB:MODEL[:WEIGHTS][@FILE]`` -> BackboneSpec (format and file checked, no library
    imported); ValueError naming the valid forms."""
    text = str(value).strip()
    left, at, file = text.partition("@")
    parts = left.split(":")
    if parts[0] not in LIBRARIES or len(parts) not in (2, 3) or not all(parts[1:]) or (at and not file):
        raise ValueError(f"bad encoder {text!r}; valid: {FORMS}")
    lib, model = parts[0], parts[1]
    weights = parts[2] if len(parts) == 3 else None
    if weights is not None and weights.lower() == RANDOM_INIT:
        weights = RANDOM_INIT
    if weights == RANDOM_INIT and at:
        raise ValueError(f"bad encoder {text!r}: ':none' (random init) and '@FILE' (weights from a file) "
                         f"contradict each other; valid: {FORMS}")
    if lib == "open_clip" and weights is None and not at:
        raise ValueError(f"bad encoder {text!r}: open_clip needs a pretrained tag (open_clip:{model}:TAG), "
                         f"'none' for random init, or @FILE; valid: {FORMS}")
    path = None
    if at:
        p = Path(file).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"weights file {file!r} of encoder {text!r} does not exist")
        path = str(p.resolve())
    return BackboneSpec(lib, model, weights, path)


_HASHES: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (cached per path, size and mtime within a process)."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def spec_tag(spec: BackboneSpec, resolution: int, weights_name: str | None) -> str:
    """The embeddings tag: library, model, weights (resolved name, ``none``, or ``file`` + a
    short hash of the file's bytes) and resolution, made safe for a directory name."""
    parts = [spec.library, spec.model]
    if weights_name:
        parts.append(weights_name)
    if spec.file:
        parts.append("file" + file_sha256(spec.file)[:10])
    parts.append(f"r{resolution}")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts))


@dataclass
class Backbone:
    """A loaded backbone: ``features`` maps normalised (B, 3, R, R) float to (B, D) embeddings."""

    spec: BackboneSpec
    features: nn.Module
    preprocess: Preprocess
    tag: str
    feature_dim: int
    model: nn.Module  # the library's own model (for a torchvision net: its head is Identity)
    head_name: str | None = None  # torchvision: where the classification head was

    def info(self) -> dict:
        return describe_info(self.spec, self.feature_dim)


def describe_info(spec: BackboneSpec, feature_dim: int | None = None) -> dict:
    """The encoder metadata of ``spec`` (what an encoder file records: tag, arch, resolution,
    crop_fraction, mean, std, feature_dim where known, backbone, preprocess)."""
    pre, tag = describe(spec)
    info = {"tag": tag, "arch": spec.arch, "resolution": pre.resolution, "crop_fraction": pre.crop_fraction,
            "mean": list(pre.mean), "std": list(pre.std), "backbone": backbone_record(spec),
            "preprocess": {**asdict(pre), "notes": list(pre.notes)}}
    return info if feature_dim is None else {**info, "feature_dim": int(feature_dim)}


def backbone_record(spec: BackboneSpec) -> dict:
    """What an encoder file records of its backbone (the file's hash: to notice it changed)."""
    return {"spec": spec.text, "library": spec.library, "model": spec.model, "weights": spec.weights,
            "file": spec.file, "file_sha256": file_sha256(spec.file) if spec.file else None}


def describe(spec: BackboneSpec) -> tuple[Preprocess, str]:
    """(preprocessing, embeddings tag) of ``spec`` without building the model."""
    pre, weights_name = LIBS[spec.library][0](spec)
    return pre, spec_tag(spec, pre.resolution, weights_name)


def load_backbone(spec: BackboneSpec | str, device: str = "cpu") -> Backbone:
    """Build the model of ``spec`` with its weights, in eval mode on ``device``."""
    spec = parse_spec(spec) if not isinstance(spec, BackboneSpec) else spec
    pre, tag = describe(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)  # ':none' always means the same weights
        features, model, head_name = LIBS[spec.library][1](spec)
    features.eval().to(device)
    with torch.inference_mode():
        dim = int(features(torch.zeros(1, 3, pre.resolution, pre.resolution, device=device)).shape[1])
    return Backbone(spec, features, pre, tag, dim, model, head_name)


class NoHead(dict):
    """The state dict of a bare backbone spec: asking it for the head (entropy, influence, grad-align)
    raises one clear error saying how to make one."""

    def __init__(self, spec: str):
        super().__init__()
        self.spec = spec

    def __missing__(self, key):
        raise ValueError(f"encoder {self.spec} has no classifier head ({key}), which this method needs; make one "
                         f"with: filterx train-encoder TARGET probe.pt --backbone {self.spec} --probe-only, then "
                         "pass --encoder probe.pt")


def check_weights_file(record: dict, encoder: str | Path) -> None:
    """A probe file names its backbone's weights file by path and hash: refuse it once that file
    has changed (its embeddings would no longer be those the probe was trained on)."""
    file = record.get("file")
    if not file:
        return
    if not Path(file).is_file():
        raise FileNotFoundError(f"encoder {encoder}: its backbone's weights file {file} does not exist")
    if file_sha256(file) != record.get("file_sha256"):
        raise ValueError(f"encoder {encoder}: its backbone's weights file {file} has changed since the probe was "
                         f"trained; retrain it: filterx train-encoder TARGET {encoder} --backbone {record['spec']} "
                         "--probe-only")


def with_head(bb: Backbone, weight: torch.Tensor, bias: torch.Tensor) -> tuple[nn.Module, nn.Linear]:
    """(model, head): a linear head (C, D) on the backbone's features. For a torchvision net
    whose head was a top-level attribute (ResNets' ``fc``) the model is that net with the new
    head in the old one's place (sharing every other module), so that code splitting a ResNet
    (last-block influence) sees a ResNet; otherwise features then head."""
    from filterx.models.archs import with_submodule

    device = next(bb.features.parameters()).device
    head = nn.Linear(weight.shape[1], weight.shape[0]).to(device)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    if bb.head_name is not None and "." not in bb.head_name:
        model = with_submodule(bb.model, bb.head_name, head)  # bb.model keeps its Identity
    else:
        model = nn.Sequential(bb.features, head)
    return model.eval(), head
