"""The command line: the chain end to end, and user errors as one line with exit status 2."""

import json
import shutil

import pytest
from clirun import run

from filterx.cli.commands import main


def test_chain_shard_score_select(image_folder, sample_dirs, encoder_file, tmp_path):
    code, out, err = run("shard", image_folder, tmp_path / "ds", "--shard-size", 10, "--workers", 1, "-q", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["num_samples"] == 27 and summary["skipped"] == 4
    shutil.copytree(sample_dirs[0], tmp_path / "src")
    code, out, err = run("score", "--method", "clustering", "--source", tmp_path / "src", "--target", sample_dirs[1],
                         "--encoder", encoder_file, "--k", 3, "--distance", "avg", "--backend", "pil",
                         "--device", "cpu", "--workers", 0, "-q")
    assert code == 0, err
    import numpy as np

    from filterx.io.dataset import Dataset
    from filterx.io.scores import read_scores

    ds = Dataset.open(tmp_path / "src")
    scores, attrs = read_scores(ds, "clustering")
    assert f"scored {ds.num_samples} of {ds.num_samples} samples with clustering" in out
    assert attrs["params"]["k"] == 3 and attrs["params"]["distance"] == "avg"  # the options reached the scorer
    assert np.isfinite(scores).all() and (scores < 0).all()  # minus a mean distance
    code, out, err = run("select", "--source", tmp_path / "src", "--method", "clustering", "--fraction", 0.25,
                         "-o", tmp_path / "subset.jsonl", "-q", "--json")
    assert code == 0, err
    lines = (tmp_path / "subset.jsonl").read_text().splitlines()
    header, rows = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    assert header["method"] == "clustering" and header["budget"] == {"fraction": 0.25}
    # the best quarter by score, best first, ties to the lower id
    best = np.lexsort((np.arange(ds.num_samples), -scores))[: round(0.25 * ds.num_samples)]
    assert [r["id"] for r in rows] == best.tolist() == [int(x) for x in best]
    assert json.loads(out)["selected"] == len(best) == header["count"]


@pytest.mark.parametrize("args, needle", [
    (["shard", "/no/such/dir", "/tmp/x"], "'/no/such/dir' does not exist"),
    (["score", "--method", "magic", "--source", "."], "unknown method 'magic'; valid methods: "),
    (["select", "--source", ".", "--method", "x", "--fraction", "1.5", "-o", "x.jsonl"], "1.5 is not in the range"),
    (["select", "--source", ".", "--method", "x", "--fraction", "0.1", "-o", "x.jsonl"], "not a filterx dataset dir"),
    (["embed", ".", "--encoder", "/no/encoder.pt"], "'/no/encoder.pt' does not exist"),
])
def test_user_errors_are_one_line(args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(*args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("filterx") and needle in lines[0], err


def test_one_class_target_is_refused(image_folder, tmp_path):
    (tmp_path / "one" / "mug").mkdir(parents=True)
    for p in sorted((image_folder / "class 0 é").glob("img_*.jpg"))[:4]:
        shutil.copy(p, tmp_path / "one" / "mug" / p.name)
    assert run("shard", tmp_path / "one", tmp_path / "ds", "-q")[0] == 0
    code, _, err = run("train-encoder", tmp_path / "ds", tmp_path / "enc.pt", "--epochs", 1, "-q")
    assert code == 2 and "1 class(es)" in err and "clustering or domain-cls" in err
    assert len(err.strip().splitlines()) == 1
    # the advice works: an encoder trained on a labelled pool scores the pool against the one class
    kw = ["--resolution", 64, "--backend", "pil", "--workers", 0, "--device", "cpu", "-q"]
    assert run("train-encoder", tmp_path / "ds", tmp_path / "enc.pt", "--epochs", 1, *kw)[0] == 2
    pool = tmp_path / "pool"
    assert run("shard", image_folder, pool, "-q")[0] == 0
    code, _, err = run("train-encoder", pool, tmp_path / "pool_enc.pt", "--epochs", 1, *kw)
    assert code == 0, err
    for method in ("clustering", "domain-cls"):
        code, out, err = run("score", "--method", method, "--source", pool, "--target", tmp_path / "ds",
                             "--encoder", tmp_path / "pool_enc.pt", *kw[2:])
        assert code == 0 and f"scored 27 of 27 samples with {method}" in out, err


def _examples(help_text: str) -> list[list[str]]:
    """The command lines under a help text's "Example(s):" heading, continuation lines joined."""
    import shlex

    body = help_text.split("Example", 1)[1].split("Options:", 1)[0]
    joined = body.replace("\\\n", " ")
    return [shlex.split(ln.strip(), comments=True)[1:] for ln in joined.splitlines()
            if ln.strip().startswith("filterx ")]


def test_every_command_help_has_an_example_that_parses():
    """Each command's examples name real options and valid choices (only their paths may be
    missing here): parsed by the command itself, as a user pasting them would."""
    import click

    for name, cmd in main.commands.items():
        code, out, _ = run(name, "--help")
        examples = _examples(out) if code == 0 and "Example" in out else []
        assert examples, name
        paths = [p.type for p in cmd.params if isinstance(p.type, click.Path) and p.type.exists]
        for t in paths:  # the examples' paths are not on this machine; everything else is checked
            t.exists = False
        try:
            for args in examples:
                assert args[0] == name, (name, args)
                ctx = cmd.make_context(name, args[1:], parent=click.Context(main))
                assert not ctx.args, (name, args)
        finally:
            for t in paths:
                t.exists = True


def test_pretrain_on_a_manifest_then_finetune(sample_dirs, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sample_dirs[0], src)
    assert run("score", "--method", "random", "--source", src, "-q")[0] == 0
    assert run("select", "--source", src, "--method", "random", "--count", 40, "-o", tmp_path / "m.jsonl", "-q")[0] == 0
    code, out, err = run("pretrain", tmp_path / "m.jsonl", tmp_path / "pre", "--arch", "resnet18", "--resolution", 32,
                         "--epochs", 1, "--batch-size", 16, "--backend", "pil", "--workers", 0, "--device", "cpu",
                         "-q", "--json")
    assert code == 0, err
    assert json.loads(out)["epochs"] == 1 and (tmp_path / "pre" / "model.pt").is_file()
    code, out, err = run("finetune", sample_dirs[1], tmp_path / "ft", "--init", tmp_path / "pre" / "model.pt",
                         "--resolution", 32, "--epochs", 1, "--batch-size", 16, "--backend", "pil", "--workers", 0,
                         "--device", "cpu", "-q")
    assert code == 0, err
    assert "test_top1" in out and f"options saved to {tmp_path / 'ft' / 'filterx-finetune.yaml'}" in out
    import yaml

    saved = yaml.safe_load((tmp_path / "ft" / "filterx-finetune.yaml").read_text())
    assert saved["init"] == str(tmp_path / "pre" / "model.pt") and saved["target"] == str(sample_dirs[1])
    assert saved["epochs"] == 1 and saved["lr"] == 0.001 and saved["schedule"] == "inv"  # unset: the defaults
    assert saved["arch"] is None and saved["method"] == "plain"


def test_manifest_of_a_missing_dataset_is_one_line(sample_dirs, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sample_dirs[0], src)
    run("score", "--method", "random", "--source", src, "-q")
    run("select", "--source", src, "--method", "random", "--count", 10, "-o", tmp_path / "m.jsonl", "-q")
    shutil.rmtree(src)
    code, _, err = run("pretrain", tmp_path / "m.jsonl", tmp_path / "pre", "--epochs", 1, "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err


def test_config_file_supplies_options_and_the_command_line_wins(dataset_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(dataset_dir, src)
    (tmp_path / "run.yaml").write_text(f"method: random\nsource: {src}\nseed: 5\nname: r5\n")
    assert run("score", "--config", tmp_path / "run.yaml", "-q")[0] == 0
    assert run("score", "--config", tmp_path / "run.yaml", "--name", "r6", "--seed", 6, "-q")[0] == 0
    from filterx.io.dataset import Dataset
    from filterx.io.scores import read_scores

    ds = Dataset.open(src)
    assert read_scores(ds, "r5")[1]["seed"] == 5 and read_scores(ds, "r6")[1]["seed"] == 6
    (tmp_path / "bad.yaml").write_text("sourcee: x\n")
    code, _, err = run("score", "--config", tmp_path / "bad.yaml")
    assert code == 2 and "'sourcee' is not an option" in err and "source" in err
