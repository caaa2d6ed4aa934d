"""The MoCo-v2 two-crop augmentation, batched on the training device and seeded.

Chen et al. 2020 ("Improved baselines with momentum contrastive learning"), per view:

    RandomResizedCrop(R, scale=(0.2, 1.0))          aspect ratio 3/4 - 4/3
    RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8)   the four in a random order
    RandomGrayscale(p=0.2)
    RandomApply(GaussianBlur(sigma in [0.1, 2.0]), p=0.5)
    RandomHorizontalFlip()
    Normalize(ImageNet mean, std)

Here it runs on whole batches of float images in [0, 1] (B, 3, S, S) already on the device
(the loader's resize + center crop of the full short side, S = R / 0.875), with every random
draw taken from a ``torch.Generator`` on the CPU, so a batch's views are a function of that
generator's seed alone (what exact resumption needs). Differences from the torchvision
pipeline: the crop is resampled bilinearly with ``grid_sample`` (no antialiasing; the crop is
shrunk by at most S / R = 1.14), the flip is folded into the crop, and the blur's sigma is
given for 224 px and scaled with R (sigma 0.1-2.0 px at 224, 0.05-1.0 at 112).

    gen = torch.Generator().manual_seed(step_seed)
    q, k = two_crops(images01, 112, gen)      # (B, 3, 112, 112) each, normalised
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from filterx.decode.colour import STRONG, ColourSteps, recolour
from filterx.decode.loader import IMAGENET_MEAN, IMAGENET_STD


_V2_COLOUR = ColourSteps()  # MoCo v2's colour steps (filterx.decode.colour's defaults)


@dataclass(frozen=True)
class MocoAugment:
    """The MoCo-v2 recipe's parameters (the defaults are the paper's)."""

    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = _V2_COLOUR.jitter  # brightness, contrast, saturation, hue
    jitter_p: float = _V2_COLOUR.jitter_p
    gray_p: float = _V2_COLOUR.gray_p
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # at 224 px, scaled with the output size
    blur_p: float = 0.5
    flip_p: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def moco_augment(overrides: dict) -> MocoAugment:
    """MoCo v2's views with ``overrides`` of some fields (lists taken as tuples); an unknown
    field is a ValueError naming the valid ones."""
    fields = {f.name for f in dataclasses.fields(MocoAugment)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown MoCo view parameter(s) {bad}; valid: {', '.join(sorted(fields))}")
    return MocoAugment(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


# Overrides of MoCo v2's views for 32 px images whose object fills most of the frame (README,
# "A self-supervised encoder"): crops of at least half the area (a fifth of a digit is no digit),
# SimCLR's colour strength 1 (jitter 0.8/0.2) with grayscale half the time (v2's 0.4 left paper
# tint to tell instances apart, and the features kept colour). The views that beat random-init
# features at 32 px (tests/test_moco.py); the benchmarks' MoCo runs use them.
SMALL_IMAGE_VIEWS = {"scale": (0.5, 1.0), "jitter": STRONG.jitter, "gray_p": STRONG.gray_p}


def colour_steps(aug: MocoAugment) -> ColourSteps:
    """The views' colour steps (:mod:`filterx.decode.colour`)."""
    return ColourSteps(jitter=aug.jitter, jitter_p=aug.jitter_p, gray_p=aug.gray_p)


def crop_boxes(n: int, size: int, aug: MocoAugment, gen: torch.Generator) -> torch.Tensor:
    """(n, 4) float boxes (x0, y0, w, h) in pixels of a square ``size`` image, drawn as
    torchvision's RandomResizedCrop does: up to 10 tries of (area, log-aspect), the first that
    fits, else the whole image."""
    area = size * size
    tries = 10
    a = torch.empty(n, tries).uniform_(aug.scale[0], aug.scale[1], generator=gen) * area
    logr = torch.empty(n, tries).uniform_(math.log(aug.ratio[0]), math.log(aug.ratio[1]), generator=gen)
    w = torch.sqrt(a * torch.exp(logr)).round()
    h = torch.sqrt(a / torch.exp(logr)).round()
    fits = (w <= size) & (h <= size) & (w > 0) & (h > 0)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    w = torch.where(first >= 0, w[rows, first.clamp_min(0)], torch.full((n,), float(size)))
    h = torch.where(first >= 0, h[rows, first.clamp_min(0)], torch.full((n,), float(size)))
    u = torch.rand(n, 2, generator=gen)
    x0 = torch.floor(u[:, 0] * (size - w + 1))
    y0 = torch.floor(u[:, 1] * (size - h + 1))
    return torch.stack([x0, y0, w, h], 1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, out: int) -> torch.Tensor:
    """Bilinear crops ``boxes`` (n, 4: x0, y0, w, h in pixels) of ``images`` (n, 3, S, S)
    resized to ``out`` x ``out``, mirrored where ``flips`` (n,) bool."""
    n, _, s, _ = images.shape
    b = boxes.to(images.device, images.dtype)
    sx, sy = b[:, 2] / s, b[:, 3] / s
    cx = (b[:, 0] + b[:, 2] / 2) / s * 2 - 1
    cy = (b[:, 1] + b[:, 3] / 2) / s * 2 - 1
    sign = 1.0 - 2.0 * flips.to(images.device, images.dtype)
    theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = sy, cy
    grid = F.affine_grid(theta, [n, 3, out, out], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of each image (n, 3, H, W) with its own ``sigma`` (n,) in
    pixels; kernel radius ceil(3 max sigma), reflected borders."""
    n, ch, hgt, wid = x.shape
    radius = max(1, min(int(math.ceil(3 * float(sigma.max()))), min(hgt, wid) - 1))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.to(x.device, x.dtype).view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # (n*3, 2r+1)
    y = F.pad(x.reshape(1, n * ch, hgt, wid), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(n * ch, 1, 1, -1), groups=n * ch)
    y = F.conv2d(y, k.view(n * ch, 1, -1, 1), groups=n * ch)
    return y.view(n, ch, hgt, wid)


def moco_view(images: torch.Tensor, out: int, gen: torch.Generator, aug: MocoAugment = MocoAugment()) -> torch.Tensor:
    """One augmented, normalised view (n, 3, out, out) of float images in [0, 1] (n, 3, S, S)."""
    n, _, s, s2 = images.shape
    if s != s2:
        raise ValueError(f"moco_view takes square images, got {s}x{s2}")
    boxes = crop_boxes(n, s, aug, gen)
    flips = torch.rand(n, generator=gen) < aug.flip_p
    x = recolour(resized_crops(images, boxes, flips, out), colour_steps(aug), gen)
    blur = torch.rand(n, generator=gen) < aug.blur_p
    sigma = torch.empty(n).uniform_(aug.blur_sigma[0], aug.blur_sigma[1], generator=gen) * (out / 224)
    if blur.any():
        idx = torch.nonzero(blur).flatten()
        x[idx.to(x.device)] = gaussian_blur(x[idx.to(x.device)], sigma[idx])
    mean = torch.tensor(aug.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(aug.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def two_crops(images: torch.Tensor, out: int, gen: torch.Generator,
              aug: MocoAugment = MocoAugment()) -> tuple[torch.Tensor, torch.Tensor]:
    """(query view, key view) of the same images, independently augmented."""
    return moco_view(images, out, gen, aug), moco_view(images, out, gen, aug)
