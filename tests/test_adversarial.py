"""PGD adversarial training: the attack's constraints and strength, robust training against a
standard model on procedural images, bad settings, and pretrain --adv-eps end to end."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from filterx.train.adversarial import DEFAULT_STEPS, Attack, InputNormalize, check_attack, default_step_size, pgd_attack
from filterx.decode.loader import IMAGENET_MEAN, IMAGENET_STD
from filterx.train.common import CHECKPOINT, METRICS, MODEL, Runtime, load_checkpoint, supervised_step

from clirun import one_line, run

pytestmark = pytest.mark.usefixtures("one_thread")

H = 8  # tiny images: 3 x 8 x 8
LR = 0.05  # steady: at 0.1 robust training swings between the two features for a few epochs
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def tiny_net() -> nn.Module:
    """A small CNN with BatchNorm (so that the attack's eval mode matters)."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 2))


def robust_and_fragile_images(n: int, seed: int, p: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, 3, 8, 8) pixels in [0, 1], y (n,)) with two features (Tsipras et al.'s construction):
    a faint +-0.03 sign pattern over the whole image that always gives the label (L2 norm 0.42,
    so an L2 attack of eps 1 can turn it into the other class's), and a bright or dark 4 x 4
    corner (L2 norm 4.2: no eps-1 attack moves it) that agrees with the label for a share p of
    the images. Fitting every image needs the faint pattern; surviving the attack needs the corner."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    corner_label = torch.where(torch.rand(n, generator=g) < p, y, 1 - y)
    pattern = torch.sign(torch.randn(1, 3, H, H, generator=torch.Generator().manual_seed(123)))
    corner = torch.zeros(1, 1, H, H)
    corner[..., :4, :4] = 1
    sign = lambda t: (2 * t - 1).float().view(-1, 1, 1, 1)  # noqa: E731
    x = 0.5 + 0.02 * torch.randn(n, 3, H, H, generator=g) + 0.03 * sign(y) * pattern + 0.3 * sign(corner_label) * corner
    return x.clamp(0, 1), y


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - MEAN) / STD


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(adversarial: Attack | None, epochs: int, seed: int = 0, history: list | None = None) -> nn.Module:
    """SGD on the procedural images as pretrain's step does it (supervised_step on normalised
    inputs, the attack on each batch); ``history`` gets the robust val top-1 before each epoch."""
    x, y = robust_and_fragile_images(512, seed=1)
    xv, yv = robust_and_fragile_images(256, seed=2)
    torch.manual_seed(seed)
    model = tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    rt = Runtime("cpu")
    for epoch in range(epochs):
        if history is not None:
            history.append(robust_accuracy(model, xv, yv, adversarial))
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            xb = normalise(x[idx])
            if adversarial is not None:
                xb = adversarial(model, xb, y[idx])
            supervised_step(model, opt, xb, y[idx], rt)
    if history is not None:
        history.append(robust_accuracy(model, xv, yv, adversarial))
    return model


EVAL_ATTACK = Attack(1.0, "l2", 3)


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack | None = None) -> float:
    attack = attack or EVAL_ATTACK
    xa = attack(model, normalise(x), y, generator=torch.Generator().manual_seed(7))
    return accuracy(model, xa, y)


@pytest.fixture(scope="module")
def standard_model() -> nn.Module:
    return train(None, epochs=10)


# ---------------------------------------------------------------- the attack itself


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("linf", 8 / 255)])
def test_perturbation_stays_in_the_ball_and_in_pixel_range(norm, eps):
    torch.manual_seed(0)
    model = tiny_net().eval()
    x = torch.rand(16, 3, H, H)
    x[:4] = x[:4].round()  # saturated pixels: the clamp to [0, 1] must hold there too
    y = torch.randint(0, 2, (16,))
    y[-1] = -1  # unlabelled: returned unchanged
    adv = pgd_attack(model, x, y, eps, norm, steps=5, step_size=default_step_size(eps, 5))
    delta = (adv - x).flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
    assert adv.shape == x.shape and adv.dtype == torch.float32
    assert float(size.max()) <= eps * (1 + 1e-5) and float(size[:-1].min()) > 0.5 * eps
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert torch.equal(adv[-1], x[-1])
    assert all(p.grad is None for p in model.parameters())
    # the trainer's wrapper: normalised in and out, the ball measured in pixels
    out = Attack(eps, norm, 5)(model, normalise(x).contiguous(memory_format=torch.channels_last), y)
    assert out.is_contiguous(memory_format=torch.channels_last)  # CUDA training feeds channels_last
    pix = out * STD + MEAN
    d = (pix - x).flatten(1)
    size = d.norm(dim=1) if norm == "l2" else d.abs().amax(dim=1)
    assert float(size.max()) <= eps * (1 + 1e-4) and float(pix.min()) >= -1e-6 and float(pix.max()) <= 1 + 1e-6


@pytest.mark.parametrize("norm,eps", [("l2", 1.0), ("linf", 0.06)])
def test_attack_raises_the_loss_over_clean_and_random_noise_of_the_same_norm(standard_model, norm, eps):
    x, y = robust_and_fragile_images(256, seed=2)
    model = InputNormalize(standard_model).eval()
    g = torch.Generator().manual_seed(3)
    if norm == "l2":
        noise = torch.randn(x.shape, generator=g)
        noise = noise * eps / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    else:
        noise = eps * torch.sign(torch.randn(x.shape, generator=g))  # a corner of the L-inf ball
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y).item()
        noisy = F.cross_entropy(model((x + noise).clamp(0, 1)), y).item()
        adv = F.cross_entropy(model(pgd_attack(model, x, y, eps, norm, 7, default_step_size(eps, 7))), y).item()
    assert adv > 2 * noisy and adv > 2 * clean and adv > 1.0, (clean, noisy, adv)


def test_attack_runs_the_model_in_eval_mode_and_restores_its_mode():
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_net()

        def forward(self, x):
            seen.append(self.training)
            return self.net(x)

    model = Spy().train()
    x, y = robust_and_fragile_images(8, seed=0)
    Attack(1.0, "l2", 2)(model, normalise(x), y)
    assert seen == [False, False, False] and model.training  # 2 steps + scoring the last iterate
    assert model.net[1].training  # BatchNorm back in train mode for the training step


# ---------------------------------------------------------------- robust training


def test_robust_training_raises_robust_accuracy_and_a_standard_model_has_none(standard_model):
    xv, yv = robust_and_fragile_images(256, seed=2)
    assert accuracy(standard_model, normalise(xv), yv) > 0.95  # it fits through the faint pattern ...
    assert robust_accuracy(standard_model, xv, yv) < 0.05  # ... which the attack turns over
    history = []
    robust = train(EVAL_ATTACK, epochs=6, history=history)
    assert history[0] < 0.65 and history[-1] > 0.72, history  # the corner survives: ~0.8 of the images
    assert history[-1] - history[0] > 0.15, history
    assert 0.7 < accuracy(robust, normalise(xv), yv) < 0.9  # the price: clean accuracy is the corner's p


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("kwargs,match", [
    (dict(eps=-1.0), r"eps must be >= 0.*-1\.0"),
    (dict(norm="l3"), r"unknown adversarial norm 'l3'; valid: l2, linf"),
    (dict(steps=0), r"steps must be an integer >= 1, got 0"),
    (dict(step_size=0.0), r"step size must be > 0"),
])
def test_bad_settings_give_one_clear_error(kwargs, match, tmp_path):
    from filterx.train.pretrain import PretrainConfig

    args = dict(eps=1.0, norm="l2", steps=3, step_size=None) | kwargs
    with pytest.raises(ValueError, match=match):
        check_attack(**args)
    with pytest.raises(ValueError, match=match):
        Attack(**args)
    with pytest.raises(ValueError, match=match):
        pgd_attack(tiny_net(), torch.rand(2, 3, H, H), torch.zeros(2, dtype=torch.long), args["eps"], args["norm"],
                   args["steps"], args["step_size"])
    with pytest.raises(ValueError, match=match):
        PretrainConfig(tmp_path, tmp_path / "out", adv_eps=args["eps"], adv_norm=args["norm"],
                       adv_steps=args["steps"], adv_step_size=args["step_size"])


@pytest.mark.parametrize("option,value,valid", [("--adv-eps", -1, "x>=0"), ("--adv-norm", "l3", "'l2', 'linf'"),
                                                ("--adv-steps", 0, "x>=1")])
def test_bad_cli_values_are_one_line(option, value, valid, tmp_path):
    code, _, err = run("pretrain", tmp_path, tmp_path / "out", option, value)
    assert code == 2
    line = one_line(err)
    assert option in line and str(value) in line and valid in line


def test_help_names_the_literature_defaults():
    code, out, _ = run("pretrain", "--help")
    text = " ".join(out.split())
    assert code == 0 and "2.5 * eps / steps" in text and f"[default: {DEFAULT_STEPS}; x>=1]" in text
    assert "Madry et al." in text and "[default: l2]" in text and "[default: 0.0; x>=0]" in text
    assert default_step_size(3.0, 7) == pytest.approx(2.5 * 3.0 / 7)


# ---------------------------------------------------------------- pretrain --adv-eps


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from filterx.io.sampledata import make_sample_data
    from filterx.stages.shard import ShardConfig, shard

    root = tmp_path_factory.mktemp("adv_data")
    sd = make_sample_data(root / "raw", per_class=4, target_per_class=2, photos=2, textures=1, size_range=(32, 40))
    shard(ShardConfig(sd.source, root / "src", shard_size=20, workers=1, quiet=True))
    return root / "src"


PRETRAIN = ("--arch", "resnet18", "--resolution", 16, "--epochs", 2, "--batch-size", 12, "--val-fraction", 0.25,
            "--backend", "pil", "--workers", 0, "--device", "cpu", "-q")


def test_pretrain_with_adv_eps_logs_robust_accuracy_and_records_the_attack(tiny_dataset, tmp_path):
    out = tmp_path / "robust"
    code, stdout, err = run("pretrain", tiny_dataset, out, *PRETRAIN, "--adv-eps", 0.5, "--adv-steps", 2)
    assert code == 0, err
    assert "val_robust_top1" in stdout
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert 0.0 <= r["val_robust_top1"] <= 1.0 and r["val_count"] > 0
        assert r["val_robust_loss"] > r["val_loss"]  # the attack found higher loss on the held-out images
    for path in (out / CHECKPOINT, out / MODEL):
        ck = load_checkpoint(path)
        assert ck["settings"]["adv_eps"] == 0.5 and ck["settings"]["adv_norm"] == "l2"
        assert ck["settings"]["adv_steps"] == 2 and ck["settings"]["adv_step_size"] is None
        assert ck["adversarial"]["step_size"] == pytest.approx(2.5 * 0.5 / 2)
        assert ck["adversarial"]["space"] == "pixels [0, 1]" and ck["adversarial"]["random_start"]

    plain = tmp_path / "plain"
    code, _, err = run("pretrain", tiny_dataset, plain, *PRETRAIN, "--epochs", 1)
    assert code == 0, err
    row = json.loads((plain / METRICS).read_text().splitlines()[0])
    assert "val_top1" in row and "val_robust_top1" not in row
    ck = load_checkpoint(plain / CHECKPOINT)
    assert ck["adversarial"] is None and not any(k.startswith("adv_") for k in ck["settings"])


def test_adversarial_pretrain_resumes_bit_identically(tiny_dataset, tmp_path):
    from filterx.train.pretrain import PretrainConfig, pretrain

    common = dict(data=tiny_dataset, arch="resnet18", resolution=16, batch_size=12, val_fraction=0.25,
                  backend="pil", workers=0, device="cpu", quiet=True, adv_eps=0.02, adv_norm="linf", adv_steps=2)
    whole = pretrain(PretrainConfig(out=tmp_path / "a", epochs=2, **common))
    pretrain(PretrainConfig(out=tmp_path / "b", epochs=1, **common))
    resumed = pretrain(PretrainConfig(out=tmp_path / "b", epochs=2, resume=True, **common))
    keys = ("loss", "train_top1", "val_top1", "val_robust_top1", "val_robust_loss")
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in whole.history]
    a, b = load_checkpoint(tmp_path / "a" / MODEL)["model"], load_checkpoint(tmp_path / "b" / MODEL)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
