"""entropy: the target classifier's uncertainty on each source image.

``order="high"`` keeps the images the target classifier is least sure of (active learning);
``order="low"`` keeps the ones it is most sure of (inverse active learning).

"Most sure" is not "most like the target": a classifier that has seen only the target's
classes is often surest of images far from all of them (a linear head's logits grow along
directions the target never constrained). On the selection benchmark's pools (bench
``selection``) ``low`` kept fewer relevant images than random with both encoders, and ``high``
more; use a distance or domain method to find target-like images.
"""

from __future__ import annotations

import numpy as np

from filterx.scorers import Option, ScoreInputs, register_scorer

ORDERS = ("high", "low")


def head_logits(emb: np.ndarray, weight: np.ndarray, bias: np.ndarray, *, device: str = "cpu",
                block: int = 65536):
    """Yield (start, logits (b, C) float32 torch tensor) of the linear head, in row blocks."""
    import torch

    w = torch.from_numpy(np.asarray(weight, dtype=np.float32)).to(device)
    b = torch.from_numpy(np.asarray(bias, dtype=np.float32)).to(device)
    for i in range(0, len(emb), block):
        x = torch.from_numpy(np.ascontiguousarray(emb[i : i + block], dtype=np.float32)).to(device)
        yield i, torch.addmm(b, x, w.T)


@register_scorer("entropy", needs=("source_emb", "head_weight", "head_bias"), options={
    "order": Option("keep high (active learning) or low entropy first; low keeps what the head is surest of, "
                    "which is not the same as target-like (README: selection quality)", choices=ORDERS)})
def entropy_scores(inputs: ScoreInputs, *, seed: int, order: str = "high") -> np.ndarray:
    """Prediction entropy (nats) of the target classifier; negated for order="low"."""
    from filterx.kernels import softmax_stats

    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; valid: {', '.join(ORDERS)}")
    out = np.empty(inputs.num_source, dtype=np.float32)
    for i, logits in head_logits(inputs.source_emb, inputs.head_weight, inputs.head_bias, device=inputs.device):
        ent, _, _ = softmax_stats(logits)
        out[i : i + len(logits)] = ent.cpu().numpy()
    return out if order == "high" else -out
