"""The baseline every method is compared against."""

from __future__ import annotations

import numpy as np

from filterx.scorers import ScoreInputs, register_scorer


@register_scorer("random", needs=())
def random_scores(inputs: ScoreInputs, *, seed: int) -> np.ndarray:
    """Uniform random scores in [0, 1): a random subset of any size, reproducible by seed."""
    return np.random.default_rng(seed).random(inputs.num_source, dtype=np.float64).astype(np.float32)
