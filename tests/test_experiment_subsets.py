"""bench/experiment_subsets.py: the step arithmetic, the summary, and a quick run end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from bench.experiment_subsets import ExperimentConfig, epochs_for_steps, quick_config, run_experiment, summarize, write_results


@pytest.mark.parametrize("count, epochs, steps", [(180, 50, 150), (360, 25, 150), (3000, 3, 150)])
def test_the_default_batch_gives_every_budget_exactly_the_same_steps(count, epochs, steps):
    # 6%, 12% and all of the 3000-image demo pool at batch 60
    assert epochs_for_steps(count, 150, 60, "torchvision") == (epochs, steps)


def test_steps_round_to_whole_epochs_and_never_to_zero():
    # 880 images at batch 60: 14 full batches + one of 40 = 15 steps per epoch
    assert epochs_for_steps(880, 4, 60, "torchvision") == (1, 15)
    assert epochs_for_steps(880, 40, 60, "torchvision") == (3, 45)
    # a last batch of one image is dropped (BatchNorm cannot train on it)
    assert epochs_for_steps(61, 10, 60, "torchvision") == (10, 10)


def test_config_names_the_bad_method():
    with pytest.raises(ValueError, match="unknown method.*'entropy'.*valid: random"):
        ExperimentConfig(work=Path("w"), methods=("random", "entropy"))
    with pytest.raises(ValueError, match="budgets must be fractions"):
        ExperimentConfig(work=Path("w"), budgets=(6,))


def _run(arm, method, budget, seed, top1):
    return {"arm": arm, "method": method, "budget": budget, "seed": seed, "test_top1": top1, "seconds": 10.0 + seed,
            "pretrain_epochs": 50, "pretrain_steps": 150}


def test_summary_gives_mean_std_values_and_the_paired_difference_with_random():
    runs = [_run("random", "random", 0.06, s, v) for s, v in enumerate((0.70, 0.72, 0.74))]
    runs += [_run("domain-cls", "domain-cls-mlp", 0.06, s, v) for s, v in enumerate((0.75, 0.73, 0.80))]
    subsets = {("random", 0.06, s): {"images": 180, "classes": c, "target_classes": t, "digits": 0.3}
               for s, c, t in ((0, 30, 0.2), (1, 29, 0.1), (2, 28, 0.3))}
    subsets[("domain-cls", 0.06, None)] = {"images": 180, "classes": 23, "target_classes": 0.43, "digits": 0.75}
    rows = {r["pre-training"]: r for r in summarize(runs, subsets, ExperimentConfig(work=Path("w")))}
    rnd, dom = rows["random"], rows["domain-cls"]
    assert rnd["top1_mean"] == pytest.approx(72.0) and rnd["top1_std"] == pytest.approx(2.0)
    assert rnd["top1_values"] == "70.0 72.0 74.0"
    assert rnd["classes"] == pytest.approx(29.0) and rnd["target_cls_%"] == pytest.approx(20.0)
    assert "vs_random" not in rnd
    # per-seed differences +5, +1, +6: mean 4.0, sample std 2.65
    assert dom["vs_random"] == "+4.0 ± 2.6"
    assert dom["top1_mean"] == pytest.approx(76.0) and dom["budget"] == "6%" and dom["seconds"] == pytest.approx(11.0)


def _file_hashes(folder: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.jpg")}


def test_quick_run_end_to_end(tmp_path, monkeypatch):
    """The demo's quick data with two scorers (the others take minutes), one seed, a few steps."""
    import filterx.stages.demo

    monkeypatch.setattr(filterx.stages.demo, "VARIANTS", (("random", "random", {}),
                                                   ("clustering (avg)", "clustering", {"k": 50, "distance": "avg"})))
    cfg = quick_config(tmp_path / "work", demo_epochs=1, resolution=24)
    result = run_experiment(cfg, log=lambda s: None)
    rows = {(r["pre-training"], r["budget"]): r for r in result["rows"]}
    assert set(rows) == {("no pre-training", "-"), ("whole pool", "100%"), ("random", "12%"),
                         ("clustering (avg)", "12%")}
    # quick pool: 10 digit + 6 photo + 6 texture classes x 40 = 880 images; 12% = 106
    assert rows[("whole pool", "100%")]["images"] == 880
    assert rows[("whole pool", "100%")]["steps"] == 15 and rows[("whole pool", "100%")]["epochs"] == 1
    sub = rows[("clustering (avg)", "12%")]
    assert sub["images"] == 106 and (sub["epochs"], sub["steps"]) == (2, 4)
    assert rows[("no pre-training", "-")]["steps"] == 0
    for r in result["runs"]:
        assert r["test_count"] == 30 and not r["cached"]
        # a share of the 30 test images, the last epoch's; the val-chosen epoch's is one of the epochs'
        assert r["test_top1"] * 30 == pytest.approx(round(r["test_top1"] * 30))
        assert r["test_top1"] == r["test_top1_by_epoch"][-1]
        assert r["test_top1_at_best_val"] in r["test_top1_by_epoch"]
        assert ("pretrain_steps" in r) == (r["data"] is not None)  # only "no pre-training" skips it
    comp = next(s for s in result["subsets"] if s["arm"] == "clustering (avg)")
    assert sum(comp["per_class"].values()) == 106 and comp["classes"] == sum(v > 0 for v in comp["per_class"].values())

    work = tmp_path / "work"
    # fine-tuning trains on the encoder's training split; the test images are none of the target's
    import torch

    from filterx.io.manifest import read_manifest

    enc = torch.load(work / "encoder.pt", map_location="cpu", weights_only=False)
    assert np.array_equal(read_manifest(work / "experiment" / "target-train.jsonl").ids, np.sort(enc["train_ids"]))
    assert result["target_train_images"] == len(enc["train_ids"]) == 135
    test_files, target_files = _file_hashes(work / "data-test" / "target"), _file_hashes(work / "data" / "target")
    assert len(test_files) == 30 and not test_files & target_files

    # a re-run takes every run from the cache, with the same numbers
    again = run_experiment(cfg, log=lambda s: None)
    assert all(r["cached"] for r in again["runs"])
    assert [r["test_top1"] for r in again["runs"]] == [r["test_top1"] for r in result["runs"]]

    from bench.suite import machine_description

    import datetime as dt

    json_path, md_path = write_results(tmp_path / "out", result, cfg, machine_description(), "cmd", dt.datetime(2026, 1, 2, 3, 4))
    assert json_path.name.startswith("subsets-quick_") and json_path.name.endswith("_20260102-0304.json")
    doc = json.loads(json_path.read_text())
    assert [r["pre-training"] for r in doc["rows"]] == [r["pre-training"] for r in result["rows"]]
    md = md_path.read_text()
    assert "| clustering (avg) | 12% |" in md and "center crops, no flips" in md and "0 of 4 runs taken from" in md
    md_path.unlink()
    from bench.experiment_subsets import main

    assert main(["--render", str(json_path)]) == 0 and md_path.read_text() == md


def test_command_line_rejects_an_unknown_method_with_status_2(capsys):
    from bench.experiment_subsets import main

    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--methods", "random,entropy", "--no-write"])
    assert exc.value.code == 2
    assert "unknown method(s) ['entropy']" in capsys.readouterr().err
