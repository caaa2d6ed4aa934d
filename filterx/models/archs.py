"""Networks the trainer builds by name, and a uniform (backbone, head) view of them.

    build_model("resnet50", 1000)          # torchvision ResNet, no downloaded weights
    build_model("alexnet_lrn", 31)         # Krizhevsky et al. 2012 / BVLC AlexNet with LRN
    list_models()                          # the registered names

Every model ends in one ``nn.Linear`` head (``fc`` for ResNets, ``fc8`` for ``alexnet_lrn``);
the rest is the backbone. Fine-tuning replaces the head (:func:`replace_head`), gives it its
own learning rate (:func:`split_backbone_head`), and domain adaptation reads the head's input,
the pooled (B, D) features (:func:`features_and_logits`).

Each architecture also declares its backbone as a stem and an ordered list of stages
(:func:`model_stages`), the units of partial initialisation and freezing in transfer studies
(:mod:`filterx.train.partial_init`): ResNets, stem conv1/bn1 then layer1-4; ``alexnet_lrn``, no stem
and seven stages conv1-conv5, fc6, fc7 (Yosinski et al. 2014's layers 1-7).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

_MODELS: dict[str, tuple[Callable[..., nn.Module], str]] = {}


@dataclass(frozen=True)
class StageLayout:
    """An architecture's backbone in input-to-output order: ``stem`` (module paths; may be
    empty), then ``stages``, each (name, module paths); ``head`` is the final linear layer. A
    module path covers the module and everything under it; together with the head the paths
    hold every parameter and buffer of the model once."""

    stem: tuple[str, ...]
    stages: tuple[tuple[str, tuple[str, ...]], ...]
    head: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.stages)


_STAGES: dict[str, StageLayout] = {}


def register_model(name: str, head: str, stem: tuple[str, ...] = (),
                   stages: tuple[tuple[str, tuple[str, ...]], ...] = ()) -> Callable:
    """Register ``fn(num_classes, **kwargs) -> nn.Module`` under ``name``; ``head`` is the
    attribute path of its final linear layer, ``stem`` and ``stages`` its :class:`StageLayout`."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = (fn, head)
        _STAGES[name] = StageLayout(tuple(stem), tuple((n, tuple(p)) for n, p in stages), head)
        return fn

    return wrap


def model_stages(arch: str) -> StageLayout:
    """The registered stem / stages / head of ``arch``."""
    if arch not in _MODELS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(list_models())}")
    return _STAGES[arch]


def list_models() -> tuple[str, ...]:
    return tuple(sorted(_MODELS))


def build_model(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """An untrained ``arch`` with a ``num_classes``-way head (float32, CPU). ``kwargs`` go to
    the architecture (alexnet_lrn: ``dropout``, ``fc_dim``; ResNets: ``width``, the first
    stage's channels, 64 as published, ``stem``, "imagenet" as published or "small" for
    32-64 px images (:func:`_small_image_stem`), and torchvision's, e.g. ``zero_init_residual``)."""
    if arch not in _MODELS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(list_models())}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    fn, head = _MODELS[arch]
    try:
        model = fn(num_classes, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad options {kwargs} for {arch}: {exc}") from None
    # A plain attribute (not a buffer): not in the state dict, kept by SyncBatchNorm conversion.
    model.filterx_head = head
    return model


# ---------------------------------------------------------------- ResNets (torchvision)


RESNET_STEMS = ("imagenet", "small")
# The published layout: what a ResNet's layout options default to (and what a file that records
# none of them was built with).
RESNET_DEFAULTS = {"width": 64, "stem": "imagenet"}


def _resnet(name: str) -> Callable[..., nn.Module]:
    def make(num_classes: int, width: int = RESNET_DEFAULTS["width"], stem: str = RESNET_DEFAULTS["stem"],
             **kwargs) -> nn.Module:
        import torchvision

        if stem not in RESNET_STEMS:
            raise ValueError(f"unknown stem {stem!r}; valid: {', '.join(RESNET_STEMS)}")
        if width != RESNET_DEFAULTS["width"]:
            model = _narrow_resnet(name, num_classes, width, **kwargs)
        else:
            model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kwargs)
        if stem == "small":
            _small_image_stem(model)
        return model

    return make


def _small_image_stem(model: nn.Module) -> None:
    """Replace the ImageNet stem (7x7 conv stride 2, 3x3 max pool stride 2: a 4x smaller map)
    by a 3x3 conv of stride 1 and no pool, He et al. 2016's stem for 32 px CIFAR images: on
    32-64 px inputs the ImageNet stem leaves layer4 a 1x1-2x2 map. Same module names (``maxpool``
    becomes an identity), so the same stages; 16x the backbone's multiply-adds at one resolution."""
    width = model.conv1.out_channels
    model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()


_RESNET_BLOCKS = {"resnet18": ("BasicBlock", (2, 2, 2, 2)), "resnet34": ("BasicBlock", (3, 4, 6, 3)),
                  "resnet50": ("Bottleneck", (3, 4, 6, 3))}


def _narrow_resnet(name: str, num_classes: int, width: int, zero_init_residual: bool = False) -> nn.Module:
    """torchvision's ``name`` with stage widths (w, 2w, 4w, 8w) instead of (64, 128, 256, 512):
    the same depth and module names (so the same stages and head), about (w / 64)^2 of the
    compute; for CPU runs on small images (``width=16``: 1/16 of ResNet-18's multiply-adds)."""
    import torchvision.models.resnet as tv

    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    block, layers = _RESNET_BLOCKS[name]
    block = getattr(tv, block)
    model = tv.ResNet.__new__(tv.ResNet)
    nn.Module.__init__(model)
    model._norm_layer, model.inplanes, model.dilation, model.groups, model.base_width = nn.BatchNorm2d, width, 1, 1, 64
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1, model.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
    model.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    for i, n in enumerate(layers):
        setattr(model, f"layer{i + 1}", model._make_layer(block, width << i, n, stride=1 if i == 0 else 2))
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    model.fc = nn.Linear((width << 3) * block.expansion, num_classes)
    for m in model.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            last = getattr(m, "bn3", None) if isinstance(m, tv.Bottleneck) else getattr(m, "bn2", None)
            if isinstance(m, (tv.Bottleneck, tv.BasicBlock)) and last is not None:
                nn.init.constant_(last.weight, 0)
    return model


_RESNET_STAGES = tuple((f"layer{i}", (f"layer{i}",)) for i in range(1, 5))
for _name in ("resnet18", "resnet34", "resnet50"):
    register_model(_name, head="fc", stem=("conv1", "bn1", "relu", "maxpool"),
                   stages=_RESNET_STAGES)(_resnet(_name))


# ---------------------------------------------------------------- AlexNet with LRN


class _CeilMaxPool(nn.MaxPool2d):
    """Caffe's max pooling (ceil mode) that also accepts maps smaller than its window, padding
    them with -inf, so that test images down to 16 px go through. At 112 and 224 px every map
    is at least 3x3 and this is exactly ``nn.MaxPool2d(3, 2, ceil_mode=True)``."""

    def __init__(self) -> None:
        super().__init__(kernel_size=3, stride=2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < 3 or w < 3:
            x = F.pad(x, (0, max(0, 3 - w), 0, max(0, 3 - h)), value=float("-inf"))
        return super().forward(x)


class AlexNetLRN(nn.Module):
    """The BVLC AlexNet (Krizhevsky et al. 2012; Caffe's ``bvlc_alexnet``), as used in
    domain-adaptation work (DDC, DAN, DANN on Office-31), not torchvision's variant:

    conv1 96@11x11/4 -> ReLU -> LRN -> pool -> conv2 256@5x5 pad 2 groups 2 -> ReLU -> LRN ->
    pool -> conv3 384@3x3 -> conv4 384@3x3 g2 -> conv5 256@3x3 g2 -> pool -> [6x6 avg] ->
    fc6 4096 -> dropout -> fc7 4096 -> dropout -> fc8.

    LRN is ``nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1)``, which like Caffe divides
    alpha by the window size. conv1 is padded by 2 so that 224 px input gives Caffe's 227 px map
    sizes (55, 27, 13, 6). An adaptive average pool to 6x6 before fc6 makes the network accept
    112 px (and small test sizes); at 224 it is the identity. Initialisation is Caffe's:
    N(0, 0.01) weights (0.005 for fc6/fc7), biases 0.1 on conv2/4/5 and fc6/7, 0 elsewhere.

    ``fc_dim`` (4096 in the published network) narrows fc6/fc7, e.g. for fast tests.
    Input float (B, 3, R, R), R >= 16; output logits (B, num_classes).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, fc_dim: int = 4096) -> None:
        super().__init__()
        lrn = dict(size=5, alpha=1e-4, beta=0.75, k=1.0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.LocalResponseNorm(**lrn), _CeilMaxPool(),
            nn.Conv2d(96, 256, 5, padding=2, groups=2), nn.ReLU(inplace=True),
            nn.LocalResponseNorm(**lrn), _CeilMaxPool(),
            nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, 3, padding=1, groups=2), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1, groups=2), nn.ReLU(inplace=True),
            _CeilMaxPool(),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.fc6 = nn.Linear(256 * 6 * 6, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc8 = nn.Linear(fc_dim, num_classes)
        self._caffe_init()

    def _caffe_init(self) -> None:
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        for i, m in enumerate(convs):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.constant_(m.bias, 0.1 if i in (1, 3, 4) else 0.0)
        for m, std, bias in ((self.fc6, 0.005, 0.1), (self.fc7, 0.005, 0.1), (self.fc8, 0.01, 0.0)):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.constant_(m.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        x = self.dropout(F.relu(self.fc6(x), inplace=True))
        x = self.dropout(F.relu(self.fc7(x), inplace=True))
        return self.fc8(x)


# conv blocks by position in ``AlexNetLRN.features`` (conv, ReLU, LRN, pool ...), then fc6, fc7;
# the dropout module, shared by fc6 and fc7, has no parameters and belongs to no stage.
_ALEXNET_STAGES = (("conv1", ("features.0", "features.1", "features.2", "features.3")),
                   ("conv2", ("features.4", "features.5", "features.6", "features.7")),
                   ("conv3", ("features.8", "features.9")), ("conv4", ("features.10", "features.11")),
                   ("conv5", ("features.12", "features.13", "features.14")),
                   ("fc6", ("avgpool", "fc6")), ("fc7", ("fc7",)))


@register_model("alexnet_lrn", head="fc8", stages=_ALEXNET_STAGES)
def alexnet_lrn(num_classes: int, dropout: float = 0.5, fc_dim: int = 4096) -> nn.Module:
    return AlexNetLRN(num_classes, dropout=dropout, fc_dim=fc_dim)


# ---------------------------------------------------------------- backbone / head


def head_name(model: nn.Module) -> str:
    """Attribute path of the final linear layer: the registered one for models made by
    :func:`build_model`, else the last ``nn.Linear`` in module order."""
    name = getattr(model, "filterx_head", None)
    if name is not None:
        return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return linears[-1]


def get_head(model: nn.Module) -> nn.Linear:
    return model.get_submodule(head_name(model))


def feature_dim(model: nn.Module) -> int:
    """D, the width of the features the head reads."""
    return int(get_head(model).in_features)


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(backbone, head) sharing ``model``'s weights, split at :func:`head_name`: the backbone is
    ``model`` with its head replaced by ``nn.Identity``, mapping images to the (B, D) features the
    head reads; ``model`` itself is left whole. The backbone's parameters (and state dict) are the
    model's without the head's, in the same order. Trainers, encoders and backbone loaders all
    split a model here."""
    name = head_name(model)
    return with_submodule(model, name, nn.Identity()), model.get_submodule(name)


def split_backbone_head(model: nn.Module) -> tuple[list[nn.Parameter], str]:
    """(backbone parameters, head attribute path) of :func:`backbone_and_head`'s split: for
    separate learning rates or freezing."""
    backbone, _ = backbone_and_head(model)
    return list(backbone.parameters()), head_name(model)


def with_submodule(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """A shallow copy of ``model`` with ``module`` at the attribute path ``path`` (copies of the
    modules along the path, every other submodule shared); ``model`` is unchanged."""
    out = copy.copy(model)
    out._modules = dict(model._modules)  # its own module table: ``model`` keeps its own
    first, _, rest = path.partition(".")
    out._modules[first] = with_submodule(model._modules[first], rest, module) if rest else module
    return out


def backbone_modules(model: nn.Module) -> list[nn.Module]:
    """Every submodule outside the head (for putting a frozen backbone in eval mode)."""
    name = head_name(model)
    return [m for n, m in model.named_modules() if n and n != name and not n.startswith(name + ".")]


def replace_head(model: nn.Module, num_classes: int, std: float = 0.01) -> nn.Linear:
    """Put a fresh ``num_classes``-way head (weights N(0, std), bias 0, as new layers get in
    fine-tuning practice) in place of the old one, on the old one's device; returns it."""
    name = head_name(model)
    old = model.get_submodule(name)
    head = nn.Linear(old.in_features, num_classes).to(old.weight.device)
    nn.init.normal_(head.weight, 0.0, std)
    nn.init.zeros_(head.bias)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, head)
    return head


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (B, D), logits (B, C)) from one forward pass: the features are the head's
    input, captured by a forward pre-hook, so this works for any registered model."""
    captured: list[torch.Tensor] = []
    handle = get_head(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return captured[0], logits
