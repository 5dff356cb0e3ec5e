"""The model zoo: output shapes, sizes, fx-traceability, module names and the base record."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.fx
from torch import nn

from stablemorph.zoo import ACTIVATIONS, BASE_ATTR, MODELS, build_model, make_activation

torch.set_num_threads(1)

# (name, kwargs, input shape): small variants so each case runs in milliseconds.
CASES: list[tuple[str, dict[str, Any], tuple[int, ...]]] = [
    ("mlp", {"in_features": 64, "hidden": (32, 16), "activation": "tanh"}, (3, 1, 8, 8)),
    ("cnn", {}, (3, 1, 28, 28)),
    ("cnn", {"image_size": 8, "widths": (4, 8), "batch_norm": False}, (3, 1, 8, 8)),
    ("vgg", {"stages": ((8,), (16, 16))}, (3, 3, 16, 16)),
    ("resnet", {"layers": (1, 1), "widths": (8, 16), "num_classes": 5}, (3, 3, 16, 16)),
    ("depthwise", {"widths": (8, 16), "strides": (1, 2), "stem_width": 4}, (3, 3, 16, 16)),
    ("cnn1d", {"widths": (4, 8), "length": 32, "in_channels": 2}, (3, 2, 32)),
]


@pytest.mark.parametrize(("name", "kwargs", "shape"), CASES)
def test_output_shape_and_fx_trace(name: str, kwargs: dict[str, Any], shape: tuple) -> None:
    torch.manual_seed(0)
    model = build_model(name, **kwargs).eval()
    x = torch.randn(shape)
    out = model(x)
    assert out.shape == (shape[0], kwargs.get("num_classes", 10))
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), out, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "kwargs", "shape"), CASES)
def test_base_record_rebuilds_same_architecture(
    name: str, kwargs: dict[str, Any], shape: tuple
) -> None:
    model = build_model(name, **kwargs)
    base = getattr(model, BASE_ATTR)
    assert base == json.loads(json.dumps(base))  # plain JSON, survives a round trip
    assert base["name"] == name
    rebuilt = build_model(base["name"], **base["kwargs"])
    assert getattr(rebuilt, BASE_ATTR) == base
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(model.state_dict())
    model.eval()
    rebuilt.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_base_record_turns_tuples_into_lists() -> None:
    model = build_model("vgg", stages=((8,), (16, 16)), in_channels=1)
    assert getattr(model, BASE_ATTR) == {
        "name": "vgg",
        "kwargs": {"stages": [[8], [16, 16]], "in_channels": 1},
    }


def test_resnet18_size() -> None:
    model = build_model("resnet", layers=(2, 2, 2, 2), widths=(64, 128, 256, 512))
    n_params = sum(p.numel() for p in model.parameters())
    # ResNet-18 with a CIFAR stem and 10 classes: 11,173,962 parameters.
    assert n_params == 11_173_962


def test_resnet_projection_shortcuts_only_where_shape_changes() -> None:
    model = build_model("resnet", layers=(2, 1), widths=(8, 16))
    names = dict(model.named_modules())
    assert names["layer1.0"].downsample is None
    assert names["layer1.1"].downsample is None
    proj = names["layer2.0.downsample.0"]
    assert isinstance(proj, nn.Conv2d)
    assert (proj.kernel_size, proj.stride, proj.in_channels, proj.out_channels) == (
        (1, 1),
        (2, 2),
        8,
        16,
    )
    assert isinstance(names["layer2.0.downsample.1"], nn.BatchNorm2d)
    assert names["layer2.0.conv1"].stride == (2, 2)
    # the residual add appears in the traced graph as an `add` node
    graph = torch.fx.symbolic_trace(model).graph
    adds = [n for n in graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 3


def test_cnn_module_names_are_stable() -> None:
    model = build_model("cnn", widths=(4, 8), image_size=12)
    names = [n for n, _ in model.named_modules() if n]
    assert names == [
        "features",
        "features.conv1",
        "features.bn1",
        "features.act1",
        "features.pool1",
        "features.conv2",
        "features.bn2",
        "features.act2",
        "features.pool2",
        "flatten",
        "classifier",
    ]
    assert model.classifier.in_features == 8 * 3 * 3  # conv -> flatten -> linear transition
    no_bn = build_model("cnn", widths=(4,), batch_norm=False)
    assert "features.bn1" not in dict(no_bn.named_modules())


def test_depthwise_block_is_grouped() -> None:
    model = build_model("depthwise", widths=(8,), strides=(2,), stem_width=4)
    block = model.blocks[0]
    assert block.dw.groups == 4 and block.dw.weight.shape == (4, 1, 3, 3)
    assert block.pw.weight.shape == (8, 4, 1, 1)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_are_modules(name: str) -> None:
    model = build_model("mlp", in_features=4, hidden=(3,), activation=name)
    assert isinstance(model.act1, nn.Module)
    assert isinstance(make_activation(name), type(model.act1))
    # a fresh module every time, so replacing one in a model never touches another
    assert make_activation(name) is not make_activation(name)


def test_every_activation_in_every_conv_model_is_a_module() -> None:
    traced = torch.fx.symbolic_trace(build_model("resnet", layers=(1, 1), widths=(4, 8)))
    functions = {str(n.target) for n in traced.graph.nodes if n.op == "call_function"}
    assert not any("relu" in f for f in functions), functions


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet50'.*'cnn'"):
        build_model("resnet50")
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*'relu'"):
        build_model("mlp", activation="swish")


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"image_size=4 is too small for 3 2x poolings"):
        build_model("cnn", widths=(4, 4, 4), image_size=4)
    with pytest.raises(ValueError, match=r"widths must be a non-empty sequence"):
        build_model("cnn", widths=())
    with pytest.raises(ValueError, match=r"same length"):
        build_model("resnet", layers=(1, 1), widths=(8,))
    with pytest.raises(ValueError, match=r"kwargs must be plain JSON"):
        build_model("mlp", activation=nn.ReLU)


def test_factory_table_matches_documented_names() -> None:
    assert set(MODELS) == {"mlp", "cnn", "vgg", "resnet", "depthwise", "cnn1d", "gpt"}


def test_gpt_from_uniform_sizes_or_its_recorded_recipe() -> None:
    """``build_model("gpt", ...)`` takes ``GPTConfig.uniform``'s sizes (it failed with
    ``KeyError: 'blocks'``) as well as the recipe every GPT records (``to_dict()``)."""
    torch.manual_seed(0)
    model = build_model("gpt", vocab_size=11, block_size=8, d_model=8, n_layer=2, n_head=2)
    assert [b.attn.n_head for b in model.blocks] == [2, 2]
    assert model.blocks[0].mlp.fc.out_features == 32  # d_mlp defaults to 4 d_model
    again = build_model("gpt", **model.config.to_dict())
    again.load_state_dict(model.state_dict())
    ids = torch.randint(0, 11, (2, 8))
    torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(TypeError, match="n_heads"):
        build_model("gpt", vocab_size=11, block_size=8, d_model=8, n_layer=2, n_heads=2)
