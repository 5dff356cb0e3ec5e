"""enlarge_kernel: zero-padded kernels (netmorph, net2net) and the dense depth alternative
(stable), exact at the borders and with stride, groups and Conv1d."""

from __future__ import annotations

import pytest
import torch
from morph_cases import assert_same_function, assert_untouched, inputs, parent, snapshot
from torch import nn

from stablemorph.morphs import MorphError, enlarge_kernel
from stablemorph.record import last_report

torch.set_num_threads(1)

# 3x3 with bias + BN, stride 2 without bias, 1x1 projection, depthwise, grouped, Conv1d.
LAYERS = [
    ("cnn", "features.conv2", 5), ("resnet", "layer2.0.conv1", 5),
    ("resnet", "layer2.0.downsample.0", 3), ("depthwise", "blocks.0.dw", 5),
    ("grouped", "grouped", 5), ("cnn1d", "features.conv2", 7),
]


@pytest.mark.parametrize(("name", "target", "size"), LAYERS)
@pytest.mark.parametrize("scheme", ["netmorph", "net2net"])
def test_zero_padded_kernel(name: str, target: str, size: int, scheme: str) -> None:
    model = parent(name)
    x = inputs(name)
    snap = snapshot(model)
    child = enlarge_kernel(model, target, size, scheme=scheme, inputs=x)
    conv = child.get_submodule(target)
    old = model.get_submodule(target)
    assert conv.kernel_size[0] == size
    k, pad = old.kernel_size[0], (size - old.kernel_size[0]) // 2
    centre = conv.weight[..., pad:pad + k] if conv.weight.dim() == 3 else \
        conv.weight[..., pad:pad + k, pad:pad + k]
    torch.testing.assert_close(centre, old.weight, rtol=0, atol=0)
    assert last_report(child).zero_fraction > 0
    assert list(child.state_dict()) == list(model.state_dict())
    assert_same_function(model, child, x)
    assert_untouched(model, snap)


@pytest.mark.parametrize(("name", "target", "size"), LAYERS)
def test_stable_uses_a_dense_depth_decomposition(name: str, target: str, size: int) -> None:
    model = parent(name)
    x = inputs(name)
    child = enlarge_kernel(model, target, size, inputs=x)
    block = child.get_submodule(target)
    assert block.first.kernel_size[0] == size and block.second.kernel_size[0] == 1
    report = last_report(child)
    assert report.zero_fraction == 0.0
    assert any("exact growth of one kernel needs zero taps" in n for n in report.notes)
    assert_same_function(model, child, x)


@pytest.mark.parametrize(
    ("target", "size", "kw", "message"),
    [
        ("features.conv2", 4, {}, "exceed the current 3 by an even amount"),
        ("features.conv2", 3, {}, "exceed the current 3"),
        ("classifier", 3, {}, "'classifier' is a Linear; supported: Conv1d, Conv2d"),
        ("features.conv2", 5, {"scheme": "netmorph", "width": 9}, "'stable' only"),
    ],
)
def test_enlarge_kernel_errors(target: str, size: int, kw: dict, message: str) -> None:
    model = parent("cnn")
    snap = snapshot(model)
    with pytest.raises(MorphError, match=message):
        enlarge_kernel(model, target, size, inputs=inputs("cnn"), **kw)
    assert_untouched(model, snap)


def test_same_padding_string_is_supported() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding="same"), nn.ReLU(), nn.Flatten(),
                          nn.Linear(192, 4))
    x = inputs("cnn")
    child = enlarge_kernel(model, "0", 5, scheme="net2net", inputs=x)
    assert child[0].padding == (2, 2)
    assert_same_function(model, child, x)


def test_default_width_leaves_a_null_space_when_the_kernel_grows() -> None:
    """Regression: with C_mid = C_out and a 1x1 second factor the solve is square, and its
    unique solution copies the zero ring of the padded kernel into F1 (6% zeros seen on a
    3x3 -> 5x5 growth). One spare channel per group keeps the solution dense."""
    from stablemorph.morphs.factor import Geometry, default_width

    grow = Geometry(nd=2, in_channels=4, out_channels=6, kernel=3, stride=1, padding=1,
                    groups=1)
    assert default_width(grow, 5, 1) == 7
    assert default_width(grow, 3, 1) == 6  # no padding in G~: the square solve is dense
    depthwise = Geometry(2, 4, 4, 3, 1, 1, groups=4)
    assert default_width(depthwise, 5, 1) == 8
