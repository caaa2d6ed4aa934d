"""Colour steps of image augmentation, batched on the images' device and seeded: torchvision's
ColorJitter (brightness, contrast, saturation, hue in a random order per image) and
RandomGrayscale, on float images in [0, 1] (n, 3, H, W), every random draw from a
``torch.Generator`` on the CPU, so the result is a function of that generator's seed alone.

Used by the MoCo views (:mod:`filterx.train.moco_views`) and by the pixel domain classifier's
training (:mod:`filterx.scorers.domain_pixels`, ``--colour``).

    gen = torch.Generator().manual_seed(seed)
    x = recolour(images01, ColourSteps(jitter=(0.8, 0.8, 0.8, 0.2), gray_p=0.5), gen)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclass(frozen=True)
class ColourSteps:
    """ColorJitter's (brightness, contrast, saturation, hue) strengths applied with probability
    ``jitter_p``, then grayscale with probability ``gray_p`` (MoCo v2's values by default)."""

    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2


# SimCLR's colour distortion of strength 1 (brightness, contrast, saturation 0.8, hue 0.2) with
# grayscale half the time: the small-image MoCo views' colour steps
# (filterx.train.moco_views.SMALL_IMAGE_VIEWS) and the pixel domain classifier's ``--colour jitter``.
STRONG = ColourSteps(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.5)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(n, 1, H, W) luma of (n, 3, H, W) RGB."""
    w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    mask = i.unsqueeze(1) == torch.arange(6, device=i.device).view(1, -1, 1, 1)
    a1 = torch.stack((v, q, p, p, t, v), 1)
    a2 = torch.stack((t, v, v, q, p, p), 1)
    a3 = torch.stack((p, p, t, v, v, q), 1)
    a4 = torch.stack((a1, a2, a3), 1)  # (n, 3, 6, H, W)
    return torch.einsum("nijk,nxijk->nxjk", mask.to(x.dtype), a4)


def _jitter_op(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    """One of torchvision's colour adjustments with a factor per image (n,)."""
    f = f.to(x.device, x.dtype).view(-1, 1, 1, 1)
    if op == 0:  # brightness: blend with black
        return (x * f).clamp(0, 1)
    if op == 1:  # contrast: blend with the image's mean luma
        mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        return (f * x + (1 - f) * mean).clamp(0, 1)
    if op == 2:  # saturation: blend with the luma
        return (f * x + (1 - f) * grayscale(x)).clamp(0, 1)
    hsv = _rgb_to_hsv(x)
    hsv[:, 0] = torch.fmod(hsv[:, 0] + f.view(-1, 1, 1) + 1.0, 1.0)
    return _hsv_to_rgb(hsv)


def color_jitter(x: torch.Tensor, steps: ColourSteps, gen: torch.Generator) -> torch.Tensor:
    """ColorJitter applied with probability ``jitter_p`` per image, its four adjustments in an
    order drawn per image (as torchvision draws one per call)."""
    n = x.shape[0]
    apply = torch.rand(n, generator=gen) < steps.jitter_p
    b, c, s, h = steps.jitter
    factors = torch.stack([torch.empty(n).uniform_(1 - b, 1 + b, generator=gen),
                           torch.empty(n).uniform_(1 - c, 1 + c, generator=gen),
                           torch.empty(n).uniform_(1 - s, 1 + s, generator=gen),
                           torch.empty(n).uniform_(-h, h, generator=gen)], 1)
    order = torch.argsort(torch.rand(n, 4, generator=gen), dim=1)
    x = x.clone()
    for k in range(4):
        for op in range(4):
            rows = torch.nonzero(apply & (order[:, k] == op)).flatten()
            if len(rows):
                idx = rows.to(x.device)
                x[idx] = _jitter_op(x[idx], op, factors[rows, op])
    return x


def recolour(x: torch.Tensor, steps: ColourSteps, gen: torch.Generator) -> torch.Tensor:
    """``steps`` on float images in [0, 1] (n, 3, H, W): :func:`color_jitter`, then grayscale
    with probability ``steps.gray_p`` per image."""
    x = color_jitter(x, steps, gen)
    gray = torch.rand(x.shape[0], generator=gen) < steps.gray_p
    if gray.any():
        idx = torch.nonzero(gray).flatten().to(x.device)
        x[idx] = grayscale(x[idx]).expand(-1, 3, -1, -1)
    return x
