"""Partial initialisation (--init-blocks) and stage freezing (--train-blocks) of finetune."""

import pytest
import torch
import yaml

from clirun import one_line, run
from filterx.models.archs import build_model, list_models, model_stages
from filterx.train.partial_init import block_record, check_blocks, freeze_stages, load_stages, stage_index
from filterx.core.runtime import seed_everything
from filterx.train.common import CHECKPOINT_FORMAT, MODEL, load_checkpoint
from filterx.train.finetune import FinetuneConfig, finetune, initial_model

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 32
SMALL = {"alexnet_lrn": {"fc_dim": 32}}  # build_model kwargs that keep the tests fast
STAGES = {"resnet18": 4, "resnet34": 4, "resnet50": 4, "alexnet_lrn": 7}


def _pretrained_file(path, arch, num_classes=13):
    """A checkpoint unlike a fresh init in every tensor: weights of another seed plus an offset,
    BatchNorm statistics moved, batch counters 7 (a fresh model has 0)."""
    torch.manual_seed(123)
    model = build_model(arch, num_classes, **SMALL.get(arch, {}))
    state = {}
    for k, v in model.state_dict().items():
        state[k] = v + 0.25 + 0.1 * torch.rand_like(v) if v.is_floating_point() else torch.full_like(v, 7)
    torch.save({"filterx_checkpoint": CHECKPOINT_FORMAT, "kind": "pretrain", "arch": arch,
                "num_classes": num_classes, "model": state, "model_kwargs": SMALL.get(arch, {})}, path)
    return path, state


@pytest.fixture(scope="module", params=["resnet18", "alexnet_lrn"])
def pretrained(request, tmp_path_factory):
    arch = request.param
    path, state = _pretrained_file(tmp_path_factory.mktemp("pre") / f"{arch}.pt", arch)
    return arch, path, state


def _cfg(tmp_path, **kw):
    base = dict(target=tmp_path / "t", out=tmp_path / "o", resolution=RES, workers=0, device="cpu", quiet=True)
    return FinetuneConfig(**{**base, **kw})


def _backbone_keys(arch, state):
    head = model_stages(arch).head
    return [k for k in state if not k.startswith(head + ".")]


# ---------------------------------------------------------------- stage lists


@pytest.mark.parametrize("arch", list_models())
def test_stage_lists_cover_every_tensor_once(arch):
    layout = model_stages(arch)
    assert len(layout.stages) == STAGES[arch] and len(set(layout.names)) == len(layout.names)
    model = build_model(arch, 3, **SMALL.get(arch, {}))
    where = {k: stage_index(layout, k) for k in model.state_dict()}
    assert None not in where.values(), [k for k, v in where.items() if v is None]
    head = {k for k, v in where.items() if v == len(layout.stages) + 1}
    assert head == {f"{layout.head}.weight", f"{layout.head}.bias"}
    # every stage owns parameters; the stem does exactly when one is declared
    owners = {stage_index(layout, n) for n, _ in model.named_parameters()}
    assert owners == set(range(0 if layout.stem else 1, len(layout.stages) + 2))


def test_stage_names_are_the_literature_s():
    assert model_stages("resnet50").names == ("layer1", "layer2", "layer3", "layer4")
    assert model_stages("resnet50").stem[:2] == ("conv1", "bn1")
    assert model_stages("alexnet_lrn").names == ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")
    assert model_stages("alexnet_lrn").stem == ()


# ---------------------------------------------------------------- init_blocks


@pytest.mark.parametrize("which", ["none", "one", "all_but_one", "all"])
def test_init_blocks_take_the_stem_and_first_stages_from_the_checkpoint(pretrained, tmp_path, which):
    arch, path, ck = pretrained
    count = STAGES[arch]
    n = {"none": 0, "one": 1, "all_but_one": count - 1, "all": count}[which]
    cfg = _cfg(tmp_path, init=path, init_blocks=n, seed=4)
    seed_everything(4)
    model, got_arch, _ = initial_model(cfg, 5)
    seed_everything(4)  # the fresh init initial_model starts from
    fresh = build_model(arch, 13, **SMALL.get(arch, {})).state_dict()
    layout = model_stages(arch)
    state = model.state_dict()
    loaded = reinit = 0
    for k in _backbone_keys(arch, state):
        if stage_index(layout, k) <= n:
            assert torch.equal(state[k], ck[k]), k
            loaded += 1
        else:
            assert torch.equal(state[k], fresh[k]) and not torch.equal(state[k], ck[k]), k
            reinit += 1
    assert got_arch == arch and state[f"{layout.head}.weight"].shape[0] == 5
    assert (reinit == 0) == (n == count) and (loaded == 0) == (n == 0 and not layout.stem)


def test_init_blocks_all_stages_is_the_default(pretrained, tmp_path):
    arch, path, _ = pretrained
    states = []
    for n in (None, STAGES[arch]):
        seed_everything(2)
        states.append(initial_model(_cfg(tmp_path, init=path, init_blocks=n), 5)[0].state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_load_stages_refuses_a_checkpoint_of_another_model():
    model = build_model("resnet18", 3)
    other = build_model("resnet34", 3).state_dict()
    with pytest.raises(ValueError, match=r"does not match a resnet18: missing \[\], unexpected \['layer1.2"):
        load_stages(model, "resnet18", other, 2)


# ---------------------------------------------------------------- train_blocks


@pytest.mark.parametrize("k", [0, 1, 3])
def test_train_blocks_freeze_the_stem_and_earlier_stages(pretrained, k):
    arch, _, _ = pretrained
    layout = model_stages(arch)
    count = len(layout.stages)
    model = build_model(arch, 5, **SMALL.get(arch, {}))
    frozen = freeze_stages(model, arch, k)
    model.train()
    for m in frozen:
        m.eval()
    logits = model(torch.rand(4, 3, RES, RES))
    logits.logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        trained = stage_index(layout, name) > count - k
        assert p.requires_grad == trained and (p.grad is not None) == trained, name
        if trained and name.endswith("weight"):
            assert p.grad.abs().sum() > 0, name
    for name, m in model.named_modules():  # BatchNorm of frozen stages keeps its statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.training == (stage_index(layout, name) > count - k), name
    if k == 0 and arch == "alexnet_lrn":  # the head alone: dropout off, as for --freeze-backbone
        assert not model.dropout.training


def test_block_record_names_what_a_run_did():
    rec = block_record("resnet18", 3, 2, has_init=True)
    assert rec["loaded"] == ["stem", "layer1", "layer2", "layer3"] and rec["reinitialised"] == ["layer4"]
    assert rec["frozen"] == ["stem", "layer1", "layer2"] and rec["trained"] == ["layer3", "layer4", "fc"]
    rec = block_record("alexnet_lrn", None, None, has_init=False)
    assert rec["loaded"] == [] and rec["frozen"] == [] and rec["trained"][-1] == "fc8"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kw,message", [
    (dict(arch="resnet18", init="x", init_blocks=5), r"init_blocks 5 is out of range for resnet18: valid 0\.\.4"),
    (dict(arch="alexnet_lrn", train_blocks=8), r"train_blocks 8 is out of range for alexnet_lrn: valid 0\.\.7 "
                                               r"\(stages conv1, conv2, conv3, conv4, conv5, fc6, fc7"),
    (dict(arch="resnet18", init="x", init_blocks=1, train_blocks=2),
     r"init_blocks=1 re-initialises layer2 of resnet18 but train_blocks=2 freezes them .*>= 4"),
    (dict(arch="resnet18", init_blocks=2), r"init_blocks=2 loads stages from a pre-trained checkpoint; give init"),
    (dict(arch="resnet18", freeze_backbone=True, train_blocks=2), r"same as train_blocks=0; it contradicts"),
    (dict(arch="resnet18", init="x", freeze_backbone=True, init_blocks=3), r"init_blocks=3 re-initialises layer4"),
    (dict(arch="resnet18", method="dann", unlabeled="u", train_blocks=0), r"dann .* cannot run with a frozen"),
    (dict(arch="resnet18", train_blocks=-1), r"train_blocks must be an integer >= 0"),
])
def test_bad_block_options_are_refused_by_name(tmp_path, kw, message):
    kw = {k: tmp_path / v if k in ("init", "unlabeled") else v for k, v in kw.items()}
    with pytest.raises(ValueError, match=message):
        _cfg(tmp_path, **kw)


def test_ranges_are_checked_against_the_checkpoint_s_arch(pretrained, tmp_path):
    arch, path, _ = pretrained
    too_many = STAGES[arch] + 1
    with pytest.raises(ValueError, match=rf"init_blocks {too_many} is out of range for {arch}: valid 0\.\.{too_many - 1}"):
        initial_model(_cfg(tmp_path, init=path, init_blocks=too_many), 5)
    assert check_blocks(arch, STAGES[arch], 0, has_init=True).head == model_stages(arch).head


# ---------------------------------------------------------------- finetune runs


def test_finetune_updates_only_the_trained_stages(pretrained, sample_dirs, tmp_path):
    arch, path, ck = pretrained
    count = STAGES[arch]
    n, k = count - 1, 2  # the last stage re-initialised; the last two trained
    cfg = _cfg(tmp_path, target=sample_dirs[1], init=path, init_blocks=n, train_blocks=k, epochs=1, batch_size=8,
               backend="pil")
    finetune(cfg)
    out = load_checkpoint(cfg.out / MODEL)
    layout = model_stages(arch)
    for key in _backbone_keys(arch, ck):
        stage = stage_index(layout, key)
        if stage <= count - k:  # frozen: weights, BatchNorm statistics and counters as loaded
            assert torch.equal(out["model"][key], ck[key]), key
        elif key.endswith("weight") or "running_" in key:  # trained: moved by the steps
            assert not torch.equal(out["model"][key], ck[key]), key
    assert out["blocks"]["init_blocks"] == n and out["blocks"]["train_blocks"] == k
    assert out["blocks"]["reinitialised"] == [layout.names[-1]]
    assert out["blocks"]["trained"] == [*layout.names[-k:], layout.head]
    assert out["settings"]["init_blocks"] == n and out["settings"]["train_blocks"] == k
    # a resumed run must keep what was loaded and frozen
    with pytest.raises(ValueError, match=r"cannot resume .*train_blocks: 2 -> 3"):
        finetune(_cfg(tmp_path, target=sample_dirs[1], init=path, init_blocks=n, train_blocks=3, epochs=2,
                      batch_size=8, backend="pil", resume=True))


def test_cli_finetune_with_init_blocks_and_train_blocks(sample_dirs, tmp_path):
    path, ck = _pretrained_file(tmp_path / "pre.pt", "resnet18")
    out = tmp_path / "ft"
    code, stdout, err = run("finetune", sample_dirs[1], out, "--init", path, "--init-blocks", 3, "--train-blocks", 1,
                            "--resolution", RES, "--epochs", 1, "--batch-size", 8, "--backend", "pil",
                            "--workers", 0, "--device", "cpu", "-q")
    assert code == 0, err
    assert "test_top1" in stdout
    saved = yaml.safe_load((out / "filterx-finetune.yaml").read_text())
    assert saved["init-blocks"] == 3 and saved["train-blocks"] == 1
    model = load_checkpoint(out / MODEL)
    assert model["blocks"]["frozen"] == ["stem", "layer1", "layer2", "layer3"]
    assert all(torch.equal(model["model"][k], ck[k]) for k in ck if k.startswith(("conv1.", "bn1.", "layer3.")))
    assert not torch.equal(model["model"]["layer4.0.conv1.weight"], ck["layer4.0.conv1.weight"])

    code, _, err = run("finetune", sample_dirs[1], tmp_path / "bad", "--init", path, "--init-blocks", 6)
    assert code == 2
    assert "init_blocks 6 is out of range for resnet18: valid 0..4" in one_line(err)
    code, _, err = run("finetune", sample_dirs[1], tmp_path / "bad", "--arch", "resnet18", "--init-blocks", 2)
    assert code == 2 and "give init (--init)" in one_line(err)


def test_help_states_each_registered_arch_s_range():
    from filterx.cli.commands import main

    option = next(p for p in main.commands["finetune"].params if p.name == "init_blocks")
    for arch in list_models():
        family = "ResNets" if arch.startswith("resnet") else arch
        shown = option.help.split(family, 1)[1]
        assert shown.split("(N ", 1)[1].startswith(f"0-{STAGES[arch]}"), arch
        assert STAGES[arch] == len(model_stages(arch).stages)
