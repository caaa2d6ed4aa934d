"""bench.combine: one suite's results at several seeds as mean (min-max) and ratio tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import combine


def _results(path: Path, seed, rows, *, suite="selection", quick=True, **options) -> Path:
    opts = dict(options)
    if seed is not None:
        opts["seed"] = seed
    doc = {"suite": suite, "quick": quick, "command": f"python -m bench --suite {suite}",
           "options": opts, "machine": {"cpu": "Test CPU", "gpu": None, "git_commit": "abc1234",
                                        "date": "2026-12-04T08:00:00+00:00"},
           "seconds": 1.0, "rows": rows}
    path.write_text(json.dumps(doc))
    return path


def _rows(knn_easy, knn_hard, expected=0.1, extra=()):
    return [{"method": "knn-target", "encoder": "moco", "easy@6%": knn_easy, "hard@6%": knn_hard, "seconds": 0.5},
            *extra,
            {"method": "random (expected)", "encoder": "-", "easy@6%": expected, "hard@6%": expected,
             "seconds": None}]


def test_combine_gives_mean_range_and_the_lowest_ratio_of_any_run(tmp_path, capsys):
    a = _results(tmp_path / "a.json", None, _rows(1.0, 0.4, extra=[
        {"method": "knn-target", "encoder": "target", "easy@6%": 0.2, "hard@6%": 0.1}]), encoders="moco,target")
    b = _results(tmp_path / "b.json", 1, _rows(0.9, 0.6), encoders="moco")
    c = _results(tmp_path / "c.json", 2, _rows(0.8, 0.2, expected=0.2), encoders="moco")
    out = tmp_path / "out"
    rc = combine.main([str(a), str(b), str(c), "--ratio-to", "random (expected)", "--vary", "encoders",
                       "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "0.90 (0.80-1.00)" in printed and "0.40 (0.20-0.60)" in printed
    assert "1 rows not in every file, left out (encoder target)" in printed
    json_path, = out.glob("selection-quick_seeds-0-1-2_*.json")
    doc = json.loads(json_path.read_text())
    # a's seed is the suite's run() default, read from its signature
    assert [s["seed"] for s in doc["sources"]] == [0, 1, 2]
    knn, expected = doc["rows"]
    assert (knn["method"], knn["encoder"], knn["runs"]) == ("knn-target", "moco", 3)
    assert knn["hard@6%"]["values"] == [0.4, 0.6, 0.2] and knn["hard@6%"]["mean"] == pytest.approx(0.4)
    assert (knn["hard@6%"]["min"], knn["hard@6%"]["max"]) == (0.2, 0.6)
    assert "seconds" in knn and "seconds" not in expected  # a column some run left empty is not averaged
    ratio = doc["ratios"][0]
    # per run: 0.4/0.1, 0.6/0.1, 0.2/0.2: the lowest ratio is seed 2's, not mean/mean
    assert ratio["hard@6%"]["values"] == pytest.approx([4.0, 6.0, 1.0]) and ratio["hard@6%"]["min"] == pytest.approx(1.0)
    assert doc["left_out"] == [{"method": "knn-target", "encoder": "target"}]
    md = json_path.with_suffix(".md").read_text()
    assert "3.7x (min 1.0x)" in md and "`a.json`: seed 0" in md


@pytest.mark.parametrize("case, message", [
    ("one file", "two or more results files"),
    ("same seed", "seed 1 is in more than one file"),
    ("other options", "options images differ"),
    ("other suite", "suite 'decode', but"),
    ("not json", "not a readable results file"),
    ("no ratio row", "no row with that text in every file"),
])
def test_combine_refuses_runs_that_are_not_one_setup_at_distinct_seeds(tmp_path, capsys, case, message):
    a = _results(tmp_path / "a.json", 1, _rows(1.0, 0.4))
    b = tmp_path / "b.json"
    make_b = {"same seed": lambda: _results(b, 1, _rows(0.9, 0.5)),
              "other options": lambda: _results(b, 2, _rows(0.9, 0.5), images=64),
              "other suite": lambda: _results(b, 2, _rows(0.9, 0.5), suite="decode"),
              "not json": lambda: b.write_text("{half a file"),
              "no ratio row": lambda: _results(b, 2, _rows(0.9, 0.5))}
    if case in make_b:  # each case writes its own second file
        make_b[case]()
    files = {"one file": [a]}.get(case, [a, b])
    out = tmp_path / "out"
    extra = ["--ratio-to", "best possible"] if case == "no ratio row" else []
    rc = combine.main([*map(str, files), *extra, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()  # nothing written for a refused combination
