"""Saved configs (each command's options written next to its outputs, read back by --config),
summaries (--json: one strict JSON object and nothing else on stdout) and --help."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import filterx
from filterx.cli.commands import main


def run(*args, cwd=None):
    """(exit code, stdout, stderr) of ``filterx ARGS`` in-process, from ``cwd`` if given."""
    before = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(before)
    return result.exit_code, result.stdout, result.stderr


def ok(*args, cwd=None) -> dict:
    """Run with --json; the whole of stdout must be one strict JSON object."""
    code, out, err = run(*args, "-q", "--json", cwd=cwd)
    assert code == 0, err
    return json.loads(out, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c} in {out}"))


def saved(path) -> dict:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# options of a `filterx ") and f"(filterx {filterx.__version__})" in text
    return yaml.safe_load(text)


@pytest.fixture()
def scored_src(dataset_dir, tmp_path):
    """A copy of the conftest dataset with random scores stored as "r3"."""
    src = tmp_path / "src"
    shutil.copytree(dataset_dir, src)
    ok("score", "--method", "random", "--source", src, "--seed", 3, "--name", "r3")
    return src


def test_select_saves_its_options_and_they_reproduce_the_manifest(scored_src, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    # relative paths on the command line: the saved config holds them absolute
    summary = ok("select", "--source", "../src", "--method", "r3", "--fraction", 0.5, "-o", "m.jsonl",
                 "--per-class-cap", 4, cwd=work)
    manifest, config = work / "m.jsonl", work / "m.jsonl.filterx.yaml"
    assert summary["config"] == str(config) and summary["selected"] > 0 and summary["seconds"] >= 0
    values = saved(config)
    assert values == {"source": str(scored_src), "method": "r3", "output": str(manifest), "fraction": 0.5,
                      "count": None, "threshold": None, "per-class-cap": 4, "format": None, "txt-field": "key",
                      "encoder": None, "combine": None}
    assert f"# the same as: filterx select --source {scored_src} --method r3 --output {manifest} " \
           f"--fraction 0.5 --per-class-cap 4\n" in config.read_text()
    first, first_config = manifest.read_bytes(), config.read_bytes()
    manifest.unlink()
    config.rename(tmp_path / "run.yaml")
    ok("select", "--config", tmp_path / "run.yaml", cwd=tmp_path)  # another directory
    assert manifest.read_bytes() == first  # byte-identical manifest
    assert config.read_bytes() == first_config  # and the same saved options, byte for byte
    code, out, err = run("select", "--source", scored_src, "--method", "r3", "--count", 5, "-o", manifest, "-q")
    assert code == 0 and out.startswith("selected 5 of 27 scored samples") and " samples/s); " in out
    assert out.strip().endswith(f"; options saved to {config}") and len(out.strip().splitlines()) == 1
    assert saved(config)["count"] == 5 and saved(config)["fraction"] is None


def test_select_wds_saves_its_options_inside_the_directory(scored_src, tmp_path):
    summary = ok("select", "--source", scored_src, "--method", "r3", "--count", 6, "-o", tmp_path / "sub")
    assert summary["config"] == str(tmp_path / "sub" / "filterx-select.yaml") and summary["fmt"] == "wds"
    assert saved(tmp_path / "sub" / "filterx-select.yaml")["count"] == 6
    from filterx.io.manifest import read_manifest

    assert len(read_manifest(tmp_path / "sub").ids) == 6  # the extra file does not disturb the reader


def test_score_saves_its_options_in_the_dataset_and_info_report_list_them(scored_src, tmp_path):
    from filterx.io.dataset import Dataset
    from filterx.report.info import dataset_info
    from filterx.io.scores import read_scores

    config = scored_src / "configs" / "score-r3.yaml"
    values = saved(config)
    assert values["method"] == "random" and values["source"] == str(scored_src) and values["seed"] == 3
    assert values["name"] == "r3" and values["param"] == [] and values["k"] is None
    assert "quiet" not in values and "json" not in values and "verbose" not in values and "config" not in values
    first = read_scores(Dataset.open(scored_src), "r3")[0]
    shutil.rmtree(scored_src / "scores.zarr")
    ok("score", "--config", config)
    np.testing.assert_array_equal(read_scores(Dataset.open(scored_src), "r3")[0], first)

    # a class list file named relative to the working directory is saved absolute (and in UTF-8)
    (tmp_path / "drop.txt").write_text("class 1 é\n", encoding="utf-8")
    code, out, err = run("score", "--method", "class-mask", "--source", scored_src, "--classes", "@drop.txt", "-q",
                         cwd=tmp_path)
    assert code == 0, err
    config = scored_src / "configs" / "score-class-mask.yaml"
    paragraph, details = out.split("\n", 1)  # the note ends the paragraph, before the classes to check
    assert paragraph.endswith(f"; options saved to {config}") and details.startswith("classes matched")
    assert saved(config)["classes"] == f"@{tmp_path / 'drop.txt'}"

    info = dataset_info(scored_src)  # configs/ is listed, and taken for nothing else
    assert info.configs == ("score-class-mask.yaml", "score-r3.yaml")
    assert [s.name for s in info.scores] == ["class-mask", "r3"] and info.embeddings == ()
    assert f"configs      {scored_src / 'configs'}: score-class-mask.yaml, score-r3.yaml" in info.text()
    shown = ok("info", scored_src)
    assert shown["configs"] == list(info.configs) and "config" not in shown  # info saves nothing

    rep = ok("report", scored_src, "-o", tmp_path / "rep", "--grid", 0, "--method", "r3")
    assert [r["name"] for r in rep["rows"]] == ["r3"] and rep["config"] == str(tmp_path / "rep" / "filterx-report.yaml")
    assert saved(tmp_path / "rep" / "filterx-report.yaml")["method"] == ["r3"]
    code, out, _ = run("report", scored_src, "-o", tmp_path / "rep", "--grid", 0, "--method", "r3", "-q")
    assert code == 0 and "(27 scores, top 10.0% selected)" in out and " scores/s)" in out


def test_shard_saves_its_options_and_they_reproduce_the_dataset(image_folder, tmp_path):
    out = tmp_path / "ds"
    summary = ok("shard", image_folder, out, "--shard-size", 10, "--workers", 1)
    assert summary["config"] == str(out / "filterx-shard.yaml") and summary["num_samples"] == 27
    values = saved(out / "filterx-shard.yaml")
    assert values == {"src": str(image_folder), "out": str(out), "shard-size": 10, "resize-short": None,
                      "num-classes": None, "workers": 1}
    tars = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    shutil.move(out / "filterx-shard.yaml", tmp_path / "shard.yaml")
    shutil.rmtree(out)
    ok("shard", "--config", tmp_path / "shard.yaml")
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == tars
    assert (out / "filterx-shard.yaml").read_bytes() == (tmp_path / "shard.yaml").read_bytes()


def test_embed_and_target_train_scores_save_to_the_dataset_that_was_written(sample_dirs, encoder_file,
                                                                            tmp_path):
    from filterx.io.dataset import Dataset
    from filterx.stages.embed import load_encoder_tag, read_embeddings

    target = tmp_path / "target"
    shutil.copytree(sample_dirs[1], target)
    shutil.rmtree(target / "embeddings", ignore_errors=True)  # other tests' score runs embed the shared target
    tag = load_encoder_tag(encoder_file)
    fast = ("--backend", "pil", "--device", "cpu", "--workers", 0, "--batch-size", 16)
    summary = ok("embed", target, "--encoder", encoder_file, *fast)
    config = target / "configs" / f"embed-{tag}.yaml"
    assert summary["config"] == str(config) and summary["samples"] == Dataset.open(target).num_samples
    assert saved(config) == {"dataset": str(target), "encoder": str(encoder_file), "device": "cpu",
                             "backend": "pil", "batch-size": 16, "workers": 0}
    first = read_embeddings(Dataset.open(target), tag)
    shutil.rmtree(target / "embeddings")
    ok("embed", "--config", config)
    np.testing.assert_array_equal(read_embeddings(Dataset.open(target), tag), first)

    src = tmp_path / "source"
    shutil.copytree(sample_dirs[0], src)
    summary = ok("score", "--method", "influence", "--candidates", "target-train", "--labels", "given",
                 "--source", src, "--target", target, "--encoder", encoder_file, *fast)
    assert summary["config"] == str(target / "configs" / "score-influence.yaml")
    assert not (src / "configs").exists()


def test_train_encoder_saves_its_options_beside_the_file(sample_dirs, tmp_path):
    from filterx.train.encoder import EncoderSummary

    out = tmp_path / "enc.pt"
    summary = ok("train-encoder", sample_dirs[1], out, "--resolution", 64, "--epochs", 1, "--batch-size", 32,
                 "--backend", "pil", "--device", "cpu", "--workers", 0)
    config = tmp_path / "enc.pt.filterx.yaml"
    assert summary.pop("config") == str(config) and summary["epochs"] == 1 and summary["train_seconds"] > 0
    assert saved(config) == {"target": str(sample_dirs[1]), "out": str(out), "arch": "resnet18", "resolution": "64",
                             "epochs": 1, "lr": 0.1, "weight-decay": 5e-4, "val-fraction": 0.1, "backbone": None,
                             "probe-only": False, "objective": "supervised", "with-pool": None, "init": None, "seed": 0, "device": "cpu", "backend": "pil", "batch-size": 32,
                             "width": None, "stem": None,
                             "workers": 0}
    line = EncoderSummary(**summary).line()  # the JSON holds every field of the summary
    rate = summary["train_count"] / summary["train_seconds"]
    assert line.startswith(f"trained {summary['tag']} for 1 epochs on {summary['train_count']} target images in ")
    assert f"({rate:.0f} img/s in training)" in line and line.endswith(f"saved to {out}")


def test_pretrain_saves_the_literature_defaults_it_used(sample_dirs, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sample_dirs[0], src)
    ok("score", "--method", "random", "--source", src)
    ok("select", "--source", src, "--method", "random", "--count", 24, "-o", tmp_path / "m.jsonl")
    args = ("pretrain", tmp_path / "m.jsonl", tmp_path / "pre", "--arch", "resnet18", "--resolution", 16,
            "--epochs", 1, "--batch-size", 12, "--backend", "pil", "--workers", 0, "--device", "cpu")
    summary = ok(*args)
    config = tmp_path / "pre" / "filterx-pretrain.yaml"
    assert summary["config"] == str(config)
    values = saved(config)
    assert values["epochs"] == 1 and values["batch-size"] == 12  # given
    assert values["schedule"] == "step" and values["val-fraction"] == 0.0  # defaults
    assert values["lr"] is None  # unset: the arch's (filterx.train.pretrain.default_lr), also when read back
    assert values["data"] == str(tmp_path / "m.jsonl") and values["resume"] is False
    last = json.loads((tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()[-1])
    shutil.move(config, tmp_path / "pre.yaml")
    shutil.rmtree(tmp_path / "pre")
    code, out, err = run("pretrain", "--config", tmp_path / "pre.yaml", "-q")
    assert code == 0, err
    assert "24 images per epoch" in out and " img/s; final loss " in out and "metrics.jsonl beside it" in out
    again = json.loads((tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()[-1])
    assert again["loss"] == last["loss"] and again["images"] == last["images"] == 24
    assert config.read_bytes() == (tmp_path / "pre.yaml").read_bytes()


def test_demo_saves_its_options_in_its_directory(tmp_path, monkeypatch):
    """The CLI's part only: the chain itself is run by test_demo / `make demo`."""
    import filterx.stages.demo
    from filterx.stages.demo import DemoSummary

    got = []
    rows = [{"label": "random", "selected": 30, "precision": 0.2, "domain_precision": 0.3, "seconds": 0.1}]
    monkeypatch.setattr(filterx.stages.demo, "run_demo",
                        lambda cfg: got.append(cfg) or DemoSummary(cfg.out, 0.2, 0.3, 0.7, rows, 12.0))
    summary = ok("demo", "--out", "d", "--quick", "--epochs", 3, cwd=tmp_path)
    assert summary["config"] == str(tmp_path / "d" / "filterx-demo.yaml") and got[0].epochs == 3 and got[0].quick
    assert saved(tmp_path / "d" / "filterx-demo.yaml") == {"out": str(tmp_path / "d"), "epochs": 3, "fraction": 0.1,
                                                           "seed": 0, "quick": True, "device": "auto"}
    assert "# the same as: filterx demo --out " + str(tmp_path / "d") + " --epochs 3 --quick\n" in \
        (tmp_path / "d" / "filterx-demo.yaml").read_text()


def _configs():
    from filterx.train.encoder import EncoderConfig
    from filterx.train.pretrain import FinetuneConfig, PretrainConfig

    return {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "train-encoder": EncoderConfig}


# Options of the trainers' commands that set no field of the command's config (-q sets quiet).
CLI_ONLY = {"pretrain": {"verbose", "as_json", "config"},
            "finetune": {"verbose", "as_json", "config"},
            "train-encoder": {"verbose", "as_json", "config", "backbone", "probe_only", "objective", "with_pool",
                              "width", "stem"}}  # --width / --stem: together the config's model_options


@pytest.mark.parametrize("command", ["pretrain", "finetune", "train-encoder"])
def test_training_defaults_shown_in_help_are_the_configs(command):
    """Every option of pretrain / finetune / train-encoder that sets a config field stands, when
    not given, for that field's default, and --help shows it."""
    import click

    from filterx.cli.params import ConfigOption

    cmd = main.commands[command]
    fields = {f.name: f for f in dataclasses.fields(_configs()[command])}
    ctx = click.Context(cmd, info_name=command)
    checked = set()
    for p in cmd.params:
        if p.name in CLI_ONLY[command]:
            assert p.name not in fields, p.name
            continue
        assert p.name in fields, f"{command} {p.opts}: no field {p.name!r} of its config, nor in CLI_ONLY"
        f = fields[p.name]
        if isinstance(p, click.Argument):
            assert f.default is dataclasses.MISSING, p.name  # required on both sides
            continue
        value = p.get_default(ctx)
        value = None if value is click.core.UNSET else value
        if isinstance(p, ConfigOption) and p.unset:
            assert value is None, p.name  # left unset: the config (or a recipe) fills it in
            value = p.saved_default()
        if f.default is dataclasses.MISSING:  # a default_factory: the machine decides; the help says how
            assert f.default_factory is not dataclasses.MISSING and value is None, p.name
            assert isinstance(p.show_default, str), p.name
            continue
        want = str(f.default) if isinstance(p.type, click.Choice) and f.default is not None else f.default
        assert value == want and type(value) is type(want), (command, p.name, value, f.default)
        extra = p.get_help_extra(ctx)
        if isinstance(p.show_default, str):
            assert p.show_default in extra["default"], p.name  # a plain option's is in parentheses
        elif f.default not in (None, False):
            assert extra["default"] == str(f.default), (command, p.name, extra)
        checked.add(p.name)
    assert {"epochs", "seed", "backend", "device"} <= checked


def test_a_changed_config_default_changes_help_and_parsed_value(tmp_path, monkeypatch):
    import filterx.train.encoder
    import filterx.train.finetune
    import filterx.train.pretrain

    @dataclasses.dataclass(frozen=True)
    class Pretrain(filterx.train.pretrain.PretrainConfig):
        epochs: int = 7
        moco_momentum: float = 0.5

    @dataclasses.dataclass(frozen=True)
    class Finetune(filterx.train.finetune.FinetuneConfig):
        pseudo_threshold: float = 0.25

    @dataclasses.dataclass(frozen=True)
    class Encoder(filterx.train.encoder.EncoderConfig):
        resolution: int = 64
        workers: int = 5

    got = []
    monkeypatch.setattr(filterx.train.pretrain, "PretrainConfig", Pretrain)
    monkeypatch.setattr(filterx.train.finetune, "FinetuneConfig", Finetune)
    monkeypatch.setattr(filterx.train.pretrain, "FinetuneConfig", Finetune)
    monkeypatch.setattr(filterx.train.encoder, "EncoderConfig", Encoder)
    for command, shown in (("pretrain", ["[default: 7;", "[default: 0.5;"]), ("finetune", ["[default: 0.25;"]),
                           ("train-encoder", ["[default: 64]", "[default: 5;"])):
        code, out, _ = run(command, "--help")
        assert code == 0
        text = " ".join(out.split())
        assert all(s in text for s in shown), (command, text)

    class Parsed(Exception):
        pass

    def grab(cfg):
        got.append(cfg)
        raise Parsed

    monkeypatch.setattr(filterx.train.pretrain, "pretrain", grab)
    monkeypatch.setattr(filterx.train.pretrain, "finetune", grab)
    monkeypatch.setattr(filterx.train.encoder, "train_encoder", grab)
    data = tmp_path / "d"
    data.mkdir()
    for args in (["pretrain", data, tmp_path / "o"], ["finetune", data, tmp_path / "f", "--arch", "resnet18"],
                 ["train-encoder", data, tmp_path / "e.pt"]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert isinstance(result.exception, Parsed), result.output
    assert (got[0].epochs, got[0].moco_momentum) == (7, 0.5)
    assert got[1].pseudo_threshold == 0.25
    assert (got[2].resolution, got[2].workers) == (64, 5)


def test_scorer_defaults_shown_in_help_are_the_registry_s():
    from filterx.scorers import get_scorer

    shown = {p.name: p.show_default for p in main.commands["score"].params if isinstance(p.show_default, str)}
    from filterx.scorers import all_scorers

    registry = {}  # option -> the default of the scorers that declare it (variants too: --on pixels' own)
    for scorer in all_scorers():
        for name in scorer.options:
            if scorer.choose_by and name == scorer.choose_by[0]:
                # a choosing option (--params, --on): its own value, or auto where the method has choose_auto
                registry[name + "_"] = "auto" if scorer.choose_auto else scorer.choose_by[1]
            else:
                registry.setdefault(name, scorer.defaults[name])
    for name, text in shown.items():
        if name in ("val_classes", "k", "folds"):
            continue
        assert str(registry[name]) == text, name
    # --k serves three methods, each with its own default, named in its help
    k_help = next(p.help for p in main.commands["score"].params if p.name == "k")
    assert shown["k"] == "per method" and f"({get_scorer('clustering').defaults['k']})" in k_help
    assert f"({get_scorer('knn-target').defaults['k']})" in k_help
    # --folds: domain-cls's and entropy --head outlier-exposure's
    folds_help = next(p.help for p in main.commands["score"].params if p.name == "folds")
    assert shown["folds"] == "per method"
    assert f"domain-cls: cross-fitting folds ({get_scorer('domain-cls').defaults['folds']})" in folds_help
    assert f"entropy: cross-fitting folds ({get_scorer('entropy/outlier-exposure').defaults['folds']})" in folds_help


def test_json_summary_is_the_only_thing_on_stdout_of_a_real_process(scored_src, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "filterx", "select", "--source", str(scored_src), "--method", "r3",
                           "--fraction", "0.3", "-o", str(tmp_path / "m.npy"), "--json", "-v"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["fmt"] == "npy" and summary["config"] == str(tmp_path / "m.npy.filterx.yaml")
    assert proc.stdout.count("\n") == 1


def test_nan_in_a_summary_is_null_in_json(tmp_path):
    from filterx.cli.common import plain_json

    got = plain_json({"a": float("nan"), "b": (np.float32(1.5), float("inf")), "c": np.int64(3),
                       "d": np.array([0.5, np.nan]), 1: tmp_path, "e": True})
    assert got == {"a": None, "b": [1.5, None], "c": 3, "d": [0.5, None], "1": str(tmp_path), "e": True}
    json.dumps(got, allow_nan=False)


def test_every_help_is_readable_in_80_columns():
    commands = ["", *main.commands]
    for name in commands:
        code, out, _ = run(*([name] if name else []), "--help")
        assert code == 0
        wide = [line for line in out.splitlines() if len(line) > 80]
        assert not wide, (name, wide)
    for name, cmd in main.commands.items():
        _, out, _ = run(name, "--help")
        assert "Example" in out, name
        missing = [p.name for p in cmd.params if p.param_type_name == "option" and not p.help]
        assert not missing, (name, missing)
        where = {"shard": "OUT/filterx-shard.yaml", "train-encoder": "OUT.filterx.yaml",
                 "embed": "DATASET/configs/embed-<encoder tag>.yaml", "score": "SOURCE/configs/score-NAME.yaml",
                 "select": "OUTPUT.filterx.yaml (wds: OUTPUT/filterx-select.yaml)",
                 "pretrain": "OUT/filterx-pretrain.yaml", "finetune": "OUT/filterx-finetune.yaml",
                 "report": "OUTPUT/filterx-report.yaml", "demo": "OUT/filterx-demo.yaml"}.get(name)
        if where is None:  # info
            assert "saves no options" in " ".join(out.split())
            continue
        assert f"\n  Saves its options to: {where}" in out, name  # where the options are saved, in one place
