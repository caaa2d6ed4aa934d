import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clirun import one_line, run
from filterx.stages.select import budget_count, infer_format, rank_ids, select_ids




def test_rank_order_ties_and_nan():
    s = np.array([0.5, np.nan, 0.9, 0.5, 0.1, 0.9], dtype=np.float32)
    assert rank_ids(s).tolist() == [2, 5, 0, 3, 4]
    assert select_ids(s, count=3).tolist() == [2, 5, 0]
    assert select_ids(s, threshold=0.5).tolist() == [2, 5, 0, 3]
    assert select_ids(s, fraction=0.4).tolist() == [2, 5]  # 40% of the 5 scored


def test_per_class_cap():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = np.array([0, 0, 0, 1, 1, 2])
    assert select_ids(s, count=4, labels=labels, per_class_cap=2).tolist() == [0, 1, 3, 4]
    assert select_ids(s, count=5, labels=labels, per_class_cap=1).tolist() == [0, 3, 5]


@pytest.mark.parametrize("kw, msg", [
    ({"fraction": 0.0}, r"\(0, 1\]"), ({"fraction": 1.5}, r"\(0, 1\]"), ({"count": 0}, ">= 1"),
    ({"count": 99}, "more than"), ({}, "exactly one"), ({"count": 1, "fraction": 0.5}, "exactly one"),
])
def test_bad_budgets(kw, msg):
    with pytest.raises(ValueError, match=msg):
        select_ids(np.arange(10.0), **kw)


def test_format_inference(tmp_path):
    assert infer_format(tmp_path / "a.jsonl", None) == "jsonl"
    assert infer_format(tmp_path / "a.npy", None) == "npy"
    assert infer_format(tmp_path / "subset", None) == "wds"
    with pytest.raises(ValueError, match="cannot tell the format"):
        infer_format(tmp_path / "a.csv", None)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(-5, 5, width=32), st.just(float("nan"))), min_size=1, max_size=60),
       st.floats(0.01, 1.0), st.integers(1, 4))
def test_selection_properties(values, fraction, cap):
    s = np.array(values, dtype=np.float32)
    labels = np.arange(len(s)) % 3
    scored = int((~np.isnan(s)).sum())
    sel = select_ids(s, fraction=fraction, labels=labels, per_class_cap=cap) if scored else np.array([], int)
    if not scored:
        return
    k = budget_count(scored, fraction=fraction)
    assert len(sel) <= k and len(set(sel.tolist())) == len(sel)
    assert not np.isnan(s[sel]).any()
    assert (np.bincount(labels[sel], minlength=3) <= cap).all()
    # best first, ties by id
    pairs = list(zip((-s[sel]).tolist(), sel.tolist()))
    assert pairs == sorted(pairs)
    # nothing left out that beats a selected sample of a class under its cap
    plain = select_ids(s, fraction=fraction)
    assert len(plain) == k and set(plain.tolist()) == set(rank_ids(s)[:k].tolist())


def test_per_class_cap_leaves_unlabelled_samples_uncapped():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    # an unlabelled pool: label -1 is no class, so the cap takes nothing away
    assert select_ids(s, count=5, labels=np.full(6, -1), per_class_cap=1).tolist() == [0, 1, 2, 3, 4]
    labels = np.array([-1, 0, -1, 0, 1, -1])
    assert select_ids(s, count=6, labels=labels, per_class_cap=1).tolist() == [0, 1, 2, 4, 5]
    assert select_ids(s, count=4, labels=labels, per_class_cap=1).tolist() == [0, 1, 2, 4]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-5, 5, width=32), min_size=1, max_size=60), st.integers(1, 60), st.integers(1, 4))
def test_per_class_cap_property_with_unlabelled(values, count, cap):
    s = np.array(values, dtype=np.float32)
    labels = np.arange(len(s)) % 4 - 1  # -1, 0, 1, 2, -1, ...
    count = min(count, len(s))
    sel = select_ids(s, count=count, labels=labels, per_class_cap=cap)
    assert (np.bincount(labels[sel][labels[sel] >= 0], minlength=3) <= cap).all()
    # every unlabelled sample ranked above the cut is kept: the cap never drops one
    ranked = rank_ids(s)
    last = np.flatnonzero(ranked == sel[-1])[0]
    unlabelled_above = set(ranked[: last + 1][labels[ranked[: last + 1]] < 0].tolist())
    assert unlabelled_above <= set(sel.tolist())


def test_per_class_cap_on_an_unlabelled_pool_keeps_the_budget(image_folder, tmp_path):
    from filterx.io.dataset import Dataset
    from filterx.io.scores import write_scores
    from filterx.stages.select import SelectConfig, select
    from filterx.stages.shard import ShardConfig, shard

    paths = sorted(image_folder.glob("class */img_*.jpg"))[:12]
    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in paths))  # no labels: all -1
    shard(ShardConfig(tmp_path / "list.txt", tmp_path / "pool", shard_size=5, workers=1, quiet=True))
    ds = Dataset.open(tmp_path / "pool")
    assert (ds.labels == -1).all() and ds.num_samples == 12
    write_scores(ds, "s", -np.arange(12, dtype=np.float32), {"method": "test"})
    s = select(SelectConfig(tmp_path / "pool", "s", tmp_path / "m.npy", count=8, per_class_cap=2))
    assert s.selected == 8 and np.load(tmp_path / "m.npy").tolist() == list(range(8))
    assert s.warnings == ()


def test_nan_threshold_is_refused():
    with pytest.raises(ValueError, match="--threshold must be a number, got nan"):
        select_ids(np.arange(5.0), threshold=float("nan"))


# ---------------------------------------------------------------- the select stage and command


@pytest.fixture()
def scored(dataset_dir, tmp_path):
    """A copy of dataset_dir with scores "s" (0.1 * id, highest 2.6) and "unscored" (all NaN)."""
    from filterx.io.dataset import Dataset
    from filterx.io.scores import write_scores

    src = tmp_path / "src"
    shutil.copytree(dataset_dir, src)
    ds = Dataset.open(src)
    write_scores(ds, "s", (np.arange(ds.num_samples) * 0.1).astype(np.float32), {"method": "test"})
    write_scores(ds, "unscored", np.full(ds.num_samples, np.nan, np.float32), {"method": "test"})
    return src


def test_nan_threshold_is_one_line(scored, tmp_path):
    code, _, err = run("select", "--source", scored, "--method", "s", "--threshold", "nan", "-o", tmp_path / "m.jsonl")
    line = one_line(err)
    assert code == 2 and "--threshold must be a number, got nan" in line
    assert not (tmp_path / "m.jsonl").exists()


@pytest.mark.parametrize("args, reason", [
    (["--method", "s", "--threshold", "1e9"], "threshold 1e+09 is above the highest score 2.6; nothing selected"),
    (["--method", "s", "--threshold", "inf"], "threshold inf is above the highest score 2.6; nothing selected"),
    (["--method", "s", "--fraction", "0.01"],
     "fraction 0.01 of the 27 scored samples rounds to 0 samples; nothing selected"),
    (["--method", "unscored", "--fraction", "0.5"], "no sample is scored (all 27 scores are NaN); nothing selected"),
])
def test_a_budget_that_selects_nothing_warns_why(scored, tmp_path, args, reason):
    out = tmp_path / "m.jsonl"
    code, stdout, err = run("select", "--source", scored, *args, "-o", out, "--json")
    assert code == 0, err
    method = args[1]
    warning = f"scores {method!r}: {reason}"
    assert [line for line in err.splitlines() if line.startswith("WARNING")] == [f"WARNING filterx.stages.select: {warning}"]
    summary = json.loads(stdout)
    assert summary["selected"] == 0 and summary["warnings"] == [warning]
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["count"] == 0


def test_a_budget_that_selects_something_does_not_warn(scored, tmp_path):
    code, stdout, err = run("select", "--source", scored, "--method", "s", "--threshold", "2.55",
                            "-o", tmp_path / "m.jsonl", "--json")
    assert code == 0 and "WARNING" not in err
    summary = json.loads(stdout)
    assert summary["selected"] == 1 and summary["warnings"] == []


def test_a_locked_output_is_named_in_the_error(scored, tmp_path):
    from filterx.io import atomic
    from filterx.stages.select import SelectConfig, select

    out = tmp_path / "out" / "m.jsonl"
    with atomic.run_lock(out.parent, f"select-{out.name}"):  # as a select in another process would
        with pytest.raises(atomic.LockedError) as exc:
            select(SelectConfig(scored, "s", out, count=3))
        assert str(exc.value).startswith(f"{out} is being written by select-{out.name} in process ")
        code, _, err = run("select", "--source", scored, "--method", "s", "--count", 3, "-o", out)
        assert code == 2 and one_line(err).startswith(f"filterx select: error: {out} is being written by")
    assert not out.exists()


@pytest.mark.parametrize("name, fmt", [("m.jsonl", None), ("m.npy", None), ("m.txt", None), ("subset", "jsonl")])
def test_output_naming_an_existing_directory_for_a_file_format_is_one_line(scored, tmp_path, name, fmt):
    out = tmp_path / "outs" / name
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    args = ["--format", fmt] if fmt else []
    code, _, err = run("select", "--source", scored, "--method", "s", "--count", 3, "-o", out, *args)
    line = one_line(err)
    assert code == 2 and f"-o {out} is a directory" in line and "--format wds" in line
    # nothing written, nothing left behind: no temporaries, no header sidecar, no saved options
    assert sorted(p.name for p in (tmp_path / "outs").iterdir()) == [name]
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------- rank fusion: --method a,b --combine


def test_fuse_ranks_by_hand():
    from filterx.stages.select import fuse_ranks, normalised_ranks

    a = np.array([0.9, 0.1, 0.5, np.nan, 0.5], dtype=np.float32)
    b = np.array([1.0, 3.0, 2.0, 5.0, 0.0], dtype=np.float32)
    # over the samples both score (0, 1, 2, 4): a ranks them 0, 3, 1.5, 1.5 (the tie shares its
    # average rank), b ranks them 2, 0, 1, 3; scaled by 1 / (4 - 1)
    scored = ~np.isnan(a)
    np.testing.assert_allclose(normalised_ranks(a, scored), [0, 1, 0.5, np.nan, 0.5])
    np.testing.assert_allclose(normalised_ranks(b, scored), [2 / 3, 0, 1 / 3, np.nan, 1])
    mean = fuse_ranks([a, b], "rank-mean")
    np.testing.assert_allclose(mean, [1 - 1 / 3, 0.5, 1 - 5 / 12, np.nan, 0.25])
    assert select_ids(mean, count=4).tolist() == [0, 2, 1, 4]
    best = fuse_ranks([a, b], "rank-min")
    np.testing.assert_allclose(best, [1, 1, 2 / 3, np.nan, 0.5])
    assert select_ids(best, count=4).tolist() == [0, 1, 2, 4]  # the tie at 1 goes to the lower id
    assert select_ids(best, fraction=1.0).tolist() == [0, 1, 2, 4]  # NaN in one score: never selected
    worst = fuse_ranks([a, b], "rank-max")
    np.testing.assert_allclose(worst, [1 / 3, 0, 0.5, np.nan, 0])
    assert select_ids(worst, count=4).tolist() == [2, 0, 1, 4]  # the tie at 0 goes to the lower id
    np.testing.assert_allclose(fuse_ranks([a, a, a], "rank-mean"), normalised_ranks(-a, scored))


def test_fuse_ranks_is_invariant_to_monotone_rescaling():
    from filterx.stages.select import fuse_ranks

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    for rule in ("rank-mean", "rank-min", "rank-max"):
        np.testing.assert_array_equal(fuse_ranks([a, b], rule), fuse_ranks([np.exp(a), 3 * b - 7], rule))


def test_rank_max_keeps_the_intersection_and_rank_min_the_union_of_the_top_lists():
    from filterx.stages.select import fuse_ranks, normalised_ranks

    rng = np.random.default_rng(3)
    a, b, c = rng.normal(size=(3, 200))
    b[:40] = a[:40] + 0.1 * rng.normal(size=40)  # a part both rank alike
    scored = np.ones(200, bool)
    ranks = [normalised_ranks(x, scored) for x in (a, b, c)]
    worst, best = fuse_ranks([a, b, c], "rank-max"), fuse_ranks([a, b, c], "rank-min")
    for t in (0.5, 0.7, 0.9):  # a threshold on the fused score = each score's best 1 - t
        tops = [set(np.flatnonzero(r <= 1 - t + 1e-12)) for r in ranks]
        assert set(select_ids(worst, threshold=t)) == set.intersection(*tops)
        assert set(select_ids(best, threshold=t)) == set.union(*tops)


@pytest.fixture()
def two_scores(scored):
    """``scored`` plus scores "t": the reverse order of "s" on even ids, NaN on id 3."""
    from filterx.io.dataset import Dataset
    from filterx.io.scores import write_scores

    ds = Dataset.open(scored)
    t = np.where(np.arange(ds.num_samples) % 2 == 0, -np.arange(ds.num_samples), np.arange(ds.num_samples))
    t = t.astype(np.float32)
    t[3] = np.nan
    write_scores(ds, "t", t, {"method": "test-t", "seed": 1})
    return scored


@pytest.mark.parametrize("rule", ["rank-mean", "rank-min", "rank-max"])
def test_select_combine_writes_the_fused_selection(two_scores, tmp_path, rule):
    from filterx.io.dataset import Dataset
    from filterx.io.scores import read_scores
    from filterx.stages.select import fuse_ranks

    outs = [tmp_path / "a" / "m.jsonl", tmp_path / "b" / "m.jsonl"]
    for out in outs:
        code, _, err = run("select", "--source", two_scores, "--method", "s,t", "--combine", rule, "--count", 7,
                           "-o", out, "-q")
        assert code == 0, err
    assert outs[0].read_bytes() == outs[1].read_bytes()  # the same inputs: the same bytes
    lines = [json.loads(x) for x in outs[0].read_text().splitlines()]
    header, rows = lines[0], lines[1:]
    assert header["method"] == "s,t" and header["methods"] == ["s", "t"] and header["combine"] == rule
    assert header["scores"]["t"]["method"] == "test-t" and header["scores"]["s"]["method"] == "test"
    ds = Dataset.open(two_scores)
    fused = fuse_ranks([read_scores(ds, "s")[0], read_scores(ds, "t")[0]], rule)
    want = select_ids(fused, count=7)
    assert [r["id"] for r in rows] == want.tolist() and header["count"] == 7 and 3 not in want
    np.testing.assert_allclose([r["score"] for r in rows], fused[want])


@pytest.mark.parametrize("args, msg", [
    (["--method", "s,nope", "--combine", "rank-mean"], "has no scores named 'nope' (stored: "),
    (["--method", "s", "--combine", "rank-min"], "--combine rank-min needs several scores (--method A,B[,C])"),
    (["--method", "s,t"], "--method 's,t' names 2 scores; fuse them with --combine (rank-mean, rank-min, rank-max)"),
    (["--method", "s,s", "--combine", "rank-mean"], "names a score twice"),
    (["--method", "s,t", "--combine", "rank-median"], "'rank-median' is not one of 'rank-mean', 'rank-min', 'rank-max'"),
])
def test_select_combine_errors_are_one_line(two_scores, tmp_path, args, msg):
    out = tmp_path / "m.jsonl"
    code, _, err = run("select", "--source", two_scores, *args, "--count", 3, "-o", out)
    line = one_line(err)
    assert code == 2 and msg in line, line
    assert not out.exists()


def test_pool_clusters_then_threshold_one_keeps_the_chosen_clusters(sample_dirs, encoder_file, tmp_path):
    """score --method pool-clusters, then select --threshold 1: DataComp's "keep exactly the
    chosen clusters", the count the scores' attrs recorded."""
    from filterx.io.dataset import Dataset
    from filterx.io.scores import read_scores

    shutil.copytree(sample_dirs[0], tmp_path / "src")
    code, _, err = run("score", "--method", "pool-clusters", "--source", tmp_path / "src", "--target", sample_dirs[1],
                       "--encoder", encoder_file, "--k", 96, "--backend", "pil", "--device", "cpu", "--workers", 0, "-q")
    assert code == 0, err
    scores, attrs = read_scores(Dataset.open(tmp_path / "src"), "pool-clusters")
    result = attrs["result"]
    assert attrs["params"]["k"] == 96 and result["k_used"] == 96 and 1 <= result["clusters_kept"] < 96
    assert 0 < result["kept_share"] < 1  # so the threshold has something to tell apart
    code, out, err = run("select", "--source", tmp_path / "src", "--method", "pool-clusters", "--threshold", 1,
                         "-o", tmp_path / "kept.npy", "-q", "--json")
    assert code == 0, err
    kept = np.load(tmp_path / "kept.npy")
    assert len(kept) == result["kept_samples"] == json.loads(out)["selected"]
    assert kept.tolist() == np.flatnonzero(scores >= 1).tolist()
    assert result["kept_share"] == pytest.approx(len(kept) / len(scores))
