"""The selection benchmark's pools (a known relevant part at three difficulties) and its plain
references (scikit-learn on 16x16 pixels, cross-fitted).

Every pool is drawn by ``filterx.io.sampledata.make_sample_data`` with one seed, so pools and
target share the seed's split of the handwritten digits: the pool's digits come from one half
of each class, the target's from the other, and no glyph is in both. The target (made once,
shared by the three pools) is the demo's: digits 0-4 "photographed by another camera".
Distractors in every pool: crops of the 10 scikit-image photos and the 10 procedural textures.

- ``easy``: the relevant part is digits 0-4 drawn like the target (``digit_style="camera"``);
- ``medium``: digits 0-4 drawn in another style (the pool's dark ink on light paper);
- ``hard``: the demo's case: digits 0-9 on paper, of which 0-4 are relevant; 5-9 are their
  neighbours in the same domain.

The digit classes have ``digits_per_class`` images (half of ``per_class``), so the relevant
part is 10-11 % of each pool: a 6 % budget can be all relevant, a 12 % one nearly so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from filterx.io.sampledata import TARGET_DIGITS

POOLS: dict[str, dict] = {
    "easy": {"digit_style": "camera", "pool_digits": TARGET_DIGITS},
    "medium": {"digit_style": "paper", "pool_digits": TARGET_DIGITS},
    "hard": {"digit_style": "paper", "pool_digits": tuple(range(10))},
}
PIXELS = 16  # reference features: 16x16 RGB, 768 values
REFERENCE_FOLDS = 5
REFERENCE_K = 50  # k-means clusters over the target's pixels: the demo's clustering k


def make_pool(out: Path, pool: str, *, per_class: int, digits_per_class: int, seed: int) -> Path:
    """Write pool ``pool`` as an ImageFolder tree; returns ``out/source``."""
    from filterx.io.sampledata import make_sample_data

    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; valid: {', '.join(POOLS)}")
    data = make_sample_data(out, per_class=per_class, target_per_class=0, seed=seed,
                            digits_per_class=digits_per_class, **POOLS[pool])
    return data.source


def make_target(out: Path, *, target_per_class: int, seed: int) -> Path:
    """Write the shared target (digits 0-4 in the camera style) as an ImageFolder tree."""
    from filterx.io.sampledata import make_sample_data

    return make_sample_data(out, digits=False, photos=0, textures=0, target_per_class=target_per_class,
                            seed=seed).target


def relevant_mask(labels: np.ndarray, class_names: list[str]) -> np.ndarray:
    """(N,) bool: the pool images of the target's classes (``digit_0`` .. ``digit_4``)."""
    relevant = {f"digit_{d}" for d in TARGET_DIGITS}
    hit = np.array([name in relevant for name in class_names] + [False])  # label -1: not relevant
    return hit[np.asarray(labels, dtype=np.int64)]


def pixel_features(paths, size: int = PIXELS) -> np.ndarray:
    """(N, size*size*3) float32 in [0, 1]: each image resized (bilinear) to size x size RGB,
    made RGB as ``filterx shard`` makes it (transparency laid over white)."""
    from PIL import Image

    from filterx.stages.shard import to_rgb

    out = np.empty((len(paths), size * size * 3), dtype=np.float32)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            out[i] = np.asarray(to_rgb(im).resize((size, size), Image.BILINEAR),
                                dtype=np.float32).reshape(-1) / 255.0
    return out


def logistic_scores(pool: np.ndarray, target: np.ndarray, *, folds: int = REFERENCE_FOLDS,
                    seed: int = 0) -> np.ndarray:
    """(N,) float32 cross-fitted logit of "target" for each pool row.

    The pool is cut into ``folds`` seeded parts; each part is scored by a standardised,
    class-balanced L2 logistic regression fitted on the whole target against the other parts,
    so no pool image is scored by a model that saw it.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = np.full(len(pool), np.nan, dtype=np.float32)
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(pool):
        x = np.concatenate([pool[train], target])
        y = np.concatenate([np.zeros(len(train)), np.ones(len(target))])
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000,
                                                                   class_weight="balanced"))
        model.fit(x, y)
        scores[test] = model.decision_function(pool[test])
    return scores


def kmeans_scores(pool: np.ndarray, target: np.ndarray, *, k: int = REFERENCE_K,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """{"min", "avg"}: minus each pool row's nearest / mean Euclidean distance to the k-means
    centroids of the target (fitted on the target only: out-of-sample for the pool)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=min(k, len(target)), n_init=3, random_state=seed).fit(target)
    d = km.transform(pool)  # (N, k) Euclidean distances to the centroids
    return {"min": -d.min(axis=1).astype(np.float32), "avg": -d.mean(axis=1).astype(np.float32)}


def knn_scores(pool: np.ndarray, target: np.ndarray, *, k: int = 10) -> np.ndarray:
    """(N,) float32 minus the mean Euclidean distance to the k nearest target rows."""
    from sklearn.neighbors import NearestNeighbors

    dist, _ = NearestNeighbors(n_neighbors=min(k, len(target))).fit(target).kneighbors(pool)
    return -dist.mean(axis=1).astype(np.float32)


def reference_scores(pool: np.ndarray, target: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Every plain reference on one pool: label -> (N,) float32 scores (higher = keep)."""
    km = kmeans_scores(pool, target, seed=seed)
    return {
        f"logistic target-vs-pool ({REFERENCE_FOLDS} folds)": logistic_scores(pool, target, seed=seed),
        f"k-means min distance (k={REFERENCE_K})": km["min"],
        f"k-means mean distance (k={REFERENCE_K})": km["avg"],
        "k-NN mean distance (k=10)": knn_scores(pool, target),
    }
