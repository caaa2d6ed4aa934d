import pytest
import torch
import torch.nn as nn

from filterx.models.archs import (
    AlexNetLRN, backbone_modules, build_model, feature_dim, features_and_logits, get_head, head_name,
    list_models, replace_head, split_backbone_head,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_lists_archs_and_names_them_in_errors():
    assert list_models() == ("alexnet_lrn", "resnet18", "resnet34", "resnet50")
    with pytest.raises(ValueError, match="unknown arch 'vgg16'; valid: alexnet_lrn, resnet18"):
        build_model("vgg16", 10)
    with pytest.raises(ValueError, match="bad options"):
        build_model("alexnet_lrn", 10, no_such_option=1)


@pytest.mark.parametrize("arch,dim,head", [("resnet18", 512, "fc"), ("resnet34", 512, "fc"),
                                           ("resnet50", 2048, "fc"), ("alexnet_lrn", 4096, "fc8")])
def test_backbone_head_split_covers_every_parameter_once(arch, dim, head):
    m = build_model(arch, 7)
    assert head_name(m) == head and feature_dim(m) == dim
    backbone, name = split_backbone_head(m)
    head_params = list(m.get_submodule(name).parameters())
    ids = [id(p) for p in backbone] + [id(p) for p in head_params]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())
    assert len(set(ids)) == len(ids)
    assert get_head(m).out_features == 7
    assert get_head(m) not in backbone_modules(m)


@pytest.mark.parametrize("arch", ["resnet18", "alexnet_lrn"])
@pytest.mark.parametrize("res", [16, 32, 112])
def test_forward_shapes_and_features_feed_the_head(arch, res):
    torch.manual_seed(0)
    m = build_model(arch, 5, **({"fc_dim": 256} if arch == "alexnet_lrn" else {})).eval()
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        feats, logits = features_and_logits(m, x)
        assert feats.shape == (2, feature_dim(m)) and logits.shape == (2, 5)
        torch.testing.assert_close(get_head(m)(feats), logits)
        torch.testing.assert_close(m(x), logits)
    # the hook is removed afterwards
    assert not get_head(m)._forward_pre_hooks


def test_replace_head_keeps_backbone_and_makes_a_fresh_small_head():
    torch.manual_seed(0)
    m = build_model("resnet18", 1000)
    before = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("fc.")}
    head = replace_head(m, 31)
    assert m.fc is head and head.out_features == 31 and head.in_features == 512
    assert float(head.bias.detach().abs().max()) == 0.0
    assert 0.005 < float(head.weight.detach().std()) < 0.015  # N(0, 0.01)
    for k, v in m.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, before[k])
    a = build_model("alexnet_lrn", 1000, fc_dim=64)
    replace_head(a, 3)
    assert a.fc8.out_features == 3 and feature_dim(a) == 64


@torch.no_grad()
def test_alexnet_lrn_is_the_bvlc_layout():
    m = build_model("alexnet_lrn", 1000)
    assert isinstance(m, AlexNetLRN)
    # Caffe's bvlc_alexnet has 60,965,224 parameters (grouped conv2/4/5, 9216-wide fc6)
    assert sum(p.numel() for p in m.parameters()) == 60_965_224
    convs = [c for c in m.features if isinstance(c, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0], c.groups) for c in convs] == [
        (96, 11, 4, 1), (256, 5, 1, 2), (384, 3, 1, 1), (384, 3, 1, 2), (256, 3, 1, 2)]
    lrns = [c for c in m.features if isinstance(c, nn.LocalResponseNorm)]
    assert len(lrns) == 2 and all((l.size, l.alpha, l.beta, l.k) == (5, 1e-4, 0.75, 1.0) for l in lrns)
    # map sizes at 224 px are Caffe's at 227: 55 (conv1), 27, 13, 6 (pool5)
    sizes, x = [], torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        for layer in m.features:
            x = layer(x)
            if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
                sizes.append(x.shape[-1])
    assert sizes == [55, 27, 27, 13, 13, 13, 13, 6]
    # Caffe initialisation: biases 0.1 on conv2/4/5 and fc6/7, 0 on conv1/3 and fc8
    assert [float(c.bias.mean()) for c in convs] == pytest.approx([0, 0.1, 0, 0.1, 0.1])
    assert float(m.fc6.bias.mean()) == pytest.approx(0.1) and float(m.fc8.bias.abs().max()) == 0
    assert float(m.fc6.weight.std()) == pytest.approx(0.005, rel=0.01)


def test_lrn_matches_caffe_formula():
    # Caffe: b_c = a_c / (k + alpha / n * sum over the 5 nearest channels of a^2) ** beta
    lrn = build_model("alexnet_lrn", 2, fc_dim=8).features[2]
    a = torch.randn(1, 8, 3, 3) * 30
    sq = torch.nn.functional.pad(a**2, (0, 0, 0, 0, 2, 2))
    window = sum(sq[:, i : i + 8] for i in range(5))
    expected = a / (1.0 + 1e-4 / 5 * window) ** 0.75
    with torch.no_grad():
        torch.testing.assert_close(lrn(a), expected)


def test_ceil_pool_pads_only_maps_smaller_than_its_window():
    pool = build_model("alexnet_lrn", 2, fc_dim=8).features[3]
    x = torch.randn(2, 4, 13, 13)
    torch.testing.assert_close(pool(x), nn.MaxPool2d(3, 2, ceil_mode=True)(x))
    assert pool(x).shape[-1] == 6
    tiny = torch.randn(1, 2, 2, 1)
    out = pool(tiny)
    assert out.shape == (1, 2, 1, 1)
    torch.testing.assert_close(out[..., 0, 0], tiny.amax(dim=(2, 3)))


def test_alexnet_fc_dim_and_dropout_options():
    m = build_model("alexnet_lrn", 4, fc_dim=64, dropout=0.0)
    assert feature_dim(m) == 64 and m.fc6.out_features == 64 and m.dropout.p == 0.0
    m.train()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(m(x), m(x))  # no dropout: train-mode forward is deterministic


def test_resnet_width_narrows_every_stage_and_keeps_the_layout():
    import torch

    from filterx.models.archs import _narrow_resnet, build_model, model_stages

    full = build_model("resnet18", 10)
    same = _narrow_resnet("resnet18", 10, 64)  # the narrow builder at the published width
    assert [(n, p.shape) for n, p in same.named_parameters()] == [(n, p.shape) for n, p in full.named_parameters()]
    narrow = build_model("resnet18", 2, width=16)
    assert narrow.conv1.out_channels == 16 and narrow.layer4[0].conv1.out_channels == 128
    assert narrow.fc.in_features == 128 and narrow.filterx_head == "fc"
    paths = {n.split(".")[0] for n, _ in narrow.named_parameters()}
    layout = model_stages("resnet18")
    assert paths <= set(layout.stem) | {p for _, ps in layout.stages for p in ps} | {layout.head}
    n_full, n_narrow = (sum(p.numel() for p in m.parameters()) for m in (build_model("resnet18", 2), narrow))
    assert 14 < n_full / n_narrow < 17  # about (64 / 16)^2
    assert narrow(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    assert build_model("resnet50", 3, width=8).fc.in_features == 8 * 8 * 4
    with pytest.raises(ValueError, match="width must be >= 1, got 0"):
        build_model("resnet18", 2, width=0)
    with pytest.raises(ValueError, match="bad options"):
        build_model("alexnet_lrn", 2, width=16)


def test_small_image_stem_keeps_the_map_and_the_layout():
    from filterx.models.archs import model_stages

    plain, small = build_model("resnet18", 3, width=16), build_model("resnet18", 3, width=16, stem="small")
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.out_channels == 16
    assert isinstance(small.maxpool, nn.Identity)
    # the names and every shape but conv1's are the plain layout's: the same stages, the same head
    shapes = lambda m: {n: p.shape for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(small).keys() == shapes(plain).keys()
    assert {n for n in shapes(plain) if shapes(plain)[n] != shapes(small)[n]} == {"conv1.weight"}
    layout = model_stages("resnet18")
    covered = set(layout.stem) | {p for _, ps in layout.stages for p in ps} | {layout.head}
    assert {n.split(".")[0] for n in shapes(small)} <= covered
    # at 32 px the last stage sees 4x4 (the ImageNet stem: 1x1)
    maps = {}
    for name, m in (("plain", plain), ("small", small)):
        m.layer4.register_forward_hook(lambda _m, _i, out, name=name: maps.__setitem__(name, out.shape[-2:]))
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert maps == {"plain": (1, 1), "small": (4, 4)}
    assert build_model("resnet50", 2, stem="small").conv1.out_channels == 64
    with pytest.raises(ValueError, match="unknown stem 'cifar'; valid: imagenet, small"):
        build_model("resnet18", 2, stem="cifar")
