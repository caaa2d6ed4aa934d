"""Backbone specs, their preprocessing, and the three libraries behind ``filterx.models.backbones``.

For each library: ``describe(spec) -> (Preprocess, weights name for the tag)`` and
``build(spec) -> (features module, the library's model, torchvision head attribute or
None)``. timm and open_clip are imported here only, when a spec names them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

EXTRAS = {"timm": "timm", "open_clip": "open_clip"}  # library -> pip extra of filterx
RANDOM_INIT = "none"


@dataclass(frozen=True)
class BackboneSpec:
    library: str
    model: str
    weights: str | None = None  # enum name / pretrained tag; None: the default; "none": random init
    file: str | None = None  # absolute path of a local weights file

    @property
    def text(self) -> str:
        """The canonical spec (the file made absolute)."""
        return (f"{self.library}:{self.model}" + (f":{self.weights}" if self.weights else "")
                + (f"@{self.file}" if self.file else ""))

    @property
    def arch(self) -> str:
        return f"{self.library}:{self.model}"


@dataclass(frozen=True)
class Preprocess:
    """The evaluation transform, as filterx's loader applies it."""

    resolution: int  # center crop R x R
    resize_size: int  # short side resized to this first
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # what the library asks for
    source: str  # where it was read
    notes: tuple[str, ...] = field(default_factory=tuple)  # what filterx approximates

    @property
    def crop_fraction(self) -> float:
        return self.resolution / self.resize_size


def _import(library: str):
    import importlib

    try:
        return importlib.import_module(library)
    except ImportError:
        raise ValueError(f"encoder spec {library}:... needs {library}, which is not installed; install it with: "
                         f"pip install 'filterx[{EXTRAS[library]}]'") from None


def read_state_dict(path: str) -> dict:
    """A state dict from a file: plain, or under 'state_dict' / 'model'; 'module.' prefixes
    (DDP) removed; .safetensors read with safetensors."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: one line naming it
            raise ValueError(f"{path} is not a readable weights file ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} holds no state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_strict(model: nn.Module, state: dict, drop: tuple[str, ...], spec: BackboneSpec) -> None:
    """Load ``state`` without the head keys ``drop`` (any class count is fine), strictly otherwise."""
    state = {k: v for k, v in state.items() if not any(k == d or k.startswith(d + ".") for d in drop)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"weights file {spec.file} does not fit {spec.arch}: "
                         f"{' '.join(line.strip() for line in first[:3])[:400]}") from None


def _no_download(spec: BackboneSpec, exc: Exception) -> ValueError:
    return ValueError(f"could not get the weights of {spec.text} ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); with the weights "
                      f"on disk use {spec.arch}{':' + spec.weights if spec.weights else ''}@FILE")


def _close(name: str, names) -> str:
    import difflib

    near = difflib.get_close_matches(name, list(names), n=5, cutoff=0.5)
    return f" (close: {', '.join(near)})" if near else ""


def _interp_notes(interpolation: str, lib: str) -> tuple[str, ...]:
    if interpolation.lower() in ("bilinear", "linear"):
        return ()
    return (f"{lib} resizes with {interpolation} interpolation; filterx's loader uses antialiased bilinear",)


# ---------------------------------------------------------------- torchvision


def _tv_weights(spec: BackboneSpec):
    """(the weights enum member or None, the enum member whose transforms apply or None)."""
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if spec.model not in names:
        raise ValueError(f"unknown torchvision classification model {spec.model!r}{_close(spec.model, names)}; "
                         "valid: torchvision.models.list_models(module=torchvision.models)")
    try:
        enum = tvm.get_model_weights(spec.model)
    except (ValueError, KeyError):
        enum = None
    if spec.weights in (None, RANDOM_INIT):
        default = enum.DEFAULT if enum is not None else None
        if spec.weights is None and spec.file is None and default is None:
            raise ValueError(f"torchvision {spec.model} has no published weights; use torchvision:{spec.model}:none "
                             f"(random init) or torchvision:{spec.model}@FILE")
        return (default if spec.weights is None and spec.file is None else None), default
    members = [w.name for w in enum] if enum is not None else []
    if spec.weights != "DEFAULT" and spec.weights not in members:
        raise ValueError(f"unknown weights {spec.weights!r} for torchvision {spec.model}; valid: "
                         f"{', '.join(members + ['DEFAULT', RANDOM_INIT]) if members else RANDOM_INIT}")
    w = enum[spec.weights]
    return (None if spec.file else w), w


def _tv_describe(spec: BackboneSpec) -> tuple[Preprocess, str | None]:
    loaded, chosen = _tv_weights(spec)
    if chosen is not None:
        t = chosen.transforms()
        interp = getattr(t.interpolation, "value", str(t.interpolation))
        pre = Preprocess(int(t.crop_size[0]), int(t.resize_size[0]), tuple(t.mean), tuple(t.std), interp,
                         f"torchvision {type(chosen).__name__}.{chosen.name}.transforms()",
                         _interp_notes(interp, "torchvision"))
    else:  # a model with no published weights: ImageNet's usual 224 of 256
        from filterx.decode.loader import IMAGENET_MEAN, IMAGENET_STD

        pre = Preprocess(224, 256, IMAGENET_MEAN, IMAGENET_STD, "bilinear", "ImageNet defaults (no weights enum)")
    name = RANDOM_INIT if spec.weights == RANDOM_INIT else (chosen.name if chosen is not None and
                                                            (loaded is not None or spec.weights) else None)
    return pre, name


def _tv_build(spec: BackboneSpec):
    import torchvision.models as tvm

    from filterx.models.archs import backbone_and_head, head_name

    loaded, _ = _tv_weights(spec)
    try:
        model = tvm.get_model(spec.model, weights=loaded)
    except Exception as exc:  # noqa: BLE001 - a failed download (no network): one line
        if loaded is None:
            raise
        raise _no_download(spec, exc) from None
    name = head_name(model)
    backbone, _ = backbone_and_head(model)
    if spec.file:
        _load_strict(backbone, read_state_dict(spec.file), (name,), spec)
    return backbone, backbone, name


# ---------------------------------------------------------------- timm


def _timm_name(spec: BackboneSpec) -> str:
    timm = _import("timm")
    if not timm.is_model(spec.model):
        raise ValueError(f"unknown timm model {spec.model!r}{_close(spec.model, timm.list_models())}; "
                         "valid: timm.list_models()")
    if spec.weights in (None, RANDOM_INIT):
        return spec.model
    name = f"{spec.model}.{spec.weights}"
    tags = timm.list_pretrained(f"{spec.model}.*")
    if name not in tags:
        raise ValueError(f"unknown pretrained tag {spec.weights!r} for timm {spec.model}; valid: "
                         f"{', '.join(t.partition('.')[2] for t in tags) or 'none published'}, {RANDOM_INIT}")
    return name


def _timm_describe(spec: BackboneSpec) -> tuple[Preprocess, str | None]:
    timm = _import("timm")
    from timm.data import resolve_data_config

    name = _timm_name(spec)
    cfg = timm.models.get_pretrained_cfg(name)
    data = resolve_data_config({}, pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    h, w = data["input_size"][1:]
    notes = list(_interp_notes(data["interpolation"], "timm"))
    if h != w:
        notes.append(f"timm's input is {h}x{w}; filterx crops squares of {h}")
    mode = data.get("crop_mode", "center")
    if mode != "center":
        notes.append(f"timm's crop_mode {mode!r} is approximated by a center crop")
    # timm's eval transform: short side to floor(size / crop_pct), then a center crop
    resize = int(math.floor(h / data["crop_pct"]))
    pre = Preprocess(int(h), resize, tuple(data["mean"]), tuple(data["std"]), data["interpolation"],
                     f"timm resolve_data_config({name})", tuple(notes))
    if spec.weights == RANDOM_INIT or spec.file:
        return pre, spec.weights  # a file's weights are named by its hash; a tag given names the preprocessing
    return pre, cfg.tag if cfg is not None and cfg.tag else spec.weights


class TimmPreLogits(nn.Module):
    """timm's pre-logits features: ``forward_head(forward_features(x), pre_logits=True)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def _timm_build(spec: BackboneSpec):
    timm = _import("timm")
    name = _timm_name(spec)
    pretrained = spec.weights != RANDOM_INIT and spec.file is None
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except Exception as exc:  # noqa: BLE001 - a failed download (no network): one line
        if not pretrained:
            raise
        raise _no_download(spec, exc) from None
    if spec.file:
        head = model.pretrained_cfg.get("classifier") or ()
        _load_strict(model, timm.models.load_state_dict(spec.file), (head,) if isinstance(head, str) else tuple(head),
                     spec)
    return TimmPreLogits(model), model, None


# ---------------------------------------------------------------- open_clip


def _oc_check(spec: BackboneSpec):
    open_clip = _import("open_clip")
    if spec.model not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {spec.model!r}{_close(spec.model, open_clip.list_models())}; "
                         "valid: open_clip.list_models()")
    if spec.weights not in (None, RANDOM_INIT):
        tags = open_clip.list_pretrained_tags_by_model(spec.model)
        if spec.weights not in tags:
            raise ValueError(f"unknown pretrained tag {spec.weights!r} for open_clip {spec.model}; valid: "
                             f"{', '.join(tags) or 'none published'}, {RANDOM_INIT}, or @FILE")
    return open_clip


def _oc_preprocess_cfg(open_clip, spec: BackboneSpec) -> dict:
    """The preprocessing open_clip builds its ``preprocess`` from: the model config's, with the
    pretrained tag's mean / std / interpolation / resize mode on top."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = open_clip.get_model_config(spec.model)
    pp = merge_preprocess_dict(asdict(PreprocessCfg()), cfg.get("preprocess_cfg", {}))
    if spec.weights not in (None, RANDOM_INIT):
        pp = merge_preprocess_dict(pp, open_clip.get_pretrained_cfg(spec.model, spec.weights))
    pp["size"] = cfg["vision_cfg"].get("image_size", pp["size"])
    return pp


def _oc_describe(spec: BackboneSpec) -> tuple[Preprocess, str | None]:
    open_clip = _oc_check(spec)
    pp = _oc_preprocess_cfg(open_clip, spec)
    size = pp["size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    notes = list(_interp_notes(pp["interpolation"], "open_clip"))
    if pp["resize_mode"] != "shortest":
        notes.append(f"open_clip's resize_mode {pp['resize_mode']!r} is approximated by short-side resize + "
                     "center crop")
    if h != w:
        notes.append(f"open_clip's input is {h}x{w}; filterx crops squares of {h}")
    # open_clip 'shortest': short side to the image size, then a center crop of that size
    pre = Preprocess(int(h), int(h), tuple(pp["mean"]), tuple(pp["std"]), pp["interpolation"],
                     f"open_clip preprocess_cfg({spec.model}, {spec.weights or 'file'})", tuple(notes))
    return pre, spec.weights


class ClipImageEmbedding(nn.Module):
    """open_clip's image embedding, L2-normalised: ``encode_image(x, normalize=True)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, normalize=True)


def _oc_build(spec: BackboneSpec):
    open_clip = _oc_check(spec)
    pp = _oc_preprocess_cfg(open_clip, spec)
    source = spec.file or (None if spec.weights == RANDOM_INIT else spec.weights)
    try:
        model, _, _ = open_clip.create_model_and_transforms(
            spec.model, pretrained=source, image_mean=pp["mean"], image_std=pp["std"],
            image_interpolation=pp["interpolation"], image_resize_mode=pp["resize_mode"], pretrained_text=False)
    except Exception as exc:  # noqa: BLE001 - a failed download or a file that does not fit: one line
        if spec.file:
            raise ValueError(f"weights file {spec.file} does not fit open_clip {spec.model}: "
                             f"{type(exc).__name__}: {str(exc).strip()[:300]}") from None
        if source is None:
            raise
        raise _no_download(spec, exc) from None
    return ClipImageEmbedding(model), model, None


LIBS = {
    "torchvision": (_tv_describe, _tv_build),
    "timm": (_timm_describe, _timm_build),
    "open_clip": (_oc_describe, _oc_build),
}
