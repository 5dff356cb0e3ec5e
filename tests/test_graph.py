"""The fx analysis: layer lookup, tracing errors, channel groups across adds, concatenations,
flatten and depthwise convs, and the ties widening refuses to follow."""

from __future__ import annotations

import pytest
import torch
from morph_cases import ConcatNet, NormMLP, batch, parent
from torch import Tensor, nn

from stablemorph.graph import GraphError, channel_group, find_module, trace

torch.set_num_threads(1)

X = batch("image", 4)


def test_find_module_suggests_close_names() -> None:
    model = parent("cnn")
    assert find_module(model, "features.conv1") is model.features.conv1
    with pytest.raises(GraphError, match=r"no layer named 'features.conv9'.*'features.conv1'"):
        find_module(model, "features.conv9")
    assert issubclass(GraphError, ValueError)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x.flatten(1))
        return h if h.sum() > 0 else -h


def test_trace_wraps_fx_errors() -> None:
    with pytest.raises(GraphError, match=r"torch\.fx cannot trace Untraceable"):
        trace(Untraceable())


def test_resnet_stage_is_one_group_across_adds() -> None:
    model = parent("resnet")
    group = channel_group(model, "conv1", (X,))
    assert group.producers == ["conv1", "layer1.0.conv2"]
    uses = {u.module: u.kind for u in group.uses}
    assert uses == {
        "bn1": "channelwise", "layer1.0.bn2": "channelwise",
        "layer1.0.conv1": "consumer", "layer2.0.conv1": "consumer",
        "layer2.0.downsample.0": "consumer",
    }
    # the projection's add ties stage 2 together the same way
    group2 = channel_group(model, "layer2.0.downsample.0", (X,))
    assert group2.producers == ["layer2.0.downsample.0", "layer2.0.conv2"]
    assert {u.module for u in group2.uses} == {"layer2.0.bn2", "layer2.0.downsample.1", "fc"}


def test_flatten_expands_channels_into_blocks() -> None:
    model = parent("cnn")  # conv2 (6 ch) -> pool -> 2x2 -> flatten -> Linear(24)
    group = channel_group(model, "features.conv2", (X,))
    remap = group.remaps(7)["classifier"]
    assert remap.parent.tolist() == [*range(24), -1, -1, -1, -1]
    assert remap.unit.tolist() == [u for u in range(7) for _ in range(4)]
    assert remap.sub.tolist() == [0, 1, 2, 3] * 7
    assert remap.source_position(torch.full((28,), 2))[:4].tolist() == [8, 9, 10, 11]


def test_concatenation_inserts_new_channels_after_their_block() -> None:
    model = ConcatNet()
    first = channel_group(model, "a", (X,)).remaps(6)["c"]
    assert first.parent.tolist() == [0, 1, 2, 3, -1, -1, 4, 5, 6]
    second = channel_group(model, "b", (X,)).remaps(4)["c"]
    assert second.parent.tolist() == [0, 1, 2, 3, 4, 5, 6, -1]
    assert second.unit.tolist() == [-1, -1, -1, -1, 0, 1, 2, 3]


def test_normalisation_and_zero_preservation_flags() -> None:
    model = NormMLP()
    ln = channel_group(model, "fc1", (X,))
    assert ln.normalised and not ln.zero_preserving
    sig = channel_group(model, "fc2", (X,))
    assert not sig.normalised and not sig.zero_preserving  # sigmoid(0) != 0
    relu = channel_group(parent("vgg"), "features.conv1_1", (X,))
    assert relu.zero_preserving and not relu.normalised


def test_depthwise_convs_follow_their_input() -> None:
    model = parent("depthwise")
    group = channel_group(model, "stem.conv", (X,))
    uses = {u.module: u.kind for u in group.uses}
    assert uses["blocks.0.dw"] == "channelwise" and uses["blocks.0.pw"] == "consumer"
    with pytest.raises(GraphError, match=r"'blocks\.0\.dw' is a depthwise conv"):
        channel_group(model, "blocks.0.dw", (X,))


class InputResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.head = nn.Conv2d(1, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x + self.conv(x)).mean((2, 3))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.fc(self.fc(x.flatten(1))))


class InputGated(nn.Module):
    """A product of the widened units with a slice of the input: nothing can grow there."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        return self.head(self.a(x) * x[:, :5])


class Reshaped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x).reshape(-1, 32, 8).mean(1))


class Doubled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        return self.head(torch.cat([h, h], 1)).mean((2, 3))


@pytest.mark.parametrize(
    ("model", "target", "message"),
    [
        (InputResidual(), "conv", "comes from no Conv/Linear layer"),
        (Doubled(), "conv", r"the same channels reach 'head' more than once"),
        (Shared(), "fc", "'fc' is called 2 times"),
        (InputGated(), "a", r"a product or quotient with 'getitem' \(shape \(16, 5\)\)"),
        (Reshaped(), "conv", r"reshape \(16, 4, 8, 8\) -> \(16, 32, 8\)"),
        (NormMLP(), "head", "reach the model output"),
        (ConcatNet(), "bn_a", "'bn_a' is BatchNorm2d"),
    ],
)
def test_unsupported_ties_are_refused(model: nn.Module, target: str, message: str) -> None:
    x = batch("image", 16)
    with pytest.raises(GraphError, match=message):
        channel_group(model, target, (x,))


def test_grouped_consumer_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten())
    with pytest.raises(GraphError, match=r"'1', a grouped conv \(groups=2\)"):
        channel_group(model, "0", (X,))
