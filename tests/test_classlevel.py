import numpy as np
import pytest
import torch

from filterx.io.classes import class_info_for_folders, imagenet_classes
from filterx.scorers import ScoreInputs, list_scorers, run_scorer
from filterx.scorers.classlevel import (
    MASKED_SCORE,
    KEPT_SCORE,
    class_mask_scores,
    hardest_classes,
    per_class_accuracy,
    random_control_classes,
    stratified_holdout,
)

# A small "ImageNet" pool: 40 real classes, 5 images each, except one empty class, plus 3
# unlabelled images.
POOL_WNIDS = [c.wnid for c in imagenet_classes()[500:540]]  # 504 coffee mug, 508 keyboard, ...
EMPTY_CLASS = 7


@pytest.fixture(scope="module")
def pool():
    classes = class_info_for_folders(POOL_WNIDS)
    labels = np.repeat(np.arange(len(classes)), 5)
    labels = labels[labels != EMPTY_CLASS]
    labels = np.concatenate([labels, [-1, -1, -1]])
    labels = np.random.default_rng(0).permutation(labels).astype(np.int64)
    return ScoreInputs(num_source=len(labels), source_labels=labels, source_classes=classes)


def test_per_class_accuracy_on_hand_made_predictions():
    labels = np.array([0, 0, 1, 1, 1, 3, -1])
    preds = np.array([0, 1, 1, 1, 0, 0, 2])
    acc = per_class_accuracy(labels, preds, 4)
    np.testing.assert_allclose(acc, [0.5, 2 / 3, np.nan, 0.0])
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        per_class_accuracy(np.array([4]), np.array([0]), 4)


def test_hardest_classes_breaks_ties_by_index_and_skips_nan():
    acc = np.array([0.5, 0.2, np.nan, 0.2, 0.9])
    assert hardest_classes(acc, 2).tolist() == [1, 3]
    assert hardest_classes(acc, 4).tolist() == [1, 3, 0, 4]
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        hardest_classes(acc, 5)
    with pytest.raises(ValueError):
        hardest_classes(acc, 0)


def test_stratified_holdout_splits_each_class_and_is_seeded():
    labels = np.array([0] * 20 + [1] * 2 + [2] * 1 + [-1] * 3 + [3] * 31)
    train, val = stratified_holdout(labels, 5, 0.1, seed=0)
    assert np.intersect1d(train, val).size == 0
    assert np.union1d(train, val).tolist() == np.flatnonzero(labels >= 0).tolist()
    assert np.bincount(labels[val], minlength=5).tolist() == [2, 1, 0, 3, 0]
    again, _ = stratified_holdout(labels, 5, 0.1, seed=0)
    other, _ = stratified_holdout(labels, 5, 0.1, seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    with pytest.raises(ValueError, match="holdout"):
        stratified_holdout(labels, 5, 1.0, seed=0)


def test_one_stratified_split_serves_every_caller():
    from filterx.math.splits import stratified_split

    labels = np.array([0] * 20 + [1] * 2 + [2] * 1 + [-1] * 3 + [3] * 31)
    assert all(np.array_equal(a, b) for a, b in zip(stratified_holdout(labels, 5, 0.1, seed=4),
                                                    stratified_split(labels, 0.1, 4)))
    # a class of one image only trains, whatever the fraction (above 0.5 it rounds to 1)
    train, val = stratified_split(np.array([0, 1, 1, 1]), 0.6, 0)
    assert 0 in train and 0 not in val and len(val) == 2
    assert stratified_split(np.array([-1, -1]), 0.2, 0)[0].size == 0


def test_class_mask_scores_leave_unknown_labels_kept():
    scores = class_mask_scores(np.array([0, 1, -1, 2, 1]), np.array([1]))
    assert scores.dtype == np.float32
    assert scores.tolist() == [KEPT_SCORE, MASKED_SCORE, KEPT_SCORE, KEPT_SCORE, MASKED_SCORE]


def test_class_mask_ranks_every_masked_image_below_every_kept_one(pool):
    assert {"class-mask", "hard-classes"} <= set(list_scorers())
    out = run_scorer("class-mask", pool, classes="coffee mug, n03085013")
    labels = pool.source_labels
    masked = np.isin(labels, [4, 8]) & (labels >= 0)  # 504 coffee mug, 508 computer keyboard
    assert out.scores[masked].max() < out.scores[~masked].min()
    kept = int((~masked).sum())
    top = np.argsort(-out.scores, kind="stable")[:kept]
    assert not masked[top].any()
    assert out.attrs["masked_wnids"] == ["n03063599", "n03085013"]
    assert out.attrs["num_masked_images"] == 10 and out.attrs["num_kept_images"] == kept
    # "crossword puzzle" is class 918, not in this pool: an unknown name, not a silent no-op.
    with pytest.raises(ValueError, match="crossword puzzle"):
        run_scorer("class-mask", pool, classes="coffee mug, crossword puzzle")


def test_class_mask_table_and_empty_class(pool):
    empty = pool.source_classes[EMPTY_CLASS]
    out = run_scorer("class-mask", pool, classes=f"coffee mug,{empty.wnid}")
    assert out.tables["masked_classes"] == [
        {"class_index": 4, "wnid": "n03063599", "name": "coffee mug", "n_images": 5,
         "entry": "coffee mug"},
        {"class_index": EMPTY_CLASS, "wnid": empty.wnid, "name": empty.name, "n_images": 0,
         "entry": empty.wnid},
    ]
    assert (out.scores == MASKED_SCORE).sum() == 5


def test_class_mask_needs_classes(pool):
    with pytest.raises(ValueError, match="class-mask needs classes"):
        run_scorer("class-mask", pool)
    with pytest.raises(ValueError, match="exact, substring"):
        run_scorer("class-mask", pool, classes="coffee mug", match="regex")


def test_random_control_same_size_outside_named_set_and_seeded(pool):
    spec = "coffee mug, computer keyboard, n03042490"  # classes 504, 508, 500 (cliff dwelling)
    named = run_scorer("class-mask", pool, classes=spec)
    draws = [
        run_scorer("class-mask", pool, seed=s, classes=spec, random_control=True) for s in range(4)
    ]
    sets = [tuple(d.attrs["masked_indices"]) for d in draws]
    for d, s in zip(draws, sets):
        assert len(s) == named.attrs["num_masked_classes"] == 3
        assert not set(s) & set(named.attrs["masked_indices"])
        assert EMPTY_CLASS not in s  # only classes that have images are drawn
        assert d.attrs["named_wnids"] == named.attrs["masked_wnids"]
        assert (d.scores == MASKED_SCORE).sum() == 15
    again = run_scorer("class-mask", pool, seed=0, classes=spec, random_control=True)
    assert again.attrs["masked_indices"] == list(sets[0])
    assert np.array_equal(again.scores, draws[0].scores)
    assert len(set(sets)) > 1


def test_random_control_classes_refuses_when_too_few_remain():
    counts = np.array([3, 0, 2, 1])
    assert random_control_classes(counts, np.array([0]), 2, seed=0).tolist() == [2, 3]
    with pytest.raises(ValueError, match="only 2"):
        random_control_classes(counts, np.array([0]), 3, seed=0)


def _overlap_problem(seed=0):
    """8 classes in 16-D: classes 0-2 share one mean (chance level among them, ~1/3), the
    others are far apart (accuracy 1)."""
    rng = np.random.default_rng(seed)
    means = np.zeros((8, 16))
    for c in range(3, 8):
        means[c, c] = 12.0
    labels = np.repeat(np.arange(8), 60)
    emb = (means[labels] + rng.normal(size=(len(labels), 16))).astype(np.float32)
    classes = class_info_for_folders([f"class{c}" for c in range(8)])
    return ScoreInputs(
        num_source=len(labels), source_emb=emb, source_labels=labels, source_classes=classes
    )


def test_hard_classes_picks_the_overlapping_classes(one_thread):
    inputs = _overlap_problem()
    out = run_scorer("hard-classes", inputs, seed=0, count=3)
    assert sorted(out.attrs["hard_indices"]) == [0, 1, 2]
    assert out.attrs["masked_indices"] == [0, 1, 2]
    table = out.tables["per_class_accuracy"]
    assert [r["removed"] for r in table] == [True] * 3 + [False] * 5
    assert all(r["n_val"] == 6 for r in table)
    assert [r["accuracy"] for r in table[3:]] == [1.0] * 5
    assert max(r["accuracy"] for r in table[:3]) < 0.9
    masked = inputs.source_labels < 3
    assert out.scores[masked].max() < out.scores[~masked].min()
    assert out.attrs["num_train"] == 8 * 54 and out.attrs["num_val"] == 8 * 6


def test_hard_classes_random_control_avoids_the_hard_set(one_thread):
    inputs = _overlap_problem()
    a = run_scorer("hard-classes", inputs, seed=0, count=3, random_control=True)
    b = run_scorer("hard-classes", inputs, seed=0, count=3, random_control=True)
    assert a.attrs["masked_indices"] == b.attrs["masked_indices"]
    assert len(a.attrs["masked_indices"]) == 3
    assert set(a.attrs["masked_indices"]) <= {3, 4, 5, 6, 7}
    assert sorted(a.attrs["hard_indices"]) == [0, 1, 2]
    assert (a.scores == MASKED_SCORE).sum() == 3 * 60


@pytest.mark.parametrize("count", [0, 8, -1])
def test_hard_classes_count_bounds(count):
    with pytest.raises(ValueError, match=r"count must lie in \[1, 7\]"):
        run_scorer("hard-classes", _overlap_problem(), count=count)


def test_random_control_draws_only_from_classes_outside_the_named_set(pool):
    # Naming classes 0-19 (class 7 has no image: 19 removed) leaves 20 classes with images
    # (20-39), so a control drawn from the complement must be 19 of those; a draw from all
    # classes would almost surely overlap.
    spec = ",".join(POOL_WNIDS[:20])
    out = run_scorer("class-mask", pool, seed=3, classes=spec, random_control=True)
    assert len(out.attrs["masked_indices"]) == 19 and set(out.attrs["masked_indices"]) < set(range(20, 40))
    assert [r["entry"] for r in out.tables["masked_classes"]] == ["random control"] * 19


def test_random_control_removes_as_many_classes_as_the_named_ones_with_images(pool):
    # A named class with no image removes nothing, so the control must not draw one for it.
    empty = pool.source_classes[EMPTY_CLASS].wnid
    spec = f"coffee mug, computer keyboard, {empty}"
    named = run_scorer("class-mask", pool, classes=spec)
    assert (named.scores == MASKED_SCORE).sum() == 10 and named.attrs["num_masked_images"] == 10
    for seed in range(5):
        control = run_scorer("class-mask", pool, seed=seed, classes=spec, random_control=True)
        masked = control.attrs["masked_indices"]
        assert len(masked) == 2 and not set(masked) & {4, 8, EMPTY_CLASS}
        assert (control.scores == MASKED_SCORE).sum() == 10 and control.attrs["num_masked_images"] == 10
    # only named classes without images: the treatment removes nothing, and so does its control
    nothing = run_scorer("class-mask", pool, seed=0, classes=empty, random_control=True)
    assert nothing.attrs["masked_indices"] == [] and (nothing.scores == KEPT_SCORE).all()
