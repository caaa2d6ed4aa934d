"""bench: the suite runner, results files, child-process measurement, realistic JPEGs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import suite
from bench.images import make_realistic_jpegs

STEM = r"(?P<suite>[a-z]+)(?P<quick>-quick)?_(?P<machine>[a-z0-9-]+)_(?P<cores>\d+)c_\d{8}-\d{4}(-\d+)?"


# ---------------------------------------------------------------- realistic JPEGs


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    out = tmp_path_factory.mktemp("jpegs") / "photos"
    return make_realistic_jpegs(out, 8, seed=3)


def test_realistic_jpegs_are_imagenet_sized_photos(jpegs):
    from PIL import Image

    assert [p.name for p in jpegs] == [f"img_{i:06d}.jpg" for i in range(8)]
    for p in jpegs:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            long_side, short_side = max(im.size), min(im.size)
            assert 400 <= long_side <= 500, (p, im.size)
            assert 0.69 * long_side <= short_side <= 0.91 * long_side, (p, im.size)
            arr = np.asarray(im, dtype=np.float32)
        # a photo, not a flat field: strong spatial structure well above the added grain
        assert arr.std() > 20, (p, arr.std())
        assert np.abs(np.diff(arr.mean(axis=2), axis=1)).mean() > 2.0
        assert p.stat().st_size > 15_000
    sizes = [p.stat().st_size for p in jpegs]
    assert 40_000 < np.mean(sizes) < 250_000, sizes
    assert len({p.read_bytes() for p in jpegs}) == len(jpegs)


def test_realistic_jpegs_are_cached_and_deterministic(jpegs, tmp_path):
    mtimes = [p.stat().st_mtime_ns for p in jpegs]
    again = make_realistic_jpegs(jpegs[0].parent, 8, seed=3)
    assert again == jpegs and [p.stat().st_mtime_ns for p in again] == mtimes
    # image i depends on (seed, i) only: a smaller set made elsewhere is a prefix
    other = make_realistic_jpegs(tmp_path / "other", 3, seed=3)
    assert [p.read_bytes() for p in other] == [p.read_bytes() for p in jpegs[:3]]
    # another seed replaces the cache, and n shrinks the folder to n images
    reseeded = make_realistic_jpegs(tmp_path / "other", 2, seed=4)
    assert sorted(p.name for p in (tmp_path / "other").glob("*.jpg")) == ["img_000000.jpg",
                                                                           "img_000001.jpg"]
    assert reseeded[0].read_bytes() != jpegs[0].read_bytes()
    with pytest.raises(ValueError, match="n must be >= 1"):
        make_realistic_jpegs(tmp_path / "none", 0)


# ---------------------------------------------------------------- runner pieces


def test_machine_slug_names_gpu_else_cpu():
    cpu = {"cpu": "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", "gpu": None, "cores": 2}
    assert suite.machine_slug(cpu) == "intel-xeon-gold-6248"
    gpu = {**cpu, "gpu": "NVIDIA H100 80GB HBM3"}
    assert suite.machine_slug(gpu) == "nvidia-h100-80gb-hbm3"
    import datetime as dt

    stem = suite.results_stem("decode", cpu, True, dt.datetime(2025, 3, 4, 5, 6))
    assert stem == "decode-quick_intel-xeon-gold-6248_2c_20250304-0506"


def test_the_commit_recorded_says_when_the_code_measured_differs_from_it(tmp_path, monkeypatch):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "a")
    monkeypatch.setattr(suite, "REPO_ROOT", tmp_path)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "untracked.txt").write_text("not code\n")
    assert suite._git_commit() == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert suite._git_commit() == head + "+changes"


def test_format_table_aligns_rows_with_different_keys():
    text = suite.format_table([{"a": 1, "b": 2.5}, {"a": 10, "c": "x"}, {"b": 1234.5}])
    lines = text.splitlines()
    assert lines[0].split() == ["a", "b", "c"]
    assert len({len(line) for line in lines}) == 1
    assert lines[2].split() == ["1", "2.50", "-"]
    assert lines[4].split() == ["-", "1234", "-"]


def test_run_child_returns_result_and_its_own_peak_memory():
    ballast = np.ones(300 * 2**20 // 8)  # 300 MiB touched in the runner, not in the child
    res = suite.run_child("builtins:dict", {"a": 1, "b": [2, 3]})
    assert res["a"] == 1 and res["b"] == [2, 3]
    assert 1 < res["peak_rss_mb"] < 200, res  # the child's peak, not the runner's
    del ballast
    with pytest.raises(RuntimeError, match="exit code 1"):
        suite.run_child("builtins:int", {"x": "not a number"})


def test_round_robin_interleaves_and_keeps_failures():
    order = []
    jobs = {"a": ("builtins:dict", {"k": 1}), "bad": ("builtins:int", {"x": "?"})}
    runs = suite.round_robin(jobs, 2, log=order.append)
    assert [line.split()[1] for line in order] == ["a:", "bad:", "a:", "bad:"]
    assert [r["k"] for r in runs["a"]] == [1, 1]
    assert all("error" in r for r in runs["bad"])
    s = suite.summarize_runs([{"img_s": 3.0, "peak_rss_mb": 5}, {"img_s": 1.0, "peak_rss_mb": 9},
                              {"error": "x"}, {"img_s": 2.0, "peak_rss_mb": 7}])
    assert (s["img_s"], s["img_s_min"], s["img_s_max"], s["runs"], s["peak_rss_mb"]) == (2.0, 1.0, 3.0, 3, 9)
    assert suite.summarize_runs([{"error": "boom"}]) == {"img_s": None, "error": "boom"}
    # ratios pair rounds: the load of round 2 (everything 3x slower) cancels out
    x = [{"img_s": 2.0}, {"img_s": 9.0}, {"error": "x"}, {"img_s": 4.0}]
    ref = [{"img_s": 1.0}, {"img_s": 3.0}, {"img_s": 1.0}, {"img_s": 2.0}]
    assert suite.paired_ratio(x, ref) == pytest.approx(2.0)  # median of 2, 3, 2
    assert suite.paired_ratio([{"error": "x"}], ref) is None


# ---------------------------------------------------------------- runner end to end


def _results(out: Path) -> dict[str, dict]:
    found = {}
    for p in out.glob("*.json"):
        m = re.fullmatch(STEM + r"\.json", p.name)
        assert m, p.name
        assert p.with_suffix(".md").is_file()
        found[m["suite"]] = json.loads(p.read_text())
    return found


def test_runner_reports_missing_and_failing_suites_and_goes_on(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_ok.py").write_text(
        "def run(quick, scale=1):\n"
        "    return [{'case': 'ref', 'x_vs_ref': 1.0}, {'case': 'fast', 'x_vs_ref': 2.0 * scale}]\n")
    (tmp_path / "fake_bad.py").write_text("def run(quick):\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(suite, "SUITES", {})
    suite.register_suite("bad", "fake_bad", "raises")
    suite.register_suite("gone", "fake_missing_module", "does not exist")
    suite.register_suite("ok", "fake_ok", "two rows")
    out = tmp_path / "results"
    code = suite.main(["--suite", "bad,gone,ok", "--quick", "--out", str(out), "--opt", "scale=3"])
    text = capsys.readouterr().out
    assert code == 1
    assert re.search(r"bad\s+failed\s+0 .*RuntimeError: boom", text)
    assert re.search(r"gone\s+missing\s+0 .*fake_missing_module does not exist", text)
    results = _results(out)
    assert list(results) == ["ok"]  # only suites that produced rows write files
    doc = results["ok"]
    assert doc["quick"] is True and doc["options"] == {"scale": 3}
    assert [r["x_vs_ref"] for r in doc["rows"]] == [1.0, 6.0]
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["torch"]
    assert "--opt scale=3" in doc["command"]
    # a scoped option the suite does not take fails that suite, naming the valid ones; an
    # unscoped one that no suite takes fails the run
    code = suite.main(["--suite", "ok", "--out", str(out), "--opt", "ok.nope=1"])
    assert code == 1 and "valid: scale" in capsys.readouterr().out
    code = suite.main(["--suite", "ok", "--no-write", "--opt", "nope=1"])
    assert code == 1 and "option nope was taken by none" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        suite.main(["--suite", "nosuch"])


def test_decode_suite_end_to_end_writes_ratios(tmp_path, capsys):
    out = tmp_path / "results"
    code = suite.main(["--suite", "decode", "--quick", "--out", str(out),
                       "--data", str(tmp_path / "data"), "--opt", "images=16", "--opt", "repeats=1",
                       "--opt", "resolutions=112", "--opt", "configs=pil-draft"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    doc = _results(out)["decode"]
    md = next(out.glob("decode-quick_*.md")).read_text()
    assert "CPU:" in md and "x_vs_pil_full" in md and "python -m bench --suite decode" in md
    rows = {r["config"]: r for r in doc["rows"]}
    assert set(rows) == {"pil-full", "pil-draft"}
    assert rows["pil-full"]["x_vs_pil_full"] == pytest.approx(1.0)
    for r in rows.values():
        assert r["res"] == 112 and r["images"] == 16 and r["img_s"] > 0
        assert r["x_vs_pil_full"] == pytest.approx(r["img_s"] / rows["pil-full"]["img_s"])
        assert 10 < r["peak_rss_mb"] < 4000
    # the same images through the same transform: draft decoding changes pixels only slightly
    assert rows["pil-draft"]["out_mean"] == pytest.approx(rows["pil-full"]["out_mean"], abs=0.03)


# ---------------------------------------------------------------- the GPU check's CPU dry run


def test_gpu_check_blocks_what_the_gpu_machine_lacks():
    import subprocess

    code = ("from bench.bench_gpu import block_missing_modules, BLOCKED; block_missing_modules()\n"
            "for name in BLOCKED:\n"
            "    try:\n        __import__(name)\n    except ModuleNotFoundError:\n        continue\n"
            "    raise SystemExit('imported ' + name)\n"
            "import filterx.math.kmeans, filterx.core.collectives, filterx.models.archs, filterx.kernels")
    proc = subprocess.run([sys.executable, "-c", code], cwd=suite.REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_check_cpu_dry_run_runs_every_part(tmp_path):
    from bench import bench_gpu

    doc, path = bench_gpu.run_check(cpu_dry_run=True, out=tmp_path / "out", data=tmp_path / "data")
    assert path.name.startswith("gpu-dry-run-") and path.with_suffix(".md").is_file()
    saved = json.loads(path.read_text())
    assert saved["dry_run"] is True and saved["device"] == "cpu"
    parts = saved["parts"]
    assert list(parts) == [p for p, _ in bench_gpu.PARTS]
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part.get("error"), part.get("stderr_tail"))
        assert part["rows"], name
    rows = {r["measure"]: r for p in parts.values() for r in p["rows"]}
    assert {"decode+resize 64", "decode+resize 32", "embed resnet18 64", "embed resnet50 32"} <= set(rows)
    assert all(r["img_s"] > 0 for m, r in rows.items() if m.startswith(("decode", "embed", "pretrain")))
    assert rows["embed resnet50 64"]["feature_dim"] == 2048 and rows["embed resnet50 64"]["finite"]
    kmeans = next(r for m, r in rows.items() if m.startswith("torch_kmeans"))
    assert kmeans["iterations"] == bench_gpu.DRY["kmeans_iter"]
    assert kmeans["objective"] < kmeans["objective_seeded"]
    kern = [r for m, r in rows.items() if m.startswith(("nearest_centroid", "head_influence"))]
    assert len(kern) == 2 and all(r["agree"] and r["max_rel_diff"] < 1e-3 for r in kern)
    coll = rows["collectives under gloo world 1"]
    assert coll["reduced"] == [1.0, 2.0, 3.0, 4.0] and coll["agree"]
    md = path.with_suffix(".md").read_text()
    assert "DRY RUN" in md and all(f"## {p}: ok" in md for p in parts)


# ---------------------------------------------------------------- the selection suite


def test_suite_rows_carry_notes_into_the_table_and_files(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_notes.py").write_text(
        "from bench.suite import Rows\n"
        "def run(quick):\n"
        "    return Rows([{'method': 'a', 'p': 0.5}], ['pool of 10 images', 'not run: b'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(suite, "SUITES", {})
    suite.register_suite("notes", "fake_notes", "rows with notes")
    out = tmp_path / "results"
    assert suite.main(["--suite", "notes", "--out", str(out)]) == 0
    assert "  pool of 10 images\n  not run: b" in capsys.readouterr().out
    doc = _results(out)["notes"]
    assert doc["rows"] == [{"method": "a", "p": 0.5}] and doc["notes"] == ["pool of 10 images", "not run: b"]
    md = next(out.glob("notes_*.md")).read_text()
    assert "Notes:\n\n- pool of 10 images\n- not run: b" in md


def test_selection_references_are_out_of_sample_and_find_target_like_rows():
    from bench.selection_pools import knn_scores, kmeans_scores, logistic_scores, relevant_mask

    rng = np.random.default_rng(0)
    target = rng.normal(0, 1, (60, 8)) + 4.0
    relevant = np.zeros(300, dtype=bool)
    relevant[:30] = True
    pool = rng.normal(0, 1, (300, 8))
    pool[relevant] += 4.0
    for scores in (logistic_scores(pool, target, folds=3), kmeans_scores(pool, target, k=5)["min"],
                   kmeans_scores(pool, target, k=5)["avg"], knn_scores(pool, target, k=5)):
        assert scores.shape == (300,) and scores.dtype == np.float32 and np.isfinite(scores).all()
        top = np.argsort(-scores)[:30]
        assert relevant[top].mean() >= 0.9
    # cross-fitted: each fold's rows are scored by a model fitted on the target and the other
    # folds only (refitted here by hand for the first fold)
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = logistic_scores(pool, target, folds=3, seed=0)
    train, test = next(KFold(3, shuffle=True, random_state=0).split(pool))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    model.fit(np.concatenate([pool[train], target]), np.r_[np.zeros(len(train)), np.ones(len(target))])
    np.testing.assert_allclose(scores[test], model.decision_function(pool[test]), rtol=1e-4, atol=1e-4)
    assert relevant_mask(np.array([0, 1, 2, -1]), ["digit_0", "photo_cat", "digit_4"]).tolist() == \
        [True, False, True, False]


def test_selection_suite_covers_the_registry_and_refuses_unknown_encoders():
    from bench import bench_selection
    from filterx.scorers import list_scorers
    from filterx.stages.select import COMBINE

    run = {m for _, m, _ in bench_selection.variants()}
    assert run | set(bench_selection.NOT_RUN) == set(list_scorers())
    assert not run & set(bench_selection.NOT_RUN)
    labels = {label for label, _, _ in bench_selection.variants()}
    for _, parts, combine in bench_selection.FUSED:  # fused rows read scores the suite stores
        assert set(parts) <= labels and combine in COMBINE
    for _, parts, combine in bench_selection.CROSS_FUSED:  # and across encoders the suite trains
        assert all(key in bench_selection.ENCODERS and part in labels
                   or (key, part) == (bench_selection.PIXEL_KEY, bench_selection.PIXEL_VARIANT[0]) for key, part in parts)
        assert combine in COMBINE
    with pytest.raises(ValueError, match="unknown encoders .*nope.*valid: target, backbone, moco"):
        bench_selection.run(True, encoders="target,nope")


def test_pixel_ensemble_rows_name_their_members_and_fuse_the_ensemble(monkeypatch):
    """--opt selection.pixel_members=3 (or emoji.*): the pixel row is the 3-member ensemble, and the
    cross-encoder fusion reads that row's stored score under a label that says so; likewise with
    --opt ...pixel_colour=mixed and --opt ...pixel_views=4."""
    from bench import bench_selection

    assert bench_selection.pixel_variant(1) == bench_selection.PIXEL_VARIANT
    label, method, params = bench_selection.pixel_variant(3)
    assert label == "domain-cls (pixels, ResNet-18 width 16, 32 px, 1000 steps, 3 members)"
    assert method == "domain-cls" and params == {**bench_selection.PIXEL_VARIANT[2], "members": 3}
    read = []
    monkeypatch.setattr(bench_selection, "_select_precisions",
                        lambda name, pool, stored, manifest, values, combine=None: read.append(stored))
    rows = bench_selection._cross_fused_rows({"emoji": {}}, {"moco": {}}, pixel_members=3)
    assert [r["method"] for r in rows] == ["rank-mean(domain-cls linear moco, domain-cls pixels x3)"]
    assert read == [f"moco-{bench_selection.slug('domain-cls (linear)')},{bench_selection.slug(label)}"]
    label, _, params = bench_selection.pixel_variant(3, "mixed")  # --opt ...pixel_colour=mixed
    assert label == "domain-cls (pixels, ResNet-18 width 16, 32 px, 1000 steps, 3 members, colour mixed)"
    assert params == {**bench_selection.PIXEL_VARIANT[2], "members": 3, "colour": "mixed"}
    read.clear()
    rows = bench_selection._cross_fused_rows({"emoji": {}}, {"moco": {}}, pixel_members=3, pixel_colour="mixed")
    assert [r["method"] for r in rows] == ["rank-mean(domain-cls linear moco, domain-cls pixels x3 mixed)"]
    assert read == [f"moco-{bench_selection.slug('domain-cls (linear)')},{bench_selection.slug(label)}"]
    label, _, params = bench_selection.pixel_variant(3, "mixed", 4)  # --opt ...pixel_views=4
    assert label == "domain-cls (pixels, ResNet-18 width 16, 32 px, 1000 steps, 3 members, colour mixed, 4 views)"
    assert params == {**bench_selection.PIXEL_VARIANT[2], "members": 3, "colour": "mixed", "views": 4}
    read.clear()
    rows = bench_selection._cross_fused_rows({"emoji": {}}, {"moco": {}}, pixel_members=3, pixel_colour="mixed",
                                             pixel_views=4)
    assert [r["method"] for r in rows] == ["rank-mean(domain-cls linear moco, domain-cls pixels x3 mixed 4 views)"]
    assert read == [f"moco-{bench_selection.slug('domain-cls (linear)')},{bench_selection.slug(label)}"]


@pytest.mark.slow
def test_selection_suite_end_to_end_at_a_tiny_size(tmp_path):
    """The whole chain on tiny pools (113 s with the four encoders on 2 idle AMD EPYC cores)."""
    from bench import bench_selection

    rows = bench_selection.run(True, per_class=6, digits_per_class=3, target_per_class=8, epochs=1, moco_epochs=1,
                               work=str(tmp_path / "work"))
    by_key = {(r["method"], r["encoder"]): r for r in rows}
    cols = [f"{p}@{b}%" for p in ("easy", "medium", "hard") for b in (6, 12)]
    labels = [label for label, _, _ in bench_selection.variants()]
    for enc in bench_selection.ENCODERS:
        for label in labels:
            row = by_key[(label, enc)]
            assert all(0.0 <= row[c] <= 1.0 for c in cols), row
            assert row["seconds"] >= 0
    for label, parts, _ in bench_selection.CROSS_FUSED:  # every encoder ran: the cross-encoder fusions too
        assert all(0.0 <= by_key[(label, " + ".join(key for key, _ in parts))][c] <= 1.0 for c in cols)
    refs = [r for r in rows if r["encoder"].startswith("pixels")]
    assert len(refs) == 4 and all(0.0 <= r[c] <= 1.0 for r in refs for c in cols)
    expected, best = by_key[("random (expected)", "-")], by_key[("best possible", "-")]
    # tiny pools: 6 images per photo/texture class, 3 per digit class, 15 relevant of 135-150
    assert expected["easy@6%"] == pytest.approx(15 / 135) and expected["hard@6%"] == pytest.approx(15 / 150)
    assert best["easy@6%"] == 1.0 and best["hard@12%"] == pytest.approx(15 / 18)
    assert all(r[c] <= best[c] + 1e-9 for r in rows for c in cols)
    # where the relevant part is drawn like the target, some method finds it far above random
    assert max(r["easy@6%"] for r in rows if r["encoder"] != "-") >= 4 * expected["easy@6%"]
    assert any("not run: class-mask" in n for n in rows.notes)
    assert any(n.startswith("pools (images, relevant, share): easy 135, 15") for n in rows.notes)
    # the moco encoder is one per pool, trained on that pool with the target, labels unread
    import torch

    for pool in ("easy", "medium", "hard"):
        enc = torch.load(tmp_path / "work" / f"encoder-moco-{pool}.pt", weights_only=True)
        assert enc["objective"] == "moco" and enc["resolution"] == bench_selection.MOCO_RESOLUTION
        assert Path(enc["pool"]["root"]).name == pool and Path(enc["target"]["root"]).name == "target"
        # moco-ft: that pool's MoCo encoder fine-tuned on the target's labels (train-encoder --init)
        ft = torch.load(tmp_path / "work" / f"encoder-moco-ft-{pool}.pt", weights_only=True)
        assert ft["config"]["init"] == str(tmp_path / "work" / f"encoder-moco-{pool}.pt")
        assert ft["resolution"] == bench_selection.MOCO_RESOLUTION


def test_opt_values_true_and_false_are_bools_not_truthy_strings():
    """``--opt selection.references=false`` must turn the references off: the text "false"
    is truthy, and the suite ran them."""
    opts = suite._parse_options(["selection.references=false", "fresh=True", "decode.images=500",
                                 "scale=0.5", "encoders=target,moco", "name=falsey"])
    assert opts == {"selection.references": False, "fresh": True, "decode.images": 500, "scale": 0.5,
                    "encoders": "target,moco", "name": "falsey"}
    assert type(opts["decode.images"]) is int and opts["selection.references"] is False


def test_selection_rows_of_one_method_measure_different_settings():
    """Two rows of the selection suite that resolve to the same parameters would report one setting
    under two labels (as a grad-align row did when a default changed under it)."""
    from bench.bench_selection import EXTRA_VARIANTS, variants
    from filterx.scorers import ScoreInputs, resolved_params
    from filterx.scorers.gradalign import aligned_with

    pool_run = ScoreInputs(num_source=1, target_emb=np.zeros((1, 1)), target_labels=np.zeros(1, int))
    seen = {}
    for label, method, params in variants():
        params = resolved_params(method, **params)
        if method == "grad-align":  # "auto" as it resolves on a pool
            params["align_with"] = aligned_with(params["align_with"], pool_run)
        key = (method, json.dumps(params, sort_keys=True, default=str))
        assert key not in seen, f"{label!r} measures what {seen[key]!r} does"
        seen[key] = label
    assert len(seen) >= len(EXTRA_VARIANTS)
