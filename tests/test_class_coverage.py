"""Classes only in the target, or only in the pool, through every stage.

The normal case is a pool with many classes the target lacks; the awkward ones are a target
class with no counterpart in the pool, a class every image of which was bad (empty after
shard), a pool class with no scored sample, and a fine-tuning test set whose classes the
training data does not cover. Each must give one clear line and a non-zero exit, or be
counted, reported and handled, never a silently wrong result.

The world (module scope, ~3 s): tiny JPEGs (36 px), sharded by filterx itself.

    pool   (ImageNet wnid folders)   target (its own folder names)
    0 goldfish            6          0 broken    0 (its 2 files are bad)
    1 tabby               6          1 mouse     6
    2 coffee mug          6          2 mug       6
    3 computer keyboard   6          3 stapler   6 (not in the pool, nor in ImageNet)
    4 mouse               6
    5 water bottle        0 (bad files; an @office31 class)
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from clirun import one_line, run as run_cli
from filterx.io.classes import preset_entries
from filterx.io.dataset import Dataset
from filterx.models.encoder import read_encoder_file
from filterx.train.encoder import EncoderConfig, train_encoder
from filterx.stages.score import ScoreConfig, read_scores, score, write_scores
from filterx.stages.shard import ShardConfig, shard

pytestmark = pytest.mark.usefixtures("one_thread")

POOL = {"n01443537": 6, "n02123045": 6, "n03063599": 6, "n03085013": 6, "n03793489": 6, "n04557648": 0}
TARGET = {"broken": 0, "mouse": 6, "mug": 6, "stapler": 6}
GOLDFISH, TABBY, MUG, KEYBOARD, MOUSE, WATER_BOTTLE = range(6)
RUNTIME = dict(backend="pil", device="cpu", workers=0, quiet=True)


class _Records(logging.Handler):
    """Collects the records of the "filterx" loggers (module fixtures cannot use caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self):
        logging.getLogger("filterx").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("filterx").removeHandler(self)


def make_tree(root: Path, classes: dict[str, int], seed: int, size: int = 36) -> Path:
    """An ImageFolder tree: ``classes[name]`` JPEGs per class (a colour per class plus noise);
    a class of 0 gets a corrupt and a zero-byte file only, so shard keeps it empty."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(classes.items()):
        d = root / name
        d.mkdir(parents=True)
        if n == 0:
            (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
            (d / "zero.jpg").write_bytes(b"")
        base = rng.integers(0, 256, 3)
        for i in range(n):
            ramp = (np.arange(size)[:, None, None] * (c + 1) * 3) % 90
            arr = np.clip(base + ramp + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i:02d}.jpg", quality=85)
    return root




@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("coverage")
    out = {"root": root}
    for name, classes, seed in (("pool", POOL, 0), ("target", TARGET, 1)):
        out[f"{name}_shard"] = shard(ShardConfig(make_tree(root / f"{name}_tree", classes, seed), root / name,
                                                 shard_size=10, workers=1, quiet=True))
        out[name] = root / name
    with _Records() as rec:
        out["encoder_summary"] = train_encoder(EncoderConfig(out["target"], root / "encoder.pt", resolution=32,
                                                             epochs=1, batch_size=8, **RUNTIME))
    out["encoder_warnings"] = [r.getMessage() for r in rec.records]
    out["encoder"] = root / "encoder.pt"
    return out


def _score(world, method, **params):
    name = params.pop("name", None)
    return score(ScoreConfig(method, world["pool"], world["target"], world["encoder"], params, name=name, **RUNTIME))


# ---------------------------------------------------------------- (c) shard and train-encoder


def test_shard_keeps_and_reports_a_class_whose_images_are_all_bad(world):
    t = world["target_shard"]
    assert t.empty_classes == ["broken"] and t.num_samples == 18 and t.skipped == 2
    ds = Dataset.open(world["target"])
    assert [c.name for c in ds.classes] == list(TARGET)
    assert np.bincount(ds.labels, minlength=4).tolist() == [0, 6, 6, 6]
    skipped = json.loads((world["target"] / "shard_report.json").read_text())
    assert "broken" in json.dumps(skipped)
    pool = Dataset.open(world["pool"])
    assert world["pool_shard"].empty_classes == ["water bottle"]
    assert pool.classes[WATER_BOTTLE].wnid == "n04557648" and pool.num_samples == 30


def test_encoder_trains_on_the_classes_with_images_and_keeps_the_empty_ones_output(world):
    info = read_encoder_file(world["encoder"])
    # The head has one output per dataset class, so its indices stay the dataset's labels.
    assert info["num_classes"] == 4 and info["state_dict"]["fc.weight"].shape[0] == 4
    assert info["class_names"] == list(TARGET) and info["empty_classes"] == ["broken"]
    labels = Dataset.open(world["target"]).labels
    train, val = np.asarray(info["train_ids"]), np.asarray(info["val_ids"])
    assert len(train) + len(val) == 18 and np.intersect1d(train, val).size == 0
    assert sorted(set(labels[val].tolist())) == [1, 2, 3]  # every class with images is evaluated
    assert (labels[train] > 0).all()
    assert world["encoder_summary"].train_count == len(train)
    assert world["encoder_warnings"] == [
        f"target {world['target']}: 1 of 4 classes have no image and are not trained on (the head keeps "
        "their outputs): broken"
    ]


def test_a_target_left_with_one_class_of_images_is_refused(tmp_path):
    make_tree(tmp_path / "tree", {"all bad": 0, "mug": 4}, seed=2)
    shard(ShardConfig(tmp_path / "tree", tmp_path / "ds", shard_size=10, workers=1, quiet=True))
    code, _, err = run_cli("train-encoder", tmp_path / "ds", tmp_path / "enc.pt", "--epochs", 1, "-q")
    assert code == 2 and "has 1 class(es) with images" in one_line(err)
    assert not (tmp_path / "enc.pt").exists()


# ---------------------------------------------------------------- (a), (b) embedding methods


@pytest.mark.parametrize("method, params", [
    ("clustering", {"k": 3}), ("domain-cls", {}), ("entropy", {}), ("influence", {"solver": "cg"}),
])
def test_embedding_methods_score_every_pool_image_whatever_its_class(world, method, params):
    # The pool has classes the target lacks (goldfish, tabby, keyboard) and the target has one
    # the pool lacks (stapler) and an empty one: these methods use no pool label, so all of
    # the pool is scored, and nothing complains.
    with _Records() as rec:
        summary = _score(world, method, **params)
    assert [r.getMessage() for r in rec.records] == []
    scores, attrs = read_scores(Dataset.open(world["pool"]), method)
    assert summary.scored == 30 and scores.shape == (30,) and np.isfinite(scores).all()
    if method == "entropy":  # over the encoder's 4 outputs, the empty class's included
        # the same numbers as the entropy of the encoder's own head on the stored embeddings,
        # computed here in float64 from its logits
        from filterx.stages.embed import read_embeddings

        info = read_encoder_file(world["encoder"])
        weight = info["state_dict"]["fc.weight"].double().numpy()
        bias = info["state_dict"]["fc.bias"].double().numpy()
        assert weight.shape[0] == 4
        logits = read_embeddings(Dataset.open(world["pool"]), info["tag"]).astype(np.float64) @ weight.T + bias
        logp = logits - logits.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        expected = -(np.exp(logp) * logp).sum(1)
        assert expected.std() > 1e-3 and expected.max() <= math.log(4)  # not a constant: the test can fail
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4)
    if method == "influence":
        assert attrs["result"]["residual"] < 1e-4


def test_outlier_exposure_entropy_scores_every_pool_image_with_an_empty_target_class(world):
    # the refitted heads keep the encoder's 4 outputs, the empty class's included: its logit has
    # no target image, only the decay and the outlier term, and the fit still converges
    with _Records() as rec:
        summary = _score(world, "entropy", head="outlier-exposure", name="entropy-oe")
    assert [r.getMessage() for r in rec.records] == []
    scores, attrs = read_scores(Dataset.open(world["pool"]), "entropy-oe")
    assert summary.scored == 30 and np.isfinite(scores).all()
    assert (scores > 0).all() and scores.max() <= math.log(4) + 1e-5  # entropies over 4 outputs
    assert max(attrs["result"]["lbfgs_grad_norm"]) <= 1e-4


def test_influence_given_labels_on_the_pool_is_one_line(world):
    # Pool labels are pool classes, not the target's: given labels make no sense there.
    code, _, err = run_cli("score", "--method", "influence", "--labels", "given", "--source", world["pool"],
                           "--target", world["target"], "--encoder", world["encoder"], "--backend", "pil",
                           "--device", "cpu", "--workers", 0, "-q")
    assert code == 2 and "pseudo" in one_line(err)


def test_influence_given_labels_is_refused_for_any_pool(world, tmp_path):
    # A pool of 3 classes: its labels 0-2 lie inside the target's 4 classes, so the scorer's
    # range check cannot see that they are pool classes, and scores them as target classes.
    make_tree(tmp_path / "tree", {"n01443537": 3, "n02123045": 3, "n03063599": 3}, seed=3)
    shard(ShardConfig(tmp_path / "tree", tmp_path / "pool3", shard_size=10, workers=1, quiet=True))
    with pytest.raises(ValueError, match="target-train"):
        score(ScoreConfig("influence", tmp_path / "pool3", world["target"], world["encoder"], {"labels": "given"},
                          **RUNTIME))


def test_influence_on_the_empty_target_class_alone_is_refused(world):
    with pytest.raises(ValueError, match=r"none of the .*validation samples is in val_classes \(0,\)"):
        _score(world, "influence", val_classes=(0,), name="influence-empty")


# ---------------------------------------------------------------- (b) class-level methods


def _mask_run(world, *args):
    return run_cli("score", "--method", "class-mask", "--source", world["pool"], "-q", *args)


def test_office31_preset_masks_the_classes_the_pool_has_and_names_the_rest(world):
    code, out, err = _mask_run(world, "--classes", "@office31", "--name", "mask-office")
    assert code == 0, err
    # Of the 47 preset classes the pool holds 4, one of them without an image.
    assert "num_masked_classes=4, num_masked_images=18" in out and "num_absent_entries=43" in out
    assert "n07930864 (cup) -> not in the pool" in out and "\nn03063599 (coffee mug)\n" in out
    assert "no images in the pool (nothing to remove): water bottle" in out
    assert "43 of 47 named classes are not in the pool, skipped: n07930864, " in err
    assert "n04099969 and 33 more (see the match report)" in err
    assert "1 named class(es) have no image in the pool: water bottle" in err
    ds = Dataset.open(world["pool"])
    scores, attrs = read_scores(ds, "mask-office")
    masked = np.isin(ds.labels, [MUG, KEYBOARD, MOUSE])
    assert (scores[masked] == -1).all() and (scores[~masked] == 0).all()
    result = attrs["result"]
    assert len(result["absent_entries"]) == 43 and "n04557648" not in result["absent_entries"]
    assert result["named_without_images"] == ["water bottle"]
    assert result["masked_indices"] == [MUG, KEYBOARD, MOUSE, WATER_BOTTLE]


def test_written_names_the_pool_lacks_are_refused_unless_asked_to_skip(world):
    code, _, err = _mask_run(world, "--classes", "coffee mug, mouse, crossword puzzle", "--name", "mask-x")
    line = one_line(err)
    assert code == 2 and "1 of the 3 classes" in line and "'crossword puzzle' (n06785654)" in line
    assert "-p absent=report" in line and "mask-x" not in " ".join(p.name for p in (world["pool"] / "scores.zarr").iterdir())

    code, out, err = _mask_run(world, "--classes", "coffee mug, mouse, crossword puzzle", "-p", "absent=report",
                               "--name", "mask-x")
    assert code == 0, err
    assert "crossword puzzle -> not in the pool" in out and "num_masked_images=12" in out
    assert "1 of 3 named classes are not in the pool, skipped: crossword puzzle" in err
    ds = Dataset.open(world["pool"])
    scores, attrs = read_scores(ds, "mask-x")
    assert np.array_equal(np.flatnonzero(scores == -1), np.flatnonzero(np.isin(ds.labels, [MUG, MOUSE])))
    assert attrs["result"]["absent_entries"] == ["crossword puzzle"]


@pytest.mark.parametrize("args, needle", [
    # "stapler" is in neither the pool nor ImageNet: most likely a typo, never skipped.
    (["--classes", "coffee mug, stapler", "-p", "absent=report"], "in neither the pool nor ImageNet-1k: 'stapler'"),
    (["--classes", "zebra, crossword puzzle", "-p", "absent=report"], "none of the 2 classes named by"),
    (["--classes", "coffee mug", "-p", "absent=sometimes"], "valid: error, preset, report"),
])
def test_class_specs_that_cannot_mask_what_they_say_are_one_line(world, args, needle):
    code, _, err = _mask_run(world, *args)
    assert code == 2 and needle in one_line(err)


def test_office31_on_a_pool_with_none_of_its_classes_is_one_line(world):
    # The target's own folders ("mouse", "mug") are not the preset's wnids.
    code, _, err = run_cli("score", "--method", "class-mask", "--source", world["target"], "--classes", "@office31",
                           "-q")
    assert code == 2 and "none of the 47 classes named by '@office31' is in the pool (4 classes" in one_line(err)


def test_target_classes_all_in_the_pool_mask_quietly(world):
    code, out, err = _mask_run(world, "--classes", "coffee mug, mouse", "--name", "mask-quiet")
    assert code == 0 and err == ""
    assert "num_absent_entries=0" in out and "not in the pool" not in out and "num_masked_images=12" in out


def test_hard_classes_never_pick_a_pool_class_with_no_image(world):
    summary = _score(world, "hard-classes", count=2)
    hard = summary.attrs["masked_indices"]
    assert len(hard) == 2 and WATER_BOTTLE not in hard
    with open(world["pool"] / "reports" / "scores-hard-classes-per_class_accuracy.csv") as f:
        rows = {int(r["class_index"]): r for r in csv.DictReader(f)}
    assert rows[WATER_BOTTLE]["n_images"] == "0" and rows[WATER_BOTTLE]["n_val"] == "0"
    assert rows[WATER_BOTTLE]["accuracy"] == "" and rows[WATER_BOTTLE]["removed"] == "False"
    assert all(rows[i]["n_val"] == "1" for i in range(5))
    control = _score(world, "hard-classes", count=2, random_control=True, name="hard-control")
    assert set(control.attrs["masked_indices"]) <= set(range(5)) - set(hard)
    # Removing all 5 classes that have images would keep nothing.
    with pytest.raises(ValueError, match=r"count must lie in \[1, 4\]: the pool has 5 classes with images \(of 6\)"):
        _score(world, "hard-classes", count=5, name="hard-all")


# ---------------------------------------------------------------- (d) select and report


@pytest.fixture(scope="module")
def unscored_class(world):
    """Scores "cover" (-id; NaN for every goldfish: a class with no scored sample) and
    "cover-mask" (class-mask-like: -1 for mug, keyboard, mouse; NaN for goldfish)."""
    ds = Dataset.open(world["pool"])
    cover = -np.arange(ds.num_samples, dtype=np.float32)
    cover[ds.labels == GOLDFISH] = np.nan
    mask = np.where(np.isin(ds.labels, [MUG, KEYBOARD, MOUSE]), -1.0, 0.0).astype(np.float32)
    mask[ds.labels == GOLDFISH] = np.nan
    write_scores(ds, "cover", cover, {"method": "test"})
    write_scores(ds, "cover-mask", mask, {"method": "test"})
    return ds


def test_per_class_cap_with_a_class_never_scored_and_an_empty_class(world, unscored_class, tmp_path, caplog):
    from filterx.stages.select import SelectConfig, select

    ds = unscored_class
    with caplog.at_level(logging.WARNING, logger="filterx.stages.select"):
        s = select(SelectConfig(world["pool"], "cover", tmp_path / "cap.jsonl", fraction=0.5, per_class_cap=2))
    assert "--per-class-cap 2 leaves 8 samples, fewer than the 12 the budget asks for" in caplog.text
    ids = [json.loads(line)["id"] for line in (tmp_path / "cap.jsonl").read_text().splitlines()[1:]]
    # 24 scored, a budget of 12, but 4 scored classes x 2 = 8: the lowest 2 ids of each.
    expected = sorted(int(i) for c in (TABBY, MUG, KEYBOARD, MOUSE) for i in np.flatnonzero(ds.labels == c)[:2])
    assert sorted(ids) == expected and s.selected == 8 and s.scored == 24
    # Neither the never-scored goldfish nor the empty water bottle counts as removed.
    assert (s.classes_kept, s.classes_removed, s.images_removed) == (4, 0, 16)

    s = select(SelectConfig(world["pool"], "cover-mask", tmp_path / "keep.npy", threshold=0.0))
    kept = np.load(tmp_path / "keep.npy")
    assert np.array_equal(kept, np.flatnonzero(ds.labels == TABBY))
    assert (s.selected, s.classes_kept, s.classes_removed, s.images_removed) == (6, 1, 3, 18)
    s = select(SelectConfig(world["pool"], "cover-mask", tmp_path / "keep2.npy", threshold=0.0, per_class_cap=2))
    assert np.load(tmp_path / "keep2.npy").tolist() == np.flatnonzero(ds.labels == TABBY)[:2].tolist()


def test_report_counts_classes_never_scored_or_never_selected(world, unscored_class, tmp_path, caplog):
    from filterx.report.page import class_shares, make_report

    ds = unscored_class
    rep = make_report(world["pool"], tmp_path / "rep", methods=["cover", "cover-mask"], fraction=0.5, grid=0,
                      relevant_classes="coffee mug, mouse")
    rows = {r.name: r for r in rep.rows}
    cover, mask = rows["cover"], rows["cover-mask"]
    # cover keeps the 12 lowest scored ids: tabby and mug; keyboard and mouse get none.
    top = np.sort(np.flatnonzero(ds.labels != GOLDFISH))[:12]
    assert (cover.scored, cover.selected) == (24, 12)
    assert (cover.classes_kept, cover.classes_removed) == (len(set(ds.labels[top])), 4 - len(set(ds.labels[top])))
    relevant = np.isin(ds.labels, [MUG, MOUSE])
    assert cover.precision == pytest.approx(relevant[top].mean())
    assert cover.expected_precision == pytest.approx(12 / 24)
    assert (mask.scored, mask.selected, mask.classes_kept, mask.classes_removed) == (24, 12, 2, 2)
    pool_share, sel_share = class_shares(ds.labels[~np.isnan(read_scores(ds, "cover")[0])], ds.labels[top], 6)
    assert pool_share[GOLDFISH] == 0 and pool_share[WATER_BOTTLE] == 0 and sel_share[[KEYBOARD, MOUSE]].sum() == 0
    assert json.loads((tmp_path / "rep" / "report.json").read_text())  # written whole
    # A preset the pool only partly holds: its classes the pool has count, the others are named.
    with caplog.at_level(logging.WARNING, logger="filterx.report.page"):
        part = make_report(world["pool"], tmp_path / "rep2", methods=["cover"], grid=0, relevant_classes="@office31")
    office = {row["wnid"] for row in preset_entries("office31")}
    assert set(part.relevant_classes) == {c.name for c in ds.classes if c.wnid in office}
    assert "of the relevant classes are not in" in caplog.text
    # A name the user wrote for a class the pool lacks is still refused.
    with pytest.raises(ValueError, match="not in the pool"):
        make_report(world["pool"], tmp_path / "rep3", methods=["cover"], grid=0, relevant_classes="coffee mug, laptop")


# ---------------------------------------------------------------- (e) finetune


@pytest.fixture(scope="module")
def ft_data(tmp_path_factory):
    """Fine-tuning sets over classes a, b, c: ``train`` has no image of c (its files are bad),
    ``test`` has 2 images of each, ``test_ab`` none of c, ``test_two`` only folders a and b."""
    root = tmp_path_factory.mktemp("ft")
    out = {}
    for name, classes, seed in (("train", {"a": 4, "b": 4, "c": 0}, 4), ("test", {"a": 2, "b": 2, "c": 2}, 5),
                                ("test_ab", {"a": 2, "b": 2, "c": 0}, 6), ("test_two", {"a": 2, "b": 2}, 7)):
        shard(ShardConfig(make_tree(root / f"{name}_tree", classes, seed, size=32), root / name, shard_size=10,
                          workers=1, quiet=True))
        out[name] = root / name
    return out


def _finetune(ft_data, out, test, caplog):
    from filterx.train.common import MODEL, load_checkpoint
    from filterx.train.finetune import FinetuneConfig, finetune

    with caplog.at_level(logging.WARNING, logger="filterx"):
        summary = finetune(FinetuneConfig(target=ft_data["train"], out=out, test=ft_data[test], arch="resnet18",
                                          epochs=1, batch_size=4, resolution=32, workers=0, device="cpu",
                                          quiet=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return summary.history[-1], load_checkpoint(out / MODEL), warnings


def test_finetune_test_class_the_training_lacks_is_reported_and_counted_wrong(ft_data, tmp_path, caplog):
    row, model, warnings = _finetune(ft_data, tmp_path / "ft", "test", caplog)
    assert model["num_classes"] == 3 and model["model"]["fc.weight"].shape[0] == 3
    assert row["test_count"] == 6
    right = row["test_top1"] * 6
    assert right == pytest.approx(round(right)) and right <= 4  # the 2 images of c cannot be right
    assert warnings == ["2 of the 6 test images are of 1 classes the training data has no image of "
                        "(they count as errors): c"]


def test_finetune_test_without_a_training_class_is_fine(ft_data, tmp_path, caplog):
    row, model, warnings = _finetune(ft_data, tmp_path / "ft", "test_ab", caplog)
    assert row["test_count"] == 4 and 0 <= row["test_top1"] <= 1 and warnings == []


def test_finetune_test_with_other_class_folders_is_one_line(ft_data, tmp_path):
    code, _, err = run_cli("finetune", ft_data["train"], tmp_path / "ft", "--arch", "resnet18",
                           "--test", ft_data["test_two"], "--epochs", 1, "--resolution", 32, "--device", "cpu",
                           "--workers", 0, "-q")
    line = one_line(err)
    assert code == 2 and "classes only in the test data: [], only in the target: ['c']" in line
    assert "shard keeps an empty folder as a class" in line
