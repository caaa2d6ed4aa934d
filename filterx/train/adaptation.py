"""Domain adaptation for finetune: DANN's gradient reversal and domain classifier (Ganin &
Lempitsky 2015), pseudo-labels, and the loss of one step of each method."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from filterx.models.archs import features_and_logits
from filterx.train.common import labelled_cross_entropy
from filterx.train.evaluation import topk_correct


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by ``-lam`` on the way back."""
    return _GradientReversal.apply(x, lam)


def dann_lambda(progress: float) -> float:
    """Ganin & Lempitsky's reversal coefficient 2 / (1 + exp(-10 p)) - 1: 0 at the start, -> 1."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


class DomainClassifier(nn.Module):
    """features (B, D) -> domain logit (B, 1) ("labelled domain" = 1): the DANN paper's MLP,
    D -> hidden -> hidden -> 1 with ReLU and dropout 0.5, Caffe's N(0, 0.01) / N(0, 0.3) init."""

    def __init__(self, dim: int, hidden: int = 1024) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                    nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                    nn.Linear(hidden, 1))
        for m, std in zip(self.layers[::3], (0.01, 0.01, 0.3)):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.layers(feats)


def pseudo_label_loss(logits_u: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mask (B,) bool) for unlabelled logits (B, C): cross-entropy towards the argmax of
    the rows whose max softmax is >= ``threshold``, summed and divided by B (FixMatch's
    normalisation: the weight of the term grows with the share of confident images). Exactly 0,
    with zero gradient, when no row is confident."""
    with torch.no_grad():
        conf, pred = F.softmax(logits_u.float(), dim=1).max(dim=1)
        mask = conf >= threshold
    per = F.cross_entropy(logits_u.float(), pred, reduction="none")
    return (per * mask.to(per.dtype)).sum() / max(1, len(logits_u)), mask


class FinetuneNet(nn.Module):
    """The classifier and, for DANN, its domain classifier, as one module for DDP.

    ``forward(x_s, x_u=None, grl_lambda=0.)`` -> (logits (Bs + Bu, C), domain logits
    (Bs + Bu, 1) or None): labelled and unlabelled images go through the network together.
    """

    def __init__(self, net: nn.Module, domain: nn.Module | None = None) -> None:
        super().__init__()
        self.net, self.domain = net, domain

    def forward(self, x_s: torch.Tensor, x_u: torch.Tensor | None = None, grl_lambda: float = 0.0):
        x = x_s if x_u is None else torch.cat([x_s, x_u])
        if self.domain is None:
            return self.net(x), None
        feats, logits = features_and_logits(self.net, x)
        return logits, self.domain(grad_reverse(feats, grl_lambda))


def finetune_loss(logits: torch.Tensor, domain_logits: torch.Tensor | None, labels: torch.Tensor, *,
                  method: str, pseudo_threshold: float = 0.95, pseudo_weight: float = 1.0,
                  label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """(loss, sums for the epoch's statistics) of one step. The first ``len(labels)`` rows of
    ``logits`` are the labelled batch, the rest the unlabelled one."""
    n_s = len(labels)
    logits = logits.float()
    ce = labelled_cross_entropy(logits[:n_s], labels, label_smoothing)
    keep = labels >= 0
    with torch.no_grad():
        stats = {"n": torch.tensor(float(n_s), device=logits.device), "labelled": keep.sum().double(),
                 "ce": ce.detach().double() * keep.sum(),
                 "top1": topk_correct(logits[:n_s][keep], labels[keep], 1).sum().double()}
    loss = ce
    if method == "pseudo-label":
        loss_u, mask = pseudo_label_loss(logits[n_s:], pseudo_threshold)
        loss = ce + pseudo_weight * loss_u
        stats["unlabeled"] = torch.tensor(float(len(mask)), device=logits.device)
        stats["pseudo_kept"] = mask.sum().double()
    elif method == "dann":
        d = domain_logits.float().squeeze(1)
        d_label = torch.cat([torch.ones(n_s), torch.zeros(len(d) - n_s)]).to(d.device)
        loss_d = F.binary_cross_entropy_with_logits(d, d_label)
        loss = ce + loss_d
        stats["domain_loss"] = loss_d.detach().double() * n_s
        stats["domain_correct"] = ((d > 0) == (d_label > 0.5)).sum().double()
        stats["domain_n"] = torch.tensor(float(len(d)), device=d.device)
    stats["loss"] = loss.detach().double() * n_s
    return loss, stats
