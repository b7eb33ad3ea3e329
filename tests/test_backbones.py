"""Tests for components.backbones: shapes, METHODS.md 1.1/3.2 architecture facts, registry, gin, FLOPs."""

from __future__ import annotations

import functools

import gin
import pytest
import torch
from torch import nn

from components.backbones import (
    BACKBONES,
    NormalizedNet,
    available_backbones,
    build_backbone,
    count_forward_flops,
    default_input_size,
    register,
)

EXPECTED_NAMES = {
    "wrn34_10",
    "wrn28_10",
    "wideresnet",
    "resnet18",
    "resnet18_lbgat",
    "preact_resnet18",
    "small_cnn",
    "wrn34_10_tiny",
    "resnet18_lbgat_tiny",
    "resnet18_tiny",
    "preact_resnet18_tiny",
}


@functools.cache
def _model(name: str, num_classes: int) -> nn.Module:
    # Building WRN-34-10 takes ~1 s on CPU; share one instance between tests.
    torch.manual_seed(0)
    return build_backbone(name, num_classes=num_classes).eval()


def _classifier(model: nn.Module) -> nn.Linear:
    return model.fc if hasattr(model, "fc") else model.linear


def test_all_expected_names_registered():
    assert set(available_backbones()) >= EXPECTED_NAMES
    assert available_backbones() == sorted(BACKBONES)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_output_shape_at_native_input_size(name):
    num_classes = 200 if name.endswith("_tiny") else 10
    size = default_input_size(name)
    assert size == (64 if name.endswith("_tiny") else 32)
    with torch.no_grad():
        out = _model(name, num_classes)(torch.rand(2, 3, size, size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32), (3, 64)])
def test_small_cnn_any_channels_and_size(in_channels, size):
    model = build_backbone("small_cnn", num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        assert model(torch.rand(2, in_channels, size, size)).shape == (2, 7)


def test_in_channels_reaches_stem():
    model = build_backbone("resnet18", num_classes=10, in_channels=1)
    assert model.conv1.in_channels == 1
    model = build_backbone("wideresnet", num_classes=10, in_channels=1, depth=10, widen_factor=1)
    assert model.conv1.in_channels == 1


def _wrn_param_count(depth: int, widen: int, num_classes: int, in_channels: int = 3) -> tuple[int, int]:
    """(all params, params of the unused sub_block1) of a TRADES WideResNet, from its layer list."""
    n = (depth - 4) // 6
    ch = [16, 16 * widen, 32 * widen, 64 * widen]

    def block(cin: int, cout: int) -> int:
        bn1, conv1, bn2, conv2 = 2 * cin, cin * cout * 9, 2 * cout, cout * cout * 9
        shortcut = 0 if cin == cout else cin * cout  # 1x1 convShortcut, no bias
        return bn1 + conv1 + bn2 + conv2 + shortcut

    def stage(cin: int, cout: int) -> int:
        return block(cin, cout) + (n - 1) * block(cout, cout)

    stem = in_channels * ch[0] * 9
    sub_block1 = stage(ch[0], ch[1])
    body = stage(ch[0], ch[1]) + sub_block1 + stage(ch[1], ch[2]) + stage(ch[2], ch[3])
    head = 2 * ch[3] + ch[3] * num_classes + num_classes
    return stem + body + head, sub_block1


def test_wrn34_10_matches_trades_parameter_count():
    model = _model("wrn34_10", 10)
    total, unused = _wrn_param_count(34, 10, 10)
    assert (total, unused) == (48_262_586, 2_102_112)
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.sub_block1.parameters()) == unused
    # The commonly quoted "46.16M" for WRN-34-10 is the count without the never-called sub_block1.
    assert total - unused == 46_160_474
    keys = model.state_dict().keys()
    assert any(k.startswith("sub_block1.") for k in keys)
    assert "block1.layer.0.convShortcut.weight" in keys
    assert "block1.layer.1.convShortcut.weight" not in keys
    assert {"conv1.weight", "bn1.weight", "fc.weight", "fc.bias"} <= set(keys)
    assert model.block1.layer[0].equalInOut is False and model.block1.layer[1].equalInOut is True


def test_wrn_sub_block1_is_unused_in_forward():
    model = build_backbone("wideresnet", num_classes=10, depth=10, widen_factor=2)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.sub_block1.parameters())
    assert all(p.grad is not None for p in model.block1.parameters())


def test_wrn_trades_init():
    model = build_backbone("wideresnet", num_classes=10, depth=10, widen_factor=4)
    assert torch.all(model.fc.bias == 0)
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)
    conv = model.block3.layer[0].conv1  # 3x3, 256 out channels: fan_out = 9 * 256
    expected_std = (2.0 / (9 * conv.out_channels)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)


def test_wrn_state_dict_roundtrip_strict():
    a = build_backbone("wideresnet", num_classes=10, depth=10, widen_factor=1)
    b = build_backbone("wideresnet", num_classes=10, depth=10, widen_factor=1)
    b.load_state_dict(a.state_dict(), strict=True)


def _final_map(model: nn.Module, size: int) -> tuple[int, ...]:
    seen = {}

    def hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        # Must return None: a forward hook's return value replaces the module output.
        seen["shape"] = out.shape

    handle = model.layer4.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.rand(2, 3, size, size))
    handle.remove()
    return tuple(seen["shape"][1:])


def test_guide_resnet_final_map_8x8_vs_standard_4x4():
    assert _final_map(_model("resnet18_lbgat", 10), 32) == (512, 8, 8)
    assert _final_map(_model("resnet18", 10), 32) == (512, 4, 4)
    lbgat, std = _model("resnet18_lbgat", 10), _model("resnet18", 10)
    assert [lbgat.layer1[0].conv1.stride[0], lbgat.layer2[0].conv1.stride[0]] == [1, 1]
    assert [std.layer1[0].conv1.stride[0], std.layer2[0].conv1.stride[0]] == [1, 2]
    # Same parameters, ~3-4x the compute (METHODS.md 1.1).
    assert sum(p.numel() for p in lbgat.parameters()) == sum(p.numel() for p in std.parameters())
    ratio = count_forward_flops(lbgat, (3, 32, 32)) / count_forward_flops(std, (3, 32, 32))
    assert 3.0 < ratio < 4.0


def test_tiny_classifier_input_sizes():
    # METHODS.md 1.1: WideResNet fc(640*4, 200); ResNet18_cifar linear(512, 200) with 8x8 map;
    # PreActResNet18 linear(2048, 200).
    assert _classifier(_model("wrn34_10_tiny", 200)).in_features == 640 * 4
    assert _classifier(_model("resnet18_lbgat_tiny", 200)).in_features == 512
    assert _final_map(_model("resnet18_lbgat_tiny", 200), 64) == (512, 8, 8)
    assert _classifier(_model("preact_resnet18_tiny", 200)).in_features == 2048
    assert _classifier(_model("resnet18_tiny", 200)).in_features == 2048
    for name in ("wrn34_10", "resnet18", "resnet18_lbgat", "preact_resnet18"):
        expected = 640 if name.startswith("wrn") else 512
        assert _classifier(_model(name, 10)).in_features == expected
    assert all(_classifier(_model(n, 200)).out_features == 200 for n in EXPECTED_NAMES if n.endswith("_tiny"))


def test_resnet_state_dict_names_follow_authors():
    keys = set(_model("resnet18", 10).state_dict())
    assert {"conv1.weight", "bn1.weight", "layer4.1.bn2.weight", "layer2.0.shortcut.0.weight"} <= keys
    assert {"linear.weight", "linear.bias"} <= keys
    pre = set(_model("preact_resnet18", 10).state_dict())
    assert "layer2.0.shortcut.0.weight" in pre and not any(k.startswith("layer1.0.shortcut") for k in pre)
    assert "bn.weight" not in pre
    assert "bn.weight" in build_backbone("preact_resnet18", num_classes=10, final_bn=True).state_dict()


def test_normalize_wraps_and_equals_manual_normalization():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    torch.manual_seed(1)
    wrapped = build_backbone("small_cnn", num_classes=5, normalize=(mean, std)).eval()
    assert isinstance(wrapped, NormalizedNet)
    assert wrapped.normalize.mean.shape == (1, 3, 1, 1) and wrapped.normalize.std.shape == (1, 3, 1, 1)
    x = torch.rand(2, 3, 32, 32)
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.normalize(x), manual)
        torch.testing.assert_close(wrapped(x), wrapped.net(manual))
    assert {"normalize.mean", "normalize.std"} <= set(wrapped.state_dict())
    assert not isinstance(build_backbone("small_cnn", num_classes=5), NormalizedNet)


def test_unknown_name_raises_value_error_listing_names():
    with pytest.raises(ValueError) as info:
        build_backbone("resnet81", num_classes=10)
    message = str(info.value)
    assert all(name in message for name in EXPECTED_NAMES)
    assert "Did you mean 'resnet18'" in message


def test_register_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register("small_cnn")(lambda num_classes, in_channels=3: nn.Identity())


def test_gin_scoped_binding_builds_small_cnn():
    try:
        gin.parse_config(
            """
            target/build_backbone.name = 'small_cnn'
            target/build_backbone.num_classes = 4
            target/build_backbone.width = 8
            guide/build_backbone.name = 'small_cnn'
            guide/build_backbone.num_classes = 4
            guide/build_backbone.normalize = ((0.5,), (0.5,))
            """
        )
        with gin.config_scope("target"):
            target = build_backbone()
        with gin.config_scope("guide"):
            guide = build_backbone()
    finally:
        gin.clear_config()
    assert target.fc.in_features == 4 * 8 and target.fc.out_features == 4
    assert isinstance(guide, NormalizedNet) and guide.net.fc.in_features == 4 * 32
    with torch.no_grad():
        assert target.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 4)


def test_flops_counter_hand_computed():
    model = nn.Sequential(nn.Conv2d(1, 2, kernel_size=3, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    model.train()
    # conv: 2*4*4 outputs x (1*3*3) MACs = 288 MACs; linear: 3 outputs x 32 MACs = 96 MACs; FLOPs = 2 x MACs.
    assert count_forward_flops(model, (1, 4, 4)) == 2 * (288 + 96)
    assert count_forward_flops(model, (5, 1, 4, 4)) == 5 * 2 * (288 + 96)
    assert model.training  # mode restored
    strided = nn.Sequential(nn.Conv2d(4, 8, kernel_size=3, stride=2, padding=1, groups=2))
    # 8 x 4 x 4 outputs x (4/2 * 9) MACs
    assert count_forward_flops(strided, (4, 8, 8)) == 2 * 8 * 4 * 4 * 2 * 9


# count_forward_flops' totals before it moved to torch.utils.flop_counter.FlopCounterMode (hooks on every
# nn.Conv2d and nn.Linear, 2 x MACs), recorded at 5a50a17: the counter must give the same numbers.
HAND_COUNTED_FLOPS = {
    ("small_cnn", 10): 20_646_400,
    ("small_cnn", 100): 20_669_440,
    ("resnet18", 10): 1_110_845_440,
    ("resnet18", 100): 1_110_937_600,
    ("resnet18_lbgat", 10): 3_526_764_544,
    ("resnet18_lbgat", 100): 3_526_856_704,
}


@pytest.mark.parametrize(("name", "num_classes"), list(HAND_COUNTED_FLOPS))
def test_flop_counter_totals_equal_the_former_hand_count(name, num_classes):
    model = build_backbone(name, num_classes=num_classes).train()
    flops = HAND_COUNTED_FLOPS[name, num_classes]
    assert count_forward_flops(model, (3, 32, 32)) == flops
    assert count_forward_flops(model, (4, 3, 32, 32)) == 4 * flops
    assert all(m.training for m in model.modules())  # modes restored
