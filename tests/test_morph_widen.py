"""widen: exact on every model kind and scheme (eval and train mode), dense for "stable",
every channel-wise module and consumer grown, and the DESIGN.md traps."""

from __future__ import annotations

import pytest
import torch
from morph_cases import (
    assert_same_function,
    assert_untouched,
    inputs,
    parent,
    snapshot,
)
from torch import nn

from stablemorph.morphs import MorphError, widen
from stablemorph.morphs.widen import plan_widen
from stablemorph.record import history, last_report

torch.set_num_threads(1)

SCHEMES = ["stable", "netmorph", "net2net"]

# (model, layer): every kind of tie: BN, flatten -> Linear, residual groups with 1x1
# projections, depthwise followers, Conv1d, concatenation, LayerNorm, sigmoid, tanh MLP.
TARGETS = [
    ("mlp", "fc1"), ("mlp", "fc2"),
    ("cnn", "features.conv1"), ("cnn", "features.conv2"),
    ("vgg", "features.conv2_1"),
    ("resnet", "conv1"), ("resnet", "layer1.0.conv1"), ("resnet", "layer2.0.conv2"),
    ("depthwise", "stem.conv"), ("depthwise", "blocks.1.pw"),
    ("cnn1d", "features.conv2"),
    ("concat", "a"), ("concat", "b"),
    ("norm_mlp", "fc2"),
]


def _width(model: nn.Module, target: str) -> int:
    m = model.get_submodule(target)
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


@pytest.mark.parametrize(("name", "target"), TARGETS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_widen_preserves_function(name: str, target: str, scheme: str) -> None:
    model = parent(name)
    x = inputs(name)
    snap = snapshot(model)
    old = _width(model, target)
    child = widen(model, target, old + 3, scheme=scheme, inputs=x)
    assert _width(child, target) == old + 3
    assert_same_function(model, child, x)
    assert_untouched(model, snap)
    report = last_report(child)
    assert report.max_rel <= 1e-5
    assert set(report.param_map) == {n for n, _ in child.named_parameters()}
    if scheme == "stable":
        changed = dict(child.named_parameters())
        assert report.zero_fraction == 0.0
        assert all(bool((changed[n] != 0).all()) for n in report.changed)


def test_widen_layernorm_replicates_every_unit() -> None:
    model = parent("norm_mlp")
    x = inputs("norm_mlp")
    for scheme in SCHEMES:
        child = widen(model, "fc1", 16, scheme=scheme, inputs=x)
        assert child.ln.normalized_shape == (16,)
        assert_same_function(model, child, x)
    with pytest.raises(MorphError, match="width must be a multiple of 8, got 12"):
        widen(model, "fc1", 12, inputs=x)


def test_net2net_copies_bn_statistics_for_every_new_channel() -> None:
    """Trap: every new channel needs its source's gamma, beta, mean and var (a popular
    implementation copied one channel only)."""
    model = parent("cnn")
    x = inputs("cnn")
    child = widen(model, "features.conv1", 9, scheme="net2net", inputs=x, seed=3)
    origin = last_report(child).param_map["features.conv1.weight"]
    sources = origin.index[4:]
    bn_p, bn_c = model.features.bn1, child.features.bn1
    for attr in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(bn_c, attr)[4:], getattr(bn_p, attr)[sources])
    assert_same_function(model, child, x)


def test_param_map_describes_copies_and_scales() -> None:
    model = parent("resnet")
    child = widen(model, "conv1", 7, scheme="net2net", inputs=inputs("resnet"))
    params_p = dict(model.named_parameters())
    params_c = dict(child.named_parameters())
    for name, origin in last_report(child).param_map.items():
        if origin.index is None:
            assert origin.source == name
            torch.testing.assert_close(params_c[name], params_p[name], rtol=0, atol=0)
            continue
        src = params_p[origin.source]
        scale = origin.scale if origin.scale is not None else torch.ones(len(origin.index))
        for k, (i, s) in enumerate(zip(origin.index.tolist(), scale.tolist(), strict=True)):
            torch.testing.assert_close(params_c[name].select(origin.dim, k),
                                       src.select(origin.dim, i) * s)


def test_stable_pairs_and_odd_split() -> None:
    gen = torch.Generator().manual_seed(0)
    plan = plan_widen("stable", "pairs", 4, 9, normalised=False, zero_in=False, gen=gen)
    assert plan.fresh_in.tolist() == [0, 0, 1, 1, -1]
    assert plan.sign.tolist()[:4] == [1.0, -1.0, 1.0, -1.0]
    s = int(plan.source[-1])
    assert 0 <= s < 4 and 0 < float(plan.share[-1]) < 1
    torch.testing.assert_close(plan.share[s] + plan.share[-1],
                               torch.tensor(1.0, dtype=torch.float64))


def test_stable_split_variant_is_exact_and_dense() -> None:
    model = parent("vgg")
    x = inputs("vgg")
    child = widen(model, "features.conv1_1", 7, variant="split", inputs=x)
    assert_same_function(model, child, x)
    assert last_report(child).zero_fraction == 0.0


def test_netmorph_zeroes_the_smaller_side_when_exact() -> None:
    model = parent("cnn")  # conv1: 9 inputs per unit, conv2 reads 6*9 per unit -> zero in
    child = widen(model, "features.conv1", 6, scheme="netmorph", inputs=inputs("cnn"))
    assert bool((child.features.conv1.weight[4:] == 0).all())
    assert bool((child.features.conv2.weight[:, 4:] != 0).all())
    # sigmoid(0) != 0: zero incoming weights would not be exact; outgoing side zeroed
    norm = parent("norm_mlp")
    child = widen(norm, "fc2", 8, scheme="netmorph", inputs=inputs("norm_mlp"))
    assert bool((child.head.weight[:, 6:] == 0).all())
    assert_same_function(norm, child, inputs("norm_mlp"))


def test_dtype_mode_and_requires_grad_survive() -> None:
    model = parent("cnn").double().eval()
    model.features.conv1.weight.requires_grad_(False)
    x = inputs("cnn").double()
    child = widen(model, "features.conv1", 6, inputs=x)
    assert all(p.dtype == torch.float64 for p in child.parameters())
    assert not child.training and not child.features.bn1.training
    assert not child.features.conv1.weight.requires_grad
    assert child.features.conv1.bias.requires_grad
    assert last_report(child).max_rel <= 1e-10


def test_untouched_layers_keep_state_dict_keys() -> None:
    model = parent("resnet")
    child = widen(model, "layer2.0.conv1", 12, inputs=inputs("resnet"))
    assert list(child.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        if not key.startswith(("layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2")):
            torch.testing.assert_close(child.state_dict()[key], value, rtol=0, atol=0)


def test_record_replays_the_architecture() -> None:
    from stablemorph.morphs import apply

    model = parent("resnet")
    child = widen(model, "conv1", 6, scheme="net2net", seed=5, inputs=inputs("resnet"))
    record = history(child)[-1]
    assert record.kwargs == {"width": 6, "scheme": "net2net", "variant": "random", "seed": 5,
                             "step_rule": False, "input_shape": [16, 1, 8, 8]}
    replay = apply(record.op, model, record.target, **record.kwargs)
    for (k1, v1), (k2, v2) in zip(child.state_dict().items(), replay.state_dict().items(),
                                  strict=True):
        assert k1 == k2
        torch.testing.assert_close(v1, v2)


@pytest.mark.parametrize(
    ("target", "width", "message"),
    [
        ("features.conv1", 4, r"width must be an int larger than the current 4, got 4"),
        ("features.conv1", 3, "larger than the current 4"),
        ("features.bn1", 8, "'features.bn1' is a BatchNorm2d"),
        ("features.conv7", 8, r"no layer named 'features.conv7'.*did you mean"),
        ("classifier", 12, "reach the model output"),
    ],
)
def test_widen_errors_leave_the_parent_alone(target: str, width: int, message: str) -> None:
    model = parent("cnn")
    snap = snapshot(model)
    with pytest.raises(MorphError, match=message):
        widen(model, target, width, inputs=inputs("cnn"))
    assert_untouched(model, snap)


def test_widen_refuses_unknown_scheme_and_variant() -> None:
    model = parent("mlp")
    with pytest.raises(MorphError, match="unknown scheme 'zeros'"):
        widen(model, "fc1", 20, scheme="zeros")
    with pytest.raises(MorphError, match="unknown variant 'pairs' for widen scheme 'net2net'"):
        widen(model, "fc1", 20, scheme="net2net", variant="pairs")


def test_widen_untraceable_model_is_a_clear_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x.flatten(1))
            return self.head(h if bool(h.mean() > 0) else -h)

    with pytest.raises(MorphError, match=r"widen 'fc': torch\.fx cannot trace Branchy"):
        widen(Branchy(), "fc", 10, inputs=inputs("mlp"))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("conv1", r"feed 'grouped', a grouped conv \(groups=2\)"),
        ("grouped", r"'grouped' is Conv2d\(groups=2\); widen a dense"),
    ],
)
def test_grouped_convs_are_refused(target: str, message: str) -> None:
    model = parent("grouped")
    snap = snapshot(model)
    with pytest.raises(MorphError, match=message):
        widen(model, target, 8, inputs=inputs("grouped"))
    assert_untouched(model, snap)


class ViewNet(nn.Module):
    """``x.view(x.size(0), -1)`` and a scalar product between a conv and its Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)) * 2.0
        return self.fc(h.view(h.size(0), -1))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_widen_through_view_and_scalar_product(scheme: str) -> None:
    model = ViewNet()
    x = inputs("cnn")
    child = widen(model, "conv", 5, scheme=scheme, inputs=x)
    assert child.fc.in_features == 5 * 64
    assert_same_function(model, child, x)
