"""report: the numbers behind the plots, and a real report on a tiny sharded pool."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from filterx.io.dataset import Dataset
from filterx.report.page import (
    REPORT_MARK, class_shares, display_names, make_report, read_thumbnails, representation_extremes,
    selection_overlap, selection_precision)
from filterx.io.scores import write_scores
from filterx.scorers import ClassInfo
from filterx.stages.select import select_ids


def test_selection_overlap_is_jaccard_of_hand_made_selections():
    sels = [np.array([0, 1, 2, 3]), np.array([5, 4, 3, 2, 2]), np.array([], dtype=np.int64), np.array([], dtype=np.int64),
            np.array([9])]
    j = selection_overlap(sels)
    assert j.shape == (5, 5) and j.dtype == np.float64
    np.testing.assert_allclose(np.diag(j), 1.0)
    assert j[0, 1] == j[1, 0] == pytest.approx(2 / 6)  # {2,3} of {0..5}; the repeated 2 counts once
    assert j[0, 2] == 0.0 and j[2, 3] == 1.0  # empty vs non-empty: 0; two empty: identical
    assert j[0, 4] == 0.0 and j[1, 4] == 0.0
    np.testing.assert_array_equal(j, j.T)


def test_class_shares_hand_made():
    pool = np.array([0, 0, 1, 1, 1, 2, -1])  # -1: unlabelled, in neither share
    pool_share, sel_share = class_shares(pool, np.array([1, 1, 2, -1]), num_classes=4)
    np.testing.assert_allclose(pool_share, [2 / 6, 3 / 6, 1 / 6, 0])
    np.testing.assert_allclose(sel_share, [0, 2 / 3, 1 / 3, 0])
    _, empty = class_shares(pool, np.array([], dtype=np.int64), num_classes=4)
    np.testing.assert_array_equal(empty, 0.0)


def test_representation_extremes_orders_and_trims():
    pool = np.full(10, 0.1)
    sel = np.array([0.3, 0.0, 0.1, 0.2, 0.0, 0.1, 0.1, 0.05, 0.05, 0.1])
    np.testing.assert_array_equal(representation_extremes(pool, sel), [0, 3, 2, 5, 6, 9, 7, 8, 1, 4])
    # past `top`: the most over- then the most under-represented
    np.testing.assert_array_equal(representation_extremes(pool, sel, top=4), [0, 3, 1, 4])
    np.testing.assert_array_equal(representation_extremes(pool, sel, top=5), [0, 3, 8, 1, 4])
    # a class absent from pool and selection is never shown
    np.testing.assert_array_equal(representation_extremes(np.array([0.5, 0.0, 0.5]), np.array([1.0, 0.0, 0.0])),
                                  [0, 2])


def test_selection_precision():
    relevant = np.array([True, True, False, False, True])
    assert selection_precision(np.array([0, 1, 2]), relevant) == pytest.approx(2 / 3)
    assert selection_precision(np.array([4]), relevant) == 1.0
    assert np.isnan(selection_precision(np.array([], dtype=np.int64), relevant))


def test_display_names_disambiguate_repeats():
    classes = (ClassInfo(0, "crane", "n02012849"), ClassInfo(1, "crane", "n03126707"), ClassInfo(2, "cup", None))
    assert display_names(classes) == ["crane (n02012849)", "crane (n03126707)", "cup"]


# ---------------------------------------------------------------- a real report

@pytest.fixture(scope="module")
def scored(sample_dirs, tmp_path_factory):
    """A copy of the tiny sample pool with three score arrays:
    oracle: relevant classes first; rand: seeded uniform; half: random with the odd ids NaN."""
    src, _, relevant_names = sample_dirs
    root = tmp_path_factory.mktemp("report") / "source"
    shutil.copytree(src, root)
    ds = Dataset.open(root)
    rel_idx = [c.index for c in ds.classes if c.name in relevant_names]
    relevant = np.isin(ds.labels, rel_idx)
    rng = np.random.default_rng(0)
    oracle = (relevant + rng.uniform(0, 0.5, ds.num_samples)).astype(np.float32)
    rand = rng.uniform(size=ds.num_samples).astype(np.float32)
    half = rng.uniform(size=ds.num_samples).astype(np.float32)
    half[1::2] = np.nan
    for name, s in (("oracle", oracle), ("rand", rand), ("half", half)):
        write_scores(ds, name, s, {"method": name, "params": {"p": 1}, "seed": 0})
    return root, tuple(relevant_names), relevant, {"oracle": oracle, "rand": rand, "half": half}


@pytest.fixture(scope="module")
def report(scored, tmp_path_factory):
    root, relevant_names, _, _ = scored
    out = tmp_path_factory.mktemp("out") / "report"
    return make_report(root, out, fraction=0.25, grid=4, relevant_classes=list(relevant_names))


def test_report_writes_every_file_and_the_links_resolve(report):
    out = report.out_dir
    names = ["half", "oracle", "rand"]
    assert [r.name for r in report.rows] == names
    expected = {"report.md", "report.html", REPORT_MARK, "score_histograms.png", "selection_overlap.png"}
    expected |= {f"{kind}-{n}.png" for n in names for kind in ("class_share", "images")}
    assert set(report.files) == expected
    assert {p.name for p in out.iterdir()} == expected  # nothing else, no temporaries
    for png in (f for f in expected if f.endswith(".png")):
        with Image.open(out / png) as im:
            im.verify()
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.width >= 500 and im.height >= 300, (png, im.size)
    md = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert set(links) == {f for f in expected if f.endswith(".png")}
    html = (out / "report.html").read_text()
    assert set(re.findall(r'<img src="([^"]+)"', html)) == set(links)
    assert json.loads((out / REPORT_MARK).read_text()) == report.to_dict()
    assert str(out) in report.line() and "oracle 1.000" in report.line()


def test_report_table_numbers(report, scored):
    root, _, relevant, scores = scored
    ds = Dataset.open(root)
    rows = {r.name: r for r in report.rows}
    for name, s in scores.items():
        r = rows[name]
        scored_mask = ~np.isnan(s)
        sel = select_ids(s, fraction=0.25)
        assert r.scored == int(scored_mask.sum()) and r.selected == len(sel) == round(0.25 * r.scored)
        assert r.cut == pytest.approx(float(np.nanmin(s[sel])))
        kept = set(ds.labels[sel].tolist())
        assert r.classes_kept == len(kept)
        assert r.classes_removed == len(set(ds.labels[scored_mask].tolist()) - kept)
        assert r.precision == pytest.approx(relevant[sel].mean())
        assert r.expected_precision == pytest.approx(relevant[scored_mask].mean())
    assert rows["half"].scored == (ds.num_samples + 1) // 2
    # the oracle's selection (fewer than the relevant samples) is all relevant
    assert rows["oracle"].selected < relevant.sum() and rows["oracle"].precision == 1.0
    assert rows["oracle"].classes_kept == len(report.relevant_classes)
    md = (report.out_dir / "report.md").read_text()
    line = next(l for l in md.splitlines() if l.startswith("| oracle |"))
    assert line.endswith(f"| 1.000 | {1 / rows['oracle'].expected_precision:.2f} |")


def test_thumbnails_match_the_original_files_with_and_without_index(scored, tmp_path):
    root, _, _, _ = scored
    ds = Dataset.open(root)
    ids = np.array([0, 5, ds.num_samples - 1, 41])
    thumbs = read_thumbnails(ds, ids, size=32)
    for i, t in zip(ids, thumbs):
        img = Image.open(Path(ds.attrs["source_root"]) / ds.paths[i])
        img.draft("RGB", (32, 32))
        img = img.convert("RGB")
        img.thumbnail((32, 32))
        assert t is not None and t.dtype == np.uint8 and max(t.shape[:2]) <= 32
        np.testing.assert_array_equal(t, np.asarray(img))
    copy = tmp_path / "noidx"
    shutil.copytree(root, copy)
    for idx in (copy / "shards").glob("*.idx"):
        idx.unlink()
    again = read_thumbnails(Dataset.open(copy), ids, size=32)
    for a, b in zip(thumbs, again):
        np.testing.assert_array_equal(a, b)


def test_report_errors_are_one_line(scored, tmp_path):
    root, _, _, _ = scored
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        make_report(tmp_path / "nope", tmp_path / "out")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"no scores named 'entropy'.*stored: half, oracle, rand") as e:
        make_report(root, tmp_path / "out", methods=["oracle", "entropy"])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="fraction must be in"):
        make_report(root, tmp_path / "out", fraction=0.0)
    with pytest.raises(ValueError):
        make_report(root, tmp_path / "out", relevant_classes=["no such class"])
    assert not (tmp_path / "out").exists()
    # a directory with someone's files is never replaced
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="not a filterx report dir"):
        make_report(root, keep, methods=["rand"], grid=0)
    assert (keep / "thesis.tex").read_text() == "x"


def test_report_replaces_an_earlier_report_and_single_method_has_no_overlap(scored, tmp_path):
    root, _, _, _ = scored
    out = tmp_path / "rep"
    make_report(root, out, methods=["rand", "oracle"], grid=0)
    assert (out / "selection_overlap.png").is_file()
    s = make_report(root, out, methods=["rand"], grid=0)
    assert set(s.files) == {"report.md", "report.html", REPORT_MARK, "score_histograms.png", "class_share-rand.png"}
    assert {p.name for p in out.iterdir()} == set(s.files)
    assert s.rows[0].precision is None and "precision" not in (out / "report.md").read_text()


def test_one_image_grid_and_no_pyplot(scored, tmp_path):
    import sys

    had_pyplot = "matplotlib.pyplot" in sys.modules
    s = make_report(scored[0], tmp_path / "r", methods=["rand"], grid=1)
    assert "images-rand.png" in s.files
    with Image.open(tmp_path / "r" / "images-rand.png") as im:
        assert im.width == 700 and 400 <= im.height <= 600  # minimum width; one row of tiles per panel
    if not had_pyplot:  # figures come from the object API: no global backend is chosen
        assert "matplotlib.pyplot" not in sys.modules
