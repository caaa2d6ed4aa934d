"""PGD adversarial training (Madry et al. 2018), as the robustness library implements it.

    x_adv = pgd_attack(pixel_model, x, y, eps=3.0, norm="l2", steps=7, step_size=default_step_size(3.0, 7))
    attack = Attack(eps=3.0, norm="l2", steps=7)       # for the trainer: normalised images in and out
    x_adv_normalised = attack(model, batch.images, labels)

The attack lives in pixel space: images in [0, 1], the eps ball measured there (L2 over all
C x H x W values of an image, or L-infinity), so the epsilons of the literature carry over (L2
eps 1 and 3 at 224 px in the robust-transfer studies; L-inf 8/255 in Madry et al.'s CIFAR-10
models). filterx's loaders hand out images already normalised with the ImageNet mean/std, so
:class:`Attack` maps a batch back to pixels, attacks ``InputNormalize(model)`` there and
normalises the result again, so the model is fed normalised images as in standard training.

As in the robustness library (``AttackerModel.forward`` with ``make_adv=True``): the model is
put in eval mode for the attack (BatchNorm uses its running statistics, dropout is off) and
back into its previous mode for the training step; each step moves by ``step_size`` along the
gradient's L2 direction or its sign, then projects onto the eps ball and onto [0, 1]; the
example returned is, per image, the iterate of highest loss (``use_best``, the library's
default). Unlike the library's default, the attack starts at a random point of the ball
(``random_start``), as Madry et al. train. The step size defaults to 2.5 eps / steps, the rule
of Madry et al. that the library's documentation recommends; 7 steps is the library's default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from filterx.decode.loader import IMAGENET_MEAN, IMAGENET_STD

NORMS = ("l2", "linf")
DEFAULT_STEPS = 7  # the robustness library's --attack-steps default (Madry et al. train CIFAR-10 with 7)
STEP_RULE = 2.5  # step size = STEP_RULE * eps / steps


def default_step_size(eps: float, steps: int) -> float:
    """The robustness literature's PGD step size: 2.5 * eps / steps (the steps together cover
    2.5 eps, more than the ball's diameter, so the boundary is reachable from any start)."""
    return STEP_RULE * eps / steps


def check_attack(eps: float, norm: str, steps: int, step_size: float | None = None) -> None:
    """ValueError naming the bad value and the valid ones; nothing when all are valid."""
    if norm not in NORMS:
        raise ValueError(f"unknown adversarial norm {norm!r}; valid: {', '.join(NORMS)}")
    if not eps >= 0:  # also NaN
        raise ValueError(f"adversarial eps must be >= 0 (0: standard training), got {eps}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"adversarial steps must be an integer >= 1, got {steps!r}")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"adversarial step size must be > 0 (unset: 2.5 * eps / steps), got {step_size}")


class InputNormalize(nn.Module):
    """``model`` fed with pixels in [0, 1]: (x - mean) / std, then the model (B, 3, H, W)."""

    def __init__(self, model: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean.to(x.device)) / self.std.to(x.device))


def _per_image_norm(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, 1, ..., 1): the L2 norm of each image."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """delta moved into the eps ball and x + delta into [0, 1] (the library's order)."""
    if norm == "l2":
        delta = delta * (eps / _per_image_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    else:
        delta = delta.clamp(-eps, eps)
    return (x + delta).clamp(0.0, 1.0) - x


def _random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """A random point of the ball: the library's random_perturb (L2: on the sphere, L-inf: uniform)."""
    if norm == "l2":
        d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        d = d * (eps / _per_image_norm(d).clamp_min(1e-12))
    else:
        d = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    return (x + d).clamp(0.0, 1.0) - x


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, steps: int,
               step_size: float | None, *, random_start: bool = True, use_best: bool = True,
               generator: torch.Generator | None = None, autocast: bool | None = None) -> torch.Tensor:
    """Untargeted PGD on the cross-entropy of ``model(x)`` against ``y``.

    x: (B, C, H, W) float32 pixels in [0, 1]; y: (B,) int64 labels (rows with a label < 0 are
    returned unchanged); ``model`` maps pixels to (B, K) logits and is used as it is (call it
    in eval mode, as the robustness library does; :class:`Attack` does that). Returns
    x_adv (B, C, H, W) float32 on x's device, detached, with ||x_adv - x|| <= eps per image
    (L2 over all C x H x W values, or L-inf) and every value in [0, 1]. Model parameters get no
    gradients. ``autocast`` (None: on CUDA) runs the forward passes in bf16, the loss in
    float32. ``generator`` draws the random start (None: torch's global RNG). ``step_size``
    None: :func:`default_step_size`.
    """
    check_attack(eps, norm, steps, step_size)
    step_size = default_step_size(eps, steps) if step_size is None else step_size
    x = x.detach().float()
    if eps == 0:
        return x.clone()
    labelled = y >= 0
    target = y.clamp_min(0)
    amp = x.is_cuda if autocast is None else autocast

    def losses(delta: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and x.is_cuda):
            logits = model(x + delta)
        return F.cross_entropy(logits.float(), target, reduction="none") * labelled

    delta = _random_start(x, eps, norm, generator) if random_start else torch.zeros_like(x)
    best, best_loss = delta.clone(), torch.full((len(x),), -float("inf"), device=x.device)
    for step in range(steps + 1):
        if step == steps and not use_best:
            break
        with torch.set_grad_enabled(step < steps):  # the last pass only scores the last iterate
            delta.requires_grad_(step < steps)
            loss = losses(delta)
            total = loss.sum()  # summed: each image's gradient is its own, whatever the batch size
        if use_best:
            better = (loss.detach() > best_loss).view(-1, *([1] * (x.dim() - 1)))
            best = torch.where(better, delta.detach(), best)
            best_loss = torch.maximum(loss.detach(), best_loss)
        if step == steps:
            break
        (grad,) = torch.autograd.grad(total, [delta])
        with torch.no_grad():
            if norm == "l2":
                move = grad / _per_image_norm(grad).clamp_min(1e-12)
            else:
                move = grad.sign()
            delta = _project(delta.detach() + step_size * move, x, eps, norm)
    if not use_best:
        best = delta.detach()
    return torch.where(labelled.view(-1, *([1] * (x.dim() - 1))), x + best, x)


@dataclass(frozen=True)
class Attack:
    """The attack of an adversarial training run, on the batches filterx's loaders give:
    ``attack(model, x, y)`` takes x (B, 3, H, W) float32 normalised with ``mean``/``std`` on
    any device and returns the adversarial x_adv, normalised the same way (same shape, dtype,
    device and memory format). The eps ball and the clamp to [0, 1] are in pixel space; the
    model is in eval mode during the attack and back in its previous mode afterwards.
    ``step_size`` None: :func:`default_step_size`."""

    eps: float
    norm: str = "l2"
    steps: int = DEFAULT_STEPS
    step_size: float | None = None
    random_start: bool = True
    use_best: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        check_attack(self.eps, self.norm, self.steps, self.step_size)

    @property
    def step(self) -> float:
        return self.step_size if self.step_size is not None else default_step_size(self.eps, self.steps)

    def settings(self) -> dict:
        """What a checkpoint records (the step size resolved)."""
        return {"eps": self.eps, "norm": self.norm, "steps": self.steps, "step_size": self.step,
                "random_start": self.random_start, "use_best": self.use_best, "space": "pixels [0, 1]"}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        pixels = (x.detach().float() * std + mean).clamp(0.0, 1.0)
        was_training = model.training
        model.eval()
        try:
            adv = pgd_attack(InputNormalize(model, self.mean, self.std), pixels, y.to(x.device), self.eps,
                             self.norm, self.steps, self.step, random_start=self.random_start,
                             use_best=self.use_best, generator=generator)
        finally:
            model.train(was_training)
        out = ((adv - mean) / std).to(x.dtype)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out
