"""bench/experiment_subsets.py: the step arithmetic, the paired statistics, early stopping, the
summary, and a quick run end to end."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench.experiment_subsets import (
    ExperimentConfig, early_stop_epoch, epochs_for_steps, paired_stats, quick_config, run_experiment, summarize,
    write_results,
)


@pytest.mark.parametrize("count, epochs, steps", [(180, 50, 150), (360, 25, 150), (3000, 3, 150)])
def test_the_default_batch_gives_every_budget_exactly_the_same_steps(count, epochs, steps):
    # 6%, 12% and all of a 3000-image pool at batch 60
    assert epochs_for_steps(count, 150, 60, "torchvision") == (epochs, steps)


@pytest.mark.parametrize("count, epochs, steps", [(1800, 17, 510), (3600, 8, 480), (30000, 1, 500)])
def test_the_default_pool_gives_every_budget_the_steps_within_four_percent(count, epochs, steps):
    # 6%, 12% and all of the default 30,000-image pool at batch 60, 500 steps
    assert epochs_for_steps(count, 500, 60, "torchvision") == (epochs, steps)


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
    with pytest.raises(ValueError, match="must include random"):
        ExperimentConfig(work=Path("w"), methods=("knn-target",))
    with pytest.raises(ValueError, match="ft_val_fraction"):
        ExperimentConfig(work=Path("w"), ft_val_fraction=0.0)


def test_paired_stats_match_the_t_distribution_in_closed_form():
    # differences +5, +1, +6: mean 4, sd sqrt(7), se sqrt(7/3); with 2 dof the t distribution has
    # the closed forms sf(t) = (1 - t / sqrt(t^2 + 2)) / 2 and quantile q -> (2q - 1) sqrt(2 / (1 - (2q - 1)^2))
    s = paired_stats([5.0, 1.0, 6.0])
    se = math.sqrt(7 / 3)
    t = 4 / se
    assert s["n"] == 3 and s["mean"] == pytest.approx(4.0) and s["std"] == pytest.approx(math.sqrt(7))
    assert s["p"] == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    t975 = 0.95 * math.sqrt(2 / (1 - 0.95 ** 2))  # 4.303
    assert s["ci_high"] - 4 == pytest.approx(t975 * se, rel=1e-9) and 4 - s["ci_low"] == pytest.approx(t975 * se)
    # the CI excludes 0 exactly when p < 0.05
    for diffs in ([2.0, 2.5, 1.5, 3.0, 2.2], [2.0, -1.0, 3.0, 0.5, -0.5], [0.1, 0.2, 0.15, 0.12, 0.18, 0.11]):
        s = paired_stats(diffs)
        assert (s["ci_low"] > 0 or s["ci_high"] < 0) == (s["p"] < 0.05)


def test_paired_stats_of_one_pair_and_of_equal_differences():
    one = paired_stats([3.0])
    assert one["mean"] == 3.0 and all(math.isnan(one[k]) for k in ("std", "ci_low", "ci_high", "p"))
    same = paired_stats([2.0, 2.0, 2.0])
    assert same["std"] == 0 and same["ci_low"] == same["ci_high"] == 2.0 and same["p"] == 0.0
    assert paired_stats([0.0, 0.0])["p"] == 1.0


@pytest.mark.parametrize("val, loss, patience, max_epochs, expected", [
    ([0.5, 0.6, 0.7], [1.0, 0.9, 0.8], 2, 10, (2, False)),  # still improving
    ([0.5, 0.7, 0.6, 0.65], [1.0, 0.9, 0.8, 0.7], 2, 10, (1, True)),  # two epochs without a better top-1
    ([0.5, 0.7, 0.7, 0.7], [1.0, 0.9, 0.9, 0.95], 2, 10, (1, True)),  # equal top-1 and loss: the earliest
    ([0.5, 0.7, 0.7, 0.7], [1.0, 0.9, 0.8, 0.95], 2, 10, (2, False)),  # equal top-1, lower loss: better
    ([0.5, 0.7, 0.6], [1.0, 0.9, 0.5], 2, 3, (1, True)),  # the epoch limit; top-1 first, loss second
    ([0.9], [0.3], 1, 5, (0, False)),
])
def test_early_stopping_rule(val, loss, patience, max_epochs, expected):
    assert early_stop_epoch(val, loss, patience, max_epochs) == expected


def _run(arm, method, budget, seed, top1):
    return {"arm": arm, "method": method, "budget": budget, "seed": seed, "test_top1": top1, "seconds": 10.0 + seed,
            "pretrain_epochs": 50, "pretrain_steps": 150, "pretrain_train_top1": 0.9, "ft_best_epoch": 4 + seed}


def test_summary_gives_mean_std_values_and_the_paired_difference_with_random():
    runs = [_run("random", "random", 0.06, s, v) for s, v in enumerate((0.70, 0.72, 0.74))]
    runs += [_run("domain-cls", "domain-cls-mlp", 0.06, s, v) for s, v in enumerate((0.75, 0.73, 0.80))]
    subsets = {("random", 0.06, s): {"images": 180, "classes": c, "target_classes": t, "digits": 0.3}
               for s, c, t in ((0, 30, 0.2), (1, 29, 0.1), (2, 28, 0.3))}
    subsets[("domain-cls", 0.06, None)] = {"images": 180, "classes": 23, "target_classes": 0.43, "digits": 0.75}
    rows = {r["pre-training"]: r for r in summarize(runs, subsets, ExperimentConfig(work=Path("w")))}
    rnd, dom = rows["random"], rows["domain-cls"]
    assert rnd["top1_mean"] == pytest.approx(72.0) and rnd["top1_std"] == pytest.approx(2.0)
    assert rnd["top1_values"] == "70.0 72.0 74.0" and rnd["n"] == 3 and rnd["ft_epoch"] == pytest.approx(5.0)
    assert rnd["classes"] == pytest.approx(29.0) and rnd["target_cls_%"] == pytest.approx(20.0)
    assert "vs_random" not in rnd
    # per-seed differences +5, +1, +6: the paired statistics of the test above
    s = paired_stats([5.0, 1.0, 6.0])
    assert dom["vs_random"] == pytest.approx(4.0) and dom["diff_std"] == pytest.approx(math.sqrt(7))
    assert (dom["ci95_low"], dom["ci95_high"], dom["p"]) == pytest.approx((s["ci_low"], s["ci_high"], s["p"]))
    assert dom["top1_mean"] == pytest.approx(76.0) and dom["budget"] == "6%" and dom["seconds"] == pytest.approx(11.0)
    assert dom["pre_train_top1"] == pytest.approx(90.0)


def test_a_variant_is_paired_with_random_of_the_same_variant():
    runs = [_run("random", "random", 0.06, s, v) for s, v in enumerate((0.70, 0.72, 0.74))]
    runs += [{**_run("random [robust]", "random", 0.06, s, v), "variant": "robust"}
             for s, v in enumerate((0.50, 0.52, 0.54))]
    runs += [{**_run("knn-target (k 10) [robust]", "knn-target", 0.06, s, v), "variant": "robust"}
             for s, v in enumerate((0.55, 0.53, 0.60))]
    rows = {r["pre-training"]: r for r in summarize(runs, {}, ExperimentConfig(work=Path("w")))}
    # +5, +1, +6 against the robust random subsets (against the supervised ones it would be -15 ..)
    assert rows["knn-target (k 10) [robust]"]["vs_random"] == pytest.approx(4.0)
    assert "vs_random" not in rows["random [robust]"]


def test_quick_run_with_the_robust_and_moco_variants(tmp_path):
    cfg = quick_config(tmp_path / "work", resolution=16, test_per_class=2, classes_removed=(), seeds=(0,),
                       variants=("supervised", "robust", "moco"), ft_max_epochs=2, ft_patience=1, ft_chunk=2)
    result = run_experiment(cfg, log=lambda s: None)
    rows = {r["pre-training"]: r for r in result["rows"]}
    assert {"random [robust]", "clustering (avg) [robust]", "random [moco]", "clustering (avg) [moco]"} <= set(rows)
    runs = {r["arm"]: r for r in result["runs"]}
    assert {r["variant"] for r in result["runs"]} == {"supervised", "robust", "moco"}
    # the same subset and steps as the supervised arm; the variant changes only how it pre-trains
    for v in ("robust", "moco"):
        assert runs[f"clustering (avg) [{v}]"]["pretrain_steps"] == runs["clustering (avg)"]["pretrain_steps"]
        assert runs[f"clustering (avg) [{v}]"]["data"] == runs["clustering (avg)"]["data"]
        assert "vs_random" in rows[f"clustering (avg) [{v}]"]
    assert "pretrain_train_top1" not in runs["random [moco]"] and "pretrain_train_top1" in runs["random [robust]"]
    assert runs["random [robust]"]["pretrain_loss"] != runs["random"]["pretrain_loss"]  # on attacked batches


def _file_hashes(folder: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.jpg")}


def test_quick_run_end_to_end(tmp_path):
    """A tiny pool, two scorers, two seeds, a few steps: the protocol, the cache and the files."""
    cfg = quick_config(tmp_path / "work", resolution=24)
    result = run_experiment(cfg, log=lambda s: None)
    rows = {(r["pre-training"], r["budget"]): r for r in result["rows"]}
    assert set(rows) == {("no pre-training", "-"), ("whole pool", "100%"), ("random", "12%"),
                         ("clustering (avg)", "12%"), ("fewer classes: hardest removed", "-10% classes"),
                         ("fewer classes: random removed", "-10% classes")}
    # quick pool: 10 digit + 6 photo + 6 texture classes x 40 = 880 images; 12% = 106
    assert result["pool_images"] == rows[("whole pool", "100%")]["images"] == 880
    assert rows[("whole pool", "100%")]["steps"] == 15 and rows[("whole pool", "100%")]["epochs"] == 1
    sub = rows[("clustering (avg)", "12%")]
    assert sub["images"] == 106 and (sub["epochs"], sub["steps"]) == (2, 4) and sub["n"] == 2
    assert "vs_random" in sub and sub["ci95_low"] <= sub["vs_random"] <= sub["ci95_high"]
    assert rows[("no pre-training", "-")]["steps"] == 0
    # 10% of 22 classes: 2 removed, 800 images left; the control removes as many, others per seed
    hard, ctrl = rows[("fewer classes: hardest removed", "-10% classes")], rows[("fewer classes: random removed", "-10% classes")]
    assert hard["images"] == ctrl["images"] == 800 and hard["classes"] == ctrl["classes"] == 20
    assert "vs_random" in hard and "vs_random" not in ctrl and "vs_random" not in rows[("random", "12%")]
    controls = [s for s in result["subsets"] if s["arm"] == "fewer classes: random removed"]
    hardest = next(s for s in result["subsets"] if s["arm"] == "fewer classes: hardest removed")
    assert sorted(s["seed"] for s in controls) == [0, 1]
    for c in controls:  # the control never removes a class the treatment removes
        removed = {k for k, v in c["per_class"].items() if v == 0}
        assert len(removed) == 2 and not removed & {k for k, v in hardest["per_class"].items() if v == 0}
    assert len(result["runs"]) == 12 and len({r["seed"] for r in result["runs"]}) == 2
    for r in result["runs"]:
        assert r["test_count"] == 30 and not r["cached"]
        # a share of the 30 test images; the tested epoch is the one the rule picks from validation
        assert r["test_top1"] * 30 == pytest.approx(round(r["test_top1"] * 30))
        best, stop = early_stop_epoch(r["ft_val_top1_by_epoch"], r["ft_val_loss_by_epoch"], cfg.ft_patience,
                                      cfg.ft_max_epochs)
        assert stop and r["ft_best_epoch"] == best + 1 and r["ft_epochs_run"] == len(r["ft_val_top1_by_epoch"])
        assert r["ft_epochs_run"] <= cfg.ft_max_epochs
        assert ("pretrain_steps" in r) == (r["data"] is not None)  # only "no pre-training" skips it
    comp = next(s for s in result["subsets"] if s["arm"] == "clustering (avg)")
    assert sum(comp["per_class"].values()) == 106 and comp["classes"] == sum(v > 0 for v in comp["per_class"].values())

    work = tmp_path / "work"
    import torch

    from filterx.io.manifest import read_manifest

    # fine-tuning trains and validates on the encoder's training split, per seed, without overlap;
    # the test images are none of the target's
    enc = torch.load(work / "encoder.pt", map_location="cpu", weights_only=False)
    assert np.array_equal(read_manifest(work / "experiment" / "target-train.jsonl").ids, np.sort(enc["train_ids"]))
    assert result["target_train_images"] == len(enc["train_ids"]) == 135
    splits = work / "experiment" / "finetune-splits"
    for seed in cfg.seeds:
        train = read_manifest(splits / f"train-0.2-seed{seed}.jsonl").ids
        val = read_manifest(splits / f"val-0.2-seed{seed}.jsonl").ids
        assert not set(train) & set(val) and np.array_equal(np.sort(np.r_[train, val]), np.sort(enc["train_ids"]))
        assert len(val) == result["val_images"]
    assert not np.array_equal(read_manifest(splits / "val-0.2-seed0.jsonl").ids,
                              read_manifest(splits / "val-0.2-seed1.jsonl").ids)
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
    assert "| clustering (avg) | 12% |" in md and "center crops, no flips" in md and "0 of 12 runs taken from" in md
    md_path.unlink()
    from bench.experiment_subsets import main

    assert main(["--render", str(json_path)]) == 0 and md_path.read_text() == md


def test_fine_tuning_in_chunks_is_the_uninterrupted_run(tmp_path):
    """Early stopping resumes the run every ft_chunk epochs: with the constant lr that gives the
    same epochs as one run of as many epochs."""
    from bench.experiment_subsets import finetune_early_stopped, prepare_work

    base = quick_config(tmp_path / "work", resolution=16, test_per_class=2, ft_max_epochs=4, ft_patience=10)
    work = prepare_work(base)
    chunked = finetune_early_stopped(base, work, None, 0, tmp_path / "a")
    whole = finetune_early_stopped(ExperimentConfig(**{**base.__dict__, "ft_chunk": 4}), work, None, 0, tmp_path / "b")
    assert chunked["ft_epochs_run"] == whole["ft_epochs_run"] == 4
    assert chunked["ft_val_top1_by_epoch"] == whole["ft_val_top1_by_epoch"]
    assert (chunked["ft_best_epoch"], chunked["test_top1"]) == (whole["ft_best_epoch"], whole["test_top1"])
    import torch

    a, b = (torch.load(d / "model.pt", map_location="cpu", weights_only=False)["model"] for d in (tmp_path / "a",
                                                                                                  tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_command_line_rejects_an_unknown_method_with_status_2(capsys):
    from bench.experiment_subsets import main

    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--methods", "random,entropy", "--no-write"])
    assert exc.value.code == 2
    assert "unknown method(s) ['entropy']" in capsys.readouterr().err
