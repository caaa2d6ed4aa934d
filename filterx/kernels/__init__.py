"""Hot loops torch does not fuse, each as a Triton kernel with a plain-torch twin.

Public functions dispatch on ``impl="auto" | "triton" | "torch"``: ``"auto"`` runs the
Triton kernel on CUDA tensors and the torch twin everywhere else (the CPU path, kept fast
with blocked matmuls under a bounded memory budget). ``"triton"`` on CPU tensors runs
Triton's interpreter and needs ``TRITON_INTERPRET=1`` in the environment before ``triton``
is first imported (slow; for tests). The ``*_torch`` / ``*_triton`` twins take the same
arguments plus an optional ``out=`` of preallocated outputs.

- :func:`nearest_centroid` -- min / mean squared distance to K centroids and the argmin.
- :func:`softmax_stats` -- entropy, max probability and top-2 margin of softmax(logits).
- :func:`head_influence` -- per-sample linear-head gradient dotted with s_test.

Importing this package does not import triton.
"""

from .head_influence import head_influence, head_influence_torch, head_influence_triton
from .nearest_centroid import nearest_centroid, nearest_centroid_torch, nearest_centroid_triton
from .softmax_stats import softmax_stats, softmax_stats_torch, softmax_stats_triton

__all__ = [
    "head_influence",
    "head_influence_torch",
    "head_influence_triton",
    "nearest_centroid",
    "nearest_centroid_torch",
    "nearest_centroid_triton",
    "softmax_stats",
    "softmax_stats_torch",
    "softmax_stats_triton",
]
