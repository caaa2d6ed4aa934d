"""Pretrained backbones as encoders (filterx.models.backbones, filterx.models.backbone_libs, filterx.stages.probe).

No pretrained weights can be downloaded here, so every model is the smallest real config of its
library with random weights: seeded random init (``:none``) or a state dict written to
tmp_path, read back as a user's weights file (``@FILE``). Embeddings made through
``filterx embed --encoder SPEC`` are compared with the library model's own output on the
images filterx's loader preprocessed.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from filterx.models import backbones
from filterx.cli.commands import main
from filterx.io.dataset import Dataset
from filterx.stages.embed import read_embeddings
from filterx.models.encoder import load_encoder, read_encoder_file
from filterx.math.splits import stratified_split
from filterx.decode.loader import LoaderConfig, load_batches

RUN = ("--device", "cpu", "--backend", "pil", "--workers", "0", "-q")


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def ds(dataset_dir, tmp_path_factory):
    """A private copy of the 27-image test dataset (embed writes into it)."""
    dst = tmp_path_factory.mktemp("bb") / "ds"
    shutil.copytree(dataset_dir, dst)
    return dst


def loader_outputs(root, spec: str, fn) -> np.ndarray:
    """(N, D) float32: ``fn`` on the images the loader makes with ``spec``'s preprocessing, by id."""
    pre, _ = backbones.describe(backbones.parse_spec(spec))
    cfg = LoaderConfig(resolution=pre.resolution, crop_fraction=pre.crop_fraction, mean=pre.mean, std=pre.std,
                       backend="pil", device="cpu", batch_size=32, workers=0)
    d = Dataset.open(root)
    ids, outs = [], []
    with torch.inference_mode():
        for b in load_batches(d.tar_paths(), cfg):
            ids.append(b.ids)
            outs.append(fn(b.images).float())
    out = torch.cat(outs).numpy()
    ref = np.full((d.num_samples, out.shape[1]), np.nan, dtype=np.float32)
    ref[torch.cat(ids).numpy()] = out
    return ref


def embed_and_read(root, spec: str, tag: str) -> np.ndarray:
    code, out, err = cli("embed", root, "--encoder", spec, *RUN)
    assert code == 0, err
    return read_embeddings(Dataset.open(root), tag)


def assert_float16_close(emb: np.ndarray, ref: np.ndarray) -> None:
    # the store is float16: ~1e-3 relative, plus a floor for features near zero
    np.testing.assert_allclose(emb, ref, rtol=2e-3, atol=2e-3 * float(np.abs(ref).max()))


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize("text, canonical", [
    ("torchvision:resnet50:IMAGENET1K_V2", "torchvision:resnet50:IMAGENET1K_V2"),
    ("torchvision:resnet18:NONE", "torchvision:resnet18:none"),
    ("timm:vit_small_patch16_224", "timm:vit_small_patch16_224"),
    ("open_clip:ViT-B-32:laion2b_s34b_b79k", "open_clip:ViT-B-32:laion2b_s34b_b79k"),
])
def test_specs_parse_to_their_canonical_form(text, canonical):
    assert backbones.parse_spec(text).text == canonical


def test_a_weights_file_is_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "w.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    spec = backbones.parse_spec("timm:resnet18@w.pt")
    assert spec.file == str(tmp_path / "w.pt") and spec.text == f"timm:resnet18@{tmp_path / 'w.pt'}"


@pytest.mark.parametrize("spec, says", [
    ("torch:resnet18", "torchvision:MODEL"),  # not a library
    ("timm:", "torchvision:MODEL"),  # no model
    ("torchvision:resnet18:a:b", "torchvision:MODEL"),  # too many parts
    ("open_clip:ViT-S-32", "pretrained tag"),  # open_clip needs a tag
    ("torchvision:resnet18:none@{file}", "contradict"),
    ("torchvision:resnet18@/no/such/weights.pt", "does not exist"),
    ("torchvision:resnet181:none", "close: resnet18"),
    ("torchvision:resnet18:IMAGENET1K_V9", "valid: IMAGENET1K_V1, DEFAULT, none"),
])
def test_bad_specs_are_one_line_exit_2(ds, tmp_path, spec, says):
    (tmp_path / "w.pt").write_bytes(b"x")
    code, out, err = cli("embed", ds, "--encoder", spec.format(file=tmp_path / "w.pt"), *RUN)
    assert code == 2 and err.count("\n") == 1 and err.startswith("filterx embed: error:"), err
    assert says in err and "Traceback" not in err


def test_a_missing_library_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'filterx\[open_clip\]'"):
        backbones.describe(backbones.parse_spec("open_clip:ViT-S-32:none"))


# ---------------------------------------------------------------- torchvision


def test_torchvision_weights_file_embeds_as_the_library_model(ds, tmp_path):
    import torchvision

    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None)
    f = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), f)
    spec = f"torchvision:resnet18@{f}"
    tag = f"torchvision-resnet18-file{backbones.file_sha256(f)[:10]}-r224"
    assert backbones.describe(backbones.parse_spec(spec)) [1] == tag

    # preprocessing: the transforms of the model's default weights, mapped onto the loader
    pre, _ = backbones.describe(backbones.parse_spec(spec))
    t = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    assert (pre.resolution, pre.resize_size, pre.mean, pre.std) == (t.crop_size[0], t.resize_size[0], tuple(t.mean),
                                                                    tuple(t.std))
    assert LoaderConfig(resolution=pre.resolution, crop_fraction=pre.crop_fraction).resize_size == 256

    emb = embed_and_read(ds, spec, tag)
    model.fc = torch.nn.Identity()  # torchvision's penultimate features
    ref = loader_outputs(ds, spec, model.eval())
    assert emb.shape == (27, 512)
    assert_float16_close(emb, ref)

    # the file is really loaded: other weights, other tag and other embeddings; same bytes, same tag
    state = torch.load(f, weights_only=True)
    state["layer4.1.conv2.weight"] *= 1.5
    f2 = tmp_path / "perturbed.pt"
    torch.save(state, f2)
    tag2 = backbones.describe(backbones.parse_spec(f"torchvision:resnet18@{f2}"))[1]
    assert tag2 != tag
    emb2 = embed_and_read(ds, f"torchvision:resnet18@{f2}", tag2)
    assert np.abs(emb2 - emb).max() > 0.05 * np.abs(emb).max()
    copy = tmp_path / "elsewhere" / "same.pt"
    copy.parent.mkdir()
    shutil.copy(f, copy)
    assert backbones.describe(backbones.parse_spec(f"torchvision:resnet18@{copy}"))[1] == tag


def test_a_weights_file_of_another_model_is_one_clear_error(ds, tmp_path):
    import torchvision

    f = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), f)
    code, out, err = cli("embed", ds, "--encoder", f"torchvision:resnet18@{f}", *RUN)
    assert code == 2 and err.count("\n") == 1 and "does not fit torchvision:resnet18" in err, err


def test_random_init_is_seeded_and_named():
    a, b = load_encoder("torchvision:resnet18:none"), load_encoder("torchvision:resnet18:none")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(a.features(x), b.features(x))
    assert a.tag == "torchvision-resnet18-none-r224" and a.head is None


# ---------------------------------------------------------------- timm


def test_timm_weights_file_embeds_as_the_library_model(ds, tmp_path):
    timm = pytest.importorskip("timm")
    from timm.data import resolve_data_config

    torch.manual_seed(2)
    model = timm.create_model("test_vit", pretrained=False).eval()
    f = tmp_path / "test_vit.pt"
    torch.save(model.state_dict(), f)
    spec = f"timm:test_vit@{f}"
    pre, tag = backbones.describe(backbones.parse_spec(spec))
    assert tag == f"timm-test_vit-file{backbones.file_sha256(f)[:10]}-r160"
    data = resolve_data_config({}, model=model)
    assert (pre.resolution, pre.mean, pre.std) == (data["input_size"][1], data["mean"], data["std"])
    assert pre.resize_size == int(data["input_size"][1] / data["crop_pct"])  # timm: floor(size / crop_pct)
    assert any("bicubic" in n for n in pre.notes)  # the approximation is said

    emb = embed_and_read(ds, spec, tag)
    ref = loader_outputs(ds, spec, lambda x: model.forward_head(model.forward_features(x), pre_logits=True))
    assert_float16_close(emb, ref)

    state = {k: v * 1.1 if k.endswith("qkv.weight") else v for k, v in model.state_dict().items()}
    f2 = tmp_path / "other.pt"
    torch.save(state, f2)
    x = torch.randn(3, 3, 160, 160)
    with torch.inference_mode():
        a = load_encoder(spec).features(x)
        b = load_encoder(f"timm:test_vit@{f2}").features(x)
    assert load_encoder(f"timm:test_vit@{f2}").tag != tag and (a - b).abs().max() > 1e-3


def test_timm_random_init_is_seeded():
    pytest.importorskip("timm")
    a, b = load_encoder("timm:test_vit:none"), load_encoder("timm:test_vit:none")
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        assert torch.equal(a.features(x), b.features(x))
    assert a.tag == "timm-test_vit-none-r160"


# ---------------------------------------------------------------- open_clip


def test_open_clip_weights_file_embeds_as_encode_image(ds, tmp_path):
    open_clip = pytest.importorskip("open_clip")

    torch.manual_seed(3)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-S-32", pretrained=None)
    model.eval()
    f = tmp_path / "vit-s-32.pt"
    torch.save(model.state_dict(), f)
    spec = f"open_clip:ViT-S-32@{f}"
    pre, tag = backbones.describe(backbones.parse_spec(spec))
    assert tag == f"open_clip-ViT-S-32-file{backbones.file_sha256(f)[:10]}-r224"
    norm = [t for t in preprocess.transforms if type(t).__name__ == "Normalize"][0]
    crop = [t for t in preprocess.transforms if type(t).__name__ == "CenterCrop"][0]
    assert (pre.mean, pre.std, pre.resolution, pre.resize_size) == (tuple(norm.mean), tuple(norm.std),
                                                                    crop.size[0], crop.size[0])
    emb = embed_and_read(ds, spec, tag)
    ref = loader_outputs(ds, spec, lambda x: model.encode_image(x, normalize=True))
    assert_float16_close(emb, ref)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)  # L2-normalised


# ---------------------------------------------------------------- the probe


def test_fit_linear_probe_is_the_regularised_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    from filterx.stages.probe import fit_linear_probe

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    x = rng.normal(size=(90, 5)) + 2.0 * np.eye(3, 5)[y]
    wd = 1e-2
    w, b, stats = fit_linear_probe(x, y, 3, wd, tol=1e-9)
    assert stats["grad_norm"] < 1e-6 and w.shape == (3, 5)
    # sklearn: 1/2 ||θ||² + C Σ CE  ==  n C (mean CE + 1/(2 n C) ||θ||²): C = 1 / (wd n); the bias as a
    # constant feature so that it is penalised too, as in influence's objective
    ref = LogisticRegression(C=1 / (wd * 90), fit_intercept=False, tol=1e-12, max_iter=10000)
    ref.fit(np.hstack([x, np.ones((90, 1))]), y)
    np.testing.assert_allclose(np.hstack([w, b[:, None]]), ref.coef_, atol=1e-4)
    # a class of the target with no image keeps an output, pushed below the others
    w4, b4, _ = fit_linear_probe(x, y, 4, wd)
    assert w4.shape == (4, 5) and b4[3] < b4[:3].min()


def test_fit_linear_probe_needs_weight_decay():
    from filterx.stages.probe import fit_linear_probe

    with pytest.raises(ValueError, match="weight decay > 0"):
        fit_linear_probe(np.zeros((4, 2)), np.array([0, 0, 1, 1]), 2, 0.0)


@pytest.fixture(scope="module")
def probe_run(sample_dirs, tmp_path_factory):
    """A probe on a seeded random-init backbone (timm's test_vit where timm is installed)."""
    root = tmp_path_factory.mktemp("probe")
    src, tgt = root / "source", root / "target"
    shutil.copytree(sample_dirs[0], src)
    shutil.copytree(sample_dirs[1], tgt)
    spec = "timm:test_vit:none" if _has("timm") else "torchvision:resnet18:none"
    out = root / "probe.pt"
    code, stdout, err = cli("train-encoder", tgt, out, "--backbone", spec, "--probe-only", "--json", *RUN)
    assert code == 0, err
    return src, tgt, spec, out, json.loads(stdout)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_probe_file_records_spec_head_and_split(probe_run):
    src, tgt, spec, out, summary = probe_run
    info = read_encoder_file(out)
    target = Dataset.open(tgt)
    train, val = stratified_split(target.labels, 0.1, 0)
    assert info["backbone"]["spec"] == spec and info["tag"] == backbones.describe(backbones.parse_spec(spec))[1]
    assert info["train_ids"] == train.tolist() and info["val_ids"] == val.tolist() and len(val) > 0
    assert info["state_dict"]["fc.weight"].shape == (target.num_classes, info["feature_dim"])
    assert info["config"]["weight_decay"] == 5e-4  # what influence's Hessian takes

    # the held-out accuracy reported is the head's on the stored held-out embeddings
    enc = load_encoder(out)
    emb = read_embeddings(target, enc.tag)
    with torch.inference_mode():
        pred = enc.head(torch.from_numpy(emb[val])).argmax(1).numpy()
    assert summary["val_count"] == len(val)
    assert summary["val_acc"] == pytest.approx(float((pred == target.labels[val]).mean()))
    # and the head is the minimiser of the objective the file records
    W = info["state_dict"]["fc.weight"].double().requires_grad_()
    b = info["state_dict"]["fc.bias"].double().requires_grad_()
    x, y = torch.from_numpy(emb[train]).double(), torch.from_numpy(target.labels[train])
    loss = torch.nn.functional.cross_entropy(x @ W.T + b, y) + 2.5e-4 * (W.pow(2).sum() + b.pow(2).sum())
    loss.backward()
    assert max(W.grad.abs().max(), b.grad.abs().max()) < 1e-5


def test_probe_gives_entropy_scores(probe_run):
    from filterx.io.scores import read_scores

    src, tgt, spec, out, _ = probe_run
    code, stdout, err = cli("score", "--method", "entropy", "--source", src, "--target", tgt, "--encoder", out, *RUN)
    assert code == 0, err
    source = Dataset.open(src)
    scores, attrs = read_scores(source, "entropy")
    info = read_encoder_file(out)
    assert attrs["encoder"]["tag"] == info["tag"]
    emb = torch.from_numpy(read_embeddings(source, info["tag"])).double()
    p = torch.softmax(emb @ info["state_dict"]["fc.weight"].double().T + info["state_dict"]["fc.bias"].double(), 1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(1).numpy()
    np.testing.assert_allclose(scores, entropy, rtol=1e-4, atol=1e-5)


def test_probe_gives_outlier_exposure_entropy(probe_run):
    """--head outlier-exposure refits the probe's objective (the decay the file records) with the
    outlier term on the pool, and records the choice and the refitted heads' held-out accuracy."""
    from filterx.io.scores import read_scores

    src, tgt, spec, out, _ = probe_run
    code, _, err = cli("score", "--method", "entropy", "--head", "outlier-exposure", "--order", "low",
                       "--source", src, "--target", tgt, "--encoder", out, "--name", "oe", *RUN)
    assert code == 0, err
    scores, attrs = read_scores(Dataset.open(src), "oe")
    assert attrs["params"]["head"] == "outlier-exposure" and attrs["params"]["order"] == "low"
    assert attrs["params"]["weight_decay"] == 5e-4
    assert np.isfinite(scores).all() and (scores <= 0).all()  # negated entropies
    assert len(attrs["result"]["val_acc"]) == 2 and attrs["result"]["folds"] == 2


def test_a_bare_spec_has_no_head_for_entropy(probe_run):
    src, tgt, spec, _, _ = probe_run
    code, _, err = cli("score", "--method", "entropy", "--source", src, "--target", tgt, "--encoder", spec, *RUN)
    assert code == 2 and err.count("\n") == 1 and "--probe-only" in err, err


def test_probe_options_are_checked(sample_dirs, tmp_path):
    code, _, err = cli("train-encoder", sample_dirs[1], tmp_path / "p.pt", "--backbone", "torchvision:resnet18:none")
    assert code == 2 and "--probe-only" in err
    code, _, err = cli("train-encoder", sample_dirs[1], tmp_path / "p.pt", "--probe-only")
    assert code == 2 and "--backbone" in err
    code, _, err = cli("train-encoder", sample_dirs[1], tmp_path / "p.pt", "--backbone", "torchvision:resnet18:none",
                       "--probe-only", "--resolution", "224")
    assert code == 2 and "--resolution does not apply" in err


def test_probe_serves_influence_and_a_bare_spec_serves_clustering(probe_run):
    from filterx.io.scores import read_scores

    src, tgt, spec, out, _ = probe_run
    code, _, err = cli("score", "--method", "influence", "--source", src, "--target", tgt, "--encoder", out, *RUN)
    assert code == 0, err
    scores, attrs = read_scores(Dataset.open(src), "influence")
    assert np.isfinite(scores).all() and scores.std() > 0
    assert attrs["params"]["weight_decay"] == 5e-4 and attrs["result"]["residual"] < 1e-5
    code, _, err = cli("score", "--method", "clustering", "--source", src, "--target", tgt, "--encoder", spec,
                       "--k", 3, *RUN)
    assert code == 0, err
    scores, attrs = read_scores(Dataset.open(src), "clustering")
    assert np.isfinite(scores).all() and attrs["encoder"]["tag"] == read_encoder_file(out)["tag"]


def test_a_probe_refuses_a_changed_weights_file(sample_dirs, tmp_path):
    timm = pytest.importorskip("timm")

    tgt = tmp_path / "target"
    shutil.copytree(sample_dirs[1], tgt)
    torch.manual_seed(4)
    f = tmp_path / "test_vit.pt"
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), f)
    out = tmp_path / "probe.pt"
    code, _, err = cli("train-encoder", tgt, out, "--backbone", f"timm:test_vit@{f}", "--probe-only", *RUN)
    assert code == 0, err
    assert read_encoder_file(out)["backbone"]["file_sha256"] == backbones.file_sha256(f)
    state = torch.load(f, weights_only=True)
    state["head.weight"] += 1.0  # even a change to the unused head is a changed file
    torch.save(state, f)
    code, _, err = cli("embed", tgt, "--encoder", out, *RUN)
    assert code == 2 and "has changed since the probe was trained" in err, err


def test_a_probe_needs_a_held_out_split(tmp_path):
    from PIL import Image

    from filterx.stages.shard import ShardConfig, shard

    for c in ("a", "b"):  # one image per class: nothing can be held out
        (tmp_path / "folder" / c).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 40 if c == "a" else 200, np.uint8)).save(tmp_path / "folder" / c / "x.jpg")
    shard(ShardConfig(tmp_path / "folder", tmp_path / "ds", shard_size=5, workers=1, quiet=True))
    code, _, err = cli("train-encoder", tmp_path / "ds", tmp_path / "p.pt", "--backbone", "torchvision:resnet18:none",
                       "--probe-only", *RUN)
    assert code == 2 and "held-out" in err and not (tmp_path / "p.pt").exists(), err
    assert not (tmp_path / "ds" / "embeddings").exists()  # refused before anything was embedded
