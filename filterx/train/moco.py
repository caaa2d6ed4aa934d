"""MoCo v2: the contrastive objective filterx's self-supervised pre-training and encoders use.

He et al. 2020 (MoCo) with Chen et al. 2020's improvements (MoCo v2), as in the authors' code
base (facebookresearch/moco):

- a query encoder (backbone + MLP projection head D -> D -> 128 with a ReLU; D is the
  backbone's feature width, 2048 for ResNet-50) trained by SGD, and a key encoder of the same
  shape that is its exponential moving average, ``k <- m k + (1 - m) q`` with m = 0.999;
- a queue of K negative keys (default 65536; :func:`default_queue_size` shrinks it for small
  datasets), the keys of the latest steps, L2-normalised, gathered over all ranks;
- InfoNCE: for query q with positive key k+, ``-log exp(q.k+ / T) / (exp(q.k+ / T) +
  sum_queue exp(q.n / T))`` with T = 0.2, i.e. cross-entropy with the positive at index 0;
- shuffled BatchNorm (the code base's choice; no SyncBN): the key batch is permuted across
  all ranks before the key encoder and restored after, so a query and its key are never
  normalised with the same batch statistics (otherwise the network can match them through
  the statistics). BatchNorm runs over groups of at most ``bn_group`` images (32: the
  code base's 256 images over 8 GPUs); in one process that means splitting the batch, as the
  authors' single-GPU demo does with its SplitBatchNorm. The permutation comes from a
  generator seeded the same on every rank, so no broadcast is needed.

The queue may hold any K >= the global batch: keys are written at ``ptr .. ptr + B`` modulo
K (the code base asks K to be a multiple of B; with one this is the same thing).

    moco = MoCo(backbone, 2048)                  # a ResNet-50 with fc = Identity
    loss, hit = moco.step(moco.query, q_view, k_view, generator)   # keys enqueued
    loss.backward(); opt.step()                  # opt over moco.query.parameters()
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from filterx.core import collectives

QUEUE_SIZE = 65536
MOMENTUM = 0.999
TEMPERATURE = 0.2
PROJECTION_DIM = 128
BN_GROUP = 32


def default_queue_size(num_images: int, global_batch: int, limit: int = QUEUE_SIZE) -> int:
    """MoCo's 65536 negatives, or for a dataset under 131072 images the largest power of two
    up to half of it (at least one global batch): a queue as large as the dataset would hold
    an image's own older keys as its negatives."""
    if num_images >= 2 * limit:
        return limit
    half = max(1, num_images // 2)
    return max(int(global_batch), 2 ** int(math.floor(math.log2(half))))


def projection_head(feature_dim: int, out_dim: int = PROJECTION_DIM) -> nn.Sequential:
    """MoCo v2's MLP head: Linear(D, D) -> ReLU -> Linear(D, out_dim)."""
    return nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, out_dim))


class GroupedBN(nn.Module):
    """``module`` applied to a batch in groups of at most ``group`` images (at least two
    each), so that its BatchNorm layers see per-group statistics; one call, so that DDP sees a
    single forward."""

    def __init__(self, module: nn.Module, group: int) -> None:
        super().__init__()
        self.module = module
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = bn_groups(len(x), self.group)
        if parts == 1:
            return self.module(x)
        return torch.cat([self.module(c) for c in torch.tensor_split(x, parts)])


def bn_groups(n: int, group: int) -> int:
    """How many groups a batch of ``n`` is normalised in: ceil(n / group), each of >= 2 images."""
    return max(1, min(math.ceil(n / max(1, group)), n // 2))


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean InfoNCE loss, (B,) bool: the positive scored highest) for normalised queries
    ``q`` (B, d), their positive keys ``k`` (B, d) and the negatives ``queue`` (d, K)."""
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue
    logits = torch.cat([l_pos, l_neg], 1) / temperature
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels), logits.argmax(1) == 0


class MoCo(nn.Module):
    """Query encoder ``query`` (backbone + head; the one the optimiser trains), key encoder
    ``key`` (its moving average, no gradients), and the queue of negatives (d, K) with its
    write pointer, all in the state dict (so a checkpoint resumes exactly).

    ``backbone`` maps (B, 3, R, R) images to (B, feature_dim) features (a ResNet with ``fc``
    replaced by Identity)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, *, dim: int = PROJECTION_DIM,
                 queue_size: int = QUEUE_SIZE, momentum: float = MOMENTUM, temperature: float = TEMPERATURE,
                 bn_group: int = BN_GROUP) -> None:
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"queue size must be >= 1, got {queue_size}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"key encoder momentum must be in [0, 1), got {momentum}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.momentum, self.temperature, self.bn_group = momentum, temperature, bn_group
        self.query = nn.Sequential(OrderedDict(backbone=backbone, head=projection_head(feature_dim, dim)))
        self.key = copy.deepcopy(self.query)
        for p in self.key.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def backbone_state(self) -> dict:
        """The query backbone's weights (CPU tensors), keys as in the backbone's own state dict."""
        return {k: v.detach().cpu() for k, v in self.query.backbone.state_dict().items()}

    @torch.no_grad()
    def momentum_update(self) -> None:
        for pq, pk in zip(self.query.parameters(), self.key.parameters()):
            pk.mul_(self.momentum).add_(pq.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (n, d) into the queue at the pointer, wrapping around; n <= K."""
        size = self.queue.shape[1]
        n = keys.shape[0]
        if n > size:
            raise ValueError(f"a step's {n} keys do not fit a queue of {size}; use a queue of at least "
                             "the global batch")
        idx = (int(self.queue_ptr) + torch.arange(n, device=self.queue.device)) % size
        self.queue[:, idx] = keys.detach().to(self.queue.dtype).T
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % size)

    @torch.no_grad()
    def keys(self, im_k: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's keys (B, d) in its images' order, every rank's keys (B x ranks, d) in
        rank order) from the key encoder with shuffled BatchNorm."""
        key = GroupedBN(self.key, self.bn_group)
        if not collectives.is_distributed():
            perm = torch.randperm(len(im_k), generator=gen).to(im_k.device)
            k = torch.empty((len(im_k), self.queue.shape[0]), dtype=torch.float32, device=im_k.device)
            k[perm] = F.normalize(key(im_k[perm]).float(), dim=1)
            return k, k
        import torch.distributed as dist

        rank = dist.get_rank()
        everything = collectives.all_gather_cat(im_k)
        n = len(im_k)
        perm = torch.randperm(len(everything), generator=gen).to(im_k.device)
        mine = perm[rank * n : (rank + 1) * n]
        k_mine = F.normalize(key(everything[mine]).float(), dim=1)
        gathered = collectives.all_gather_cat(k_mine)  # keys of the images perm[0 .. B x ranks)
        k_all = torch.empty_like(gathered)
        k_all[perm] = gathered
        return k_all[rank * n : (rank + 1) * n], k_all

    def step(self, query: nn.Module, im_q: torch.Tensor, im_k: torch.Tensor,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss with its graph, (B,) bool positive ranked first) for one batch of view pairs.

        ``query`` is ``self.query`` wrapped for training (GroupedBN, DDP). As the code base
        does: queries first, then the key encoder's momentum update and the keys, the loss
        against the queue as it was, then this step's keys (all ranks') enqueued."""
        q = F.normalize(query(im_q).float(), dim=1)
        self.momentum_update()
        k, k_all = self.keys(im_k, gen)
        loss, hit = info_nce(q, k, self.queue.clone(), self.temperature)
        self.enqueue(k_all)
        return loss, hit
