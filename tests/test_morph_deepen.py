"""deepen: exact on every layer kind and scheme, same architecture for every scheme, dense
for "stable", the DESIGN.md traps (borders, stride, bias, BatchNorm, groups, Net2Net's centre
tap), the error paths, and chains of morphs checked against the original parent."""

from __future__ import annotations

import copy

import pytest
import torch
from morph_cases import (
    assert_same_function,
    assert_untouched,
    inputs,
    parent,
    snapshot,
)
from torch import Tensor, nn

from stablemorph.activations import PAct
from stablemorph.morphs import MorphError, deepen, widen
from stablemorph.record import history, last_report

torch.set_num_threads(1)

SCHEMES = ["stable", "netmorph", "net2net"]

# Linear (tanh MLP, conv->linear head), 3x3 conv with bias + BN, bias-free conv + BN, stride
# 2, 1x1 projection, depthwise (groups=C, stride 2), grouped (groups=2, stride 2), Conv1d,
# Linear before a LayerNorm, a 1x1 conv feeding a concatenation.
LAYERS = [
    ("mlp", "fc2"), ("cnn", "classifier"), ("cnn", "features.conv2"),
    ("vgg", "features.conv2_2"), ("resnet", "layer2.0.conv1"),
    ("resnet", "layer2.0.downsample.0"), ("depthwise", "blocks.1.dw"),
    ("grouped", "grouped"), ("cnn1d", "features.conv1"), ("norm_mlp", "fc1"), ("concat", "b"),
]


@pytest.mark.parametrize(("name", "target"), LAYERS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_deepen_preserves_function(name: str, target: str, scheme: str) -> None:
    model = parent(name)
    x = inputs(name)
    snap = snapshot(model)
    child = deepen(model, target, scheme=scheme, inputs=x)
    block = child.get_submodule(target)
    assert isinstance(block, nn.Sequential) and isinstance(block.act, PAct)
    assert_same_function(model, child, x)
    assert_untouched(model, snap)
    report = last_report(child)
    assert report.max_rel <= 1e-5 and report.residual is not None
    assert set(report.param_map) == {n for n, _ in child.named_parameters()}
    if scheme == "stable":
        assert report.zero_fraction == 0.0
        assert all(bool((p != 0).all()) for p in block.parameters())


# 3x3 second layers (composite 5x5): with C_in = 1 or a 1x1 parent one factor solve is
# linear; 3x3 (*) 3x3 with C_mid ~ C_out goes through the solver's nonlinear paths.
K3 = [("cnn", "features.conv1"), ("resnet", "layer2.0.downsample.0"), ("cnn1d", "features.conv1"),
      ("resnet", "layer2.0.conv1"), ("depthwise", "blocks.0.dw"), ("grouped", "grouped"),
      ("vgg", "features.conv2_2")]


@pytest.mark.parametrize(("name", "target"), K3)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_deepen_with_a_3x3_new_layer(name: str, target: str, scheme: str) -> None:
    model = parent(name)
    x = inputs(name)
    child = deepen(model, target, scheme=scheme, kernel_size=3, inputs=x)
    assert_same_function(model, child, x)
    assert child.get_submodule(target).second.kernel_size[0] == 3
    if scheme == "stable":
        assert last_report(child).zero_fraction == 0.0


@pytest.mark.parametrize(("name", "target", "kw"), [
    ("vgg", "features.conv2_2", {"kernel_size": 3}), ("mlp", "fc1", {}),
    ("depthwise", "blocks.0.dw", {"kernel_size": 3}),
])
def test_same_architecture_for_every_scheme(name: str, target: str, kw: dict) -> None:
    model = parent(name)
    x = inputs(name)
    shapes = []
    for scheme in ("netmorph", "net2net"):
        child = deepen(model, target, scheme=scheme, inputs=x, **kw)
        shapes.append([(k, tuple(v.shape)) for k, v in child.state_dict().items()])
        assert history(child)[-1].kwargs["width"] == history(child)[-1].kwargs["width"]
    assert shapes[0] == shapes[1]
    if not kw:
        child = deepen(model, target, scheme="stable", inputs=x)
        assert [(k, tuple(v.shape)) for k, v in child.state_dict().items()] == shapes[0]


def test_borders_are_exact_where_same_padding_is_not() -> None:
    """Trap: F1 carries all the padding and F2 none. Two "same"-padded convs differ from the
    parent near the image border (regression: that arrangement is measurably wrong)."""
    model = parent("cnn")
    x = inputs("cnn")
    child = deepen(model, "features.conv1", scheme="stable", kernel_size=3, inputs=x)
    block = child.features.conv1  # a dense 3x3 second factor (netmorph's is 1x1 padded)
    assert block.first.padding == (2, 2) and block.second.padding == (0, 0)
    naive = copy.deepcopy(block)
    naive.first.padding, naive.second.padding = (1, 1), (1, 1)
    with torch.no_grad():
        want, got, bad = model.features.conv1(x), block(x), naive(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    border = (bad - want).abs()
    assert float(border[..., 0, :].max()) > 1e-3  # the outer ring is wrong...
    torch.testing.assert_close(bad[..., 2:-2, 2:-2], want[..., 2:-2, 2:-2])  # ...not the inside


def test_stride_goes_on_the_first_factor() -> None:
    model = parent("resnet")
    x = inputs("resnet")
    child = deepen(model, "layer2.0.conv1", scheme="net2net", kernel_size=3, inputs=x)
    block = child.layer2[0].conv1
    assert block.first.stride == (2, 2) and block.second.stride == (1, 1)
    assert_same_function(model, child, x)


def test_bias_split_per_scheme() -> None:
    model = parent("cnn")  # conv with bias, BN after it
    x = inputs("cnn")
    b = model.features.conv2.bias
    kept = deepen(model, "features.conv2", scheme="netmorph", inputs=x).features.conv2
    assert bool((kept.first.bias == 0).all())
    torch.testing.assert_close(kept.second.bias, b, rtol=0, atol=0)
    dense = deepen(model, "features.conv2", scheme="stable", inputs=x)
    assert bool((dense.features.conv2.first.bias != 0).all())
    assert last_report(dense).param_map["features.conv2.second.bias"].source is None
    assert last_report(deepen(model, "features.conv2", scheme="net2net", inputs=x)
                       ).param_map["features.conv2.second.bias"].source == "features.conv2.bias"


def test_batchnorm_stays_after_the_second_factor() -> None:
    """Trap: the parent's BN follows F2, so it sees the same input in train mode too."""
    model = parent("vgg")
    x = inputs("vgg")
    child = deepen(model, "features.conv1_1", scheme="stable", inputs=x)
    names = [n for n, _ in child.features.named_children()]
    assert names[:3] == ["conv1_1", "bn1_1", "act1_1"]
    for key in ("features.bn1_1.weight", "features.bn1_1.running_var"):
        torch.testing.assert_close(child.state_dict()[key], model.state_dict()[key])
    report = last_report(child)
    assert report.max_rel <= 1e-5  # verified in eval and train mode


def test_net2net_identity_is_centred() -> None:
    """Trap: the identity tap must be at the kernel centre."""
    model = parent("vgg")
    child = deepen(model, "features.conv1_1", scheme="net2net", kernel_size=3,
                   inputs=inputs("vgg"))
    w = child.features.conv1_1.second.weight
    expected = torch.zeros_like(w)
    for o in range(w.shape[0]):
        expected[o, o, 1, 1] = 1.0
    torch.testing.assert_close(w, expected, rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu", "tanh", "sigmoid"])
def test_every_activation(activation: str) -> None:
    model = parent("mlp")
    x = inputs("mlp")
    child = deepen(model, "fc1", activation=activation, inputs=x)
    assert isinstance(child.fc1.act.phi, type(PAct(activation).phi))
    assert_same_function(model, child, x)


def test_dtype_device_mode_requires_grad() -> None:
    model = parent("cnn").double().eval()
    model.features.conv2.requires_grad_(False)
    x = inputs("cnn").double()
    child = deepen(model, "features.conv2", inputs=x)
    block = child.features.conv2
    assert all(p.dtype == torch.float64 for p in child.parameters())
    assert not any(p.requires_grad for p in block.parameters())
    assert not child.training and not block.training and not block.act.training
    assert last_report(child).max_rel <= 1e-10


def test_stable_infeasible_request_is_refused_before_solving() -> None:
    model = parent("vgg")
    with pytest.raises(MorphError, match=r"cannot be exact and dense.*use width >= \d+"):
        deepen(model, "features.conv2_2", kernel_size=3, width=6, inputs=inputs("vgg"))


class AttributeReader(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.fc.weight.T


def _reflect() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"))


@pytest.mark.parametrize(
    ("model", "target", "kw", "message"),
    [
        (parent("cnn"), "features.bn1", {}, "'features.bn1' is a BatchNorm2d; supported"),
        (parent("cnn"), "features.con1", {}, "did you mean 'features.conv1'"),
        (_reflect(), "0", {}, "padding_mode='reflect'"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2)), "0", {}, r"dilation \(2, 2\)"),
        (nn.Sequential(nn.Conv2d(1, 2, (1, 3))), "0", {}, "only square kernels"),
        (parent("cnn"), "features.conv1", {"kernel_size": 2},
         r"must be even and >= 0 \(with K1=3: kernel_size=3\)"),
        (parent("mlp"), "fc1", {"kernel_size": 3}, "is Linear: it has no kernel"),
        (parent("mlp"), "fc1", {"activation": "swish"}, "unknown activation 'swish'"),
        (parent("grouped"), "grouped", {"width": 5}, "multiple of groups=2"),
        (parent("mlp"), "fc1", {"scheme": "identity"}, "unknown scheme 'identity'"),
        (AttributeReader(), "fc", {}, "running the child on the probe batch failed"),
    ],
)
def test_deepen_errors(model: nn.Module, target: str, kw: dict, message: str) -> None:
    snap = snapshot(model)
    with pytest.raises(MorphError, match=message):
        deepen(model, target, inputs=inputs("cnn"), **kw)
    assert_untouched(model, snap)


def test_deepen_needs_no_tracing() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 8)

        def forward(self, x: Tensor) -> Tensor:
            h = self.fc(x.flatten(1))
            return h if bool(h.mean() > 0) else -h

    model = Branchy()
    child = deepen(model, "fc", inputs=inputs("mlp"))
    assert_same_function(model, child, inputs("mlp"))


def test_chain_deepen_widen_deepen_matches_the_original() -> None:
    model = parent("cnn")
    x = inputs("cnn")
    a = deepen(model, "features.conv2", inputs=x)
    b = widen(a, "features.conv2.first", 10, inputs=x)  # grows F1, the PAct and F2's inputs
    c = deepen(b, "features.conv2.second", scheme="netmorph", inputs=x)
    d = widen(c, "features.conv1", 7, scheme="net2net")  # probe shape from the history
    assert [r.op for r in history(d)] == ["deepen", "widen", "deepen", "widen"]
    assert d.features.conv2.first.out_channels == 10
    assert_same_function(model, d, x)


def test_chain_on_a_resnet_matches_the_original() -> None:
    model = parent("resnet")
    x = inputs("resnet")
    a = deepen(model, "layer1.0.conv2", inputs=x)
    b = widen(a, "conv1", 6, inputs=x)  # the stage group now includes the deepened conv2
    c = deepen(b, "layer2.0.downsample.0", scheme="net2net", kernel_size=3, inputs=x)
    assert b.layer1[0].conv2.second.out_channels == 6
    assert_same_function(model, c, x)
