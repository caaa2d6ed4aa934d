"""domain-cls: a source-vs-target classifier on embeddings; score = its logit for "target".

Training draws every batch half from the source and half from the target (with replacement
from the smaller side), so a target of a few hundred images weighs as much as a pool of a
million. Features are standardised with statistics of the union, estimated on a seeded random
sample of at most 100k rows of each side (not the first rows: a pool stored class by class
would otherwise be standardised on its first classes). With ``folds > 1`` the
source is split and each part is scored by a classifier that never saw it (cross-fitting),
so that a flexible model (``model="mlp"``) cannot score source images by having memorised
them.
"""

from __future__ import annotations

import numpy as np

from filterx.math.blocks import BLOCK, row_blocks, sample_rows
from filterx.scorers import Option, ScoreInputs, ScoreResult, register_scorer

MODELS = ("linear", "mlp")
STATS_ROWS = 100_000  # rows of each side the standardisation statistics are estimated on


def standardisation(source: np.ndarray, target: np.ndarray, seed: int,
                    max_rows: int = STATS_ROWS, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), std (D,)) float32 of the union of a seeded sample of each side (of
    ``source[rows]`` when ``rows`` is given)."""
    rng = np.random.default_rng(seed)
    both = np.concatenate([sample_rows(source, max_rows, rng, rows=rows), sample_rows(target, max_rows, rng)])
    return both.mean(0), both.std(0) + 1e-6


def train_domain_classifier(source: np.ndarray, target: np.ndarray, *, model: str = "linear",
                            hidden: int = 256, steps: int = 500, batch_size: int = 512,
                            lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
                            device: str = "cpu", rows: np.ndarray | None = None):
    """Train a balanced binary classifier (target = 1) on (Ns, D) source and (Nt, D) target rows
    (any float dtype; only ``source[rows]`` when ``rows``, sorted int64, is given: a fold is
    never copied out of the pool, each batch gathers its own rows).

    Returns (module, mean, std): apply as ``module((x - mean) / std)`` -> (B,) target logits.
    """
    import torch
    import torch.nn as nn

    if model not in MODELS:
        raise ValueError(f"unknown domain classifier {model!r}; valid: {', '.join(MODELS)}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mean, std = (torch.from_numpy(a).to(device) for a in standardisation(source, target, seed, rows=rows))
    n_source = len(source) if rows is None else len(rows)
    d = source.shape[1]
    net = nn.Linear(d, 1) if model == "linear" else nn.Sequential(
        nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 1))
    net = net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    half = max(1, batch_size // 2)
    y = torch.cat([torch.zeros(half), torch.ones(half)]).to(device)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(steps):
        si = torch.randint(0, n_source, (half,), generator=gen).numpy()
        si = si if rows is None else rows[si]
        ti = torch.randint(0, len(target), (half,), generator=gen).numpy()
        x = torch.from_numpy(np.concatenate([source[si], target[ti]]).astype(np.float32)).to(device)
        loss = loss_fn(net((x - mean) / std).squeeze(1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval(), mean, std


def domain_logits(net, mean, std, x: np.ndarray, *, device: str = "cpu", block: int = BLOCK,
                  rows: np.ndarray | None = None) -> np.ndarray:
    """(N,) float32 target logits of a trained domain classifier for the rows of ``x`` (any
    float dtype; only ``x[rows]``, in that order, when ``rows`` is given), in row blocks."""
    import torch

    out = np.empty(len(x) if rows is None else len(rows), dtype=np.float32)
    with torch.inference_mode():
        for i, xb in row_blocks(x, block, rows=rows, desc="domain-cls: score"):
            xb = torch.from_numpy(xb).to(device)
            out[i : i + len(xb)] = net((xb - mean) / std).squeeze(1).cpu().numpy()
    return out


@register_scorer("domain-cls", needs=("source_emb", "target_emb"), choose_by=("on", "embeddings"), options={
    "on": Option("what the classifier reads: the encoder's embeddings (fast) or the images' pixels (a CNN "
                 "trained from scratch, filterx.scorers.domain_pixels)"),
    "model": Option("classifier on the embeddings", choices=MODELS),
    "folds": Option("cross-fitting folds", min=1)})
def domain_scores(inputs: ScoreInputs, *, seed: int, model: str = "linear", hidden: int = 256,
                  steps: int = 500, batch_size: int = 512, lr: float = 1e-3,
                  weight_decay: float = 1e-4, folds: int = 1) -> ScoreResult:
    """Logit of "target" from a balanced source-vs-target classifier on embeddings."""
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    source, target = inputs.source_emb, inputs.target_emb
    kw = dict(model=model, hidden=hidden, steps=steps, batch_size=batch_size, lr=lr,
              weight_decay=weight_decay, device=inputs.device)
    scores = np.empty(len(source), dtype=np.float32)
    fold_of = np.random.default_rng(seed).integers(0, folds, len(source)) if folds > 1 else np.zeros(len(source), int)
    for f in range(folds):
        # index arrays, not copies: a fold of a 1.28M pool would be a gigabyte
        train = np.flatnonzero(fold_of != f) if folds > 1 else None
        net, mean, std = train_domain_classifier(source, target, seed=seed + f, rows=train, **kw)
        rows = np.flatnonzero(fold_of == f)
        scores[rows] = domain_logits(net, mean, std, source, device=inputs.device, rows=rows)
    target_logits = domain_logits(net, mean, std, target, device=inputs.device)
    return ScoreResult(scores, attrs={"mean_target_logit": float(target_logits.mean()),
                                      "mean_source_logit": float(scores.mean())})
