"""The step rule's measurement (``morphs/first_step.py``): the explicit-convolution path gives
the autograd path's figures on every block geometry a morph makes, and a morph measures on
the block input its own verification captured (no extra forward), the same tensor
``block_input`` returns."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from stablemorph.activations import PAct
from stablemorph.morphs import deepen, insert_subnet
from stablemorph.morphs.first_step import block_input, multipliers, step_amplifications
from stablemorph.morphs.first_step_autograd import autograd_amplifications
from stablemorph.morphs.step_grads import explicit_amplifications
from stablemorph.record import last_report
from stablemorph.verify import capture_inputs

torch.set_num_threads(1)


def conv_block(nd: int, c_in: int, c_mid: int, c_out: int, k1: int, k2: int, stride: int,
               padding: int, groups: int, bias: bool, dtype: torch.dtype) -> nn.Module:
    conv = nn.Conv1d if nd == 1 else nn.Conv2d
    torch.manual_seed(1)
    return nn.Sequential(OrderedDict(
        first=conv(c_in, c_mid, k1, stride=stride, padding=padding, groups=groups, bias=bias),
        act=PAct("relu", c_mid),
        second=conv(c_mid, c_out, k2, groups=groups, bias=bias))).to(dtype)


def linear_block(bias: bool, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(OrderedDict(first=nn.Linear(5, 9, bias=bias),
                                     act=PAct("relu", 9, channel_dim=-1),
                                     second=nn.Linear(9, 4, bias=bias))).to(dtype)


# (nd, c_in, c_mid, c_out, k1, k2, stride, padding, groups, bias, parent kernel, input size)
GEOMETRIES = {
    "3x3 (*) 3x3, parent 3x3 cropped": (2, 4, 6, 5, 3, 3, 1, 2, 1, True, 3, 7),
    "3x3 (*) 1x1, whole composite": (2, 4, 6, 5, 3, 1, 1, 1, 1, True, 3, 7),
    "stride 2, no bias, parent 1x1 masked": (2, 4, 6, 5, 3, 3, 2, 1, 1, False, 1, 9),
    "grouped": (2, 4, 6, 4, 3, 3, 1, 2, 2, True, 3, 6),
    "depthwise, whole composite": (2, 4, 4, 4, 3, 3, 1, 2, 4, True, 0, 6),
    "conv1d": (1, 3, 5, 4, 3, 3, 1, 2, 1, True, 3, 11),
    # 150k-entry gradients: a float32 sum of squares must stay accurate at this size
    "wide, small maps": (2, 128, 130, 128, 3, 3, 1, 2, 1, True, 3, 2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_explicit_convolutions_give_the_autograd_figures(geometry: str,
                                                         dtype: torch.dtype) -> None:
    nd, *sizes, kernel, size = GEOMETRIES[geometry]
    block = conv_block(nd, *sizes, dtype=dtype)
    x = torch.randn(3, sizes[0], *[size] * nd, dtype=dtype)
    want = autograd_amplifications(block, x, kernel, 4, 0, slopes=False)
    got = explicit_amplifications(block, x, kernel, 4, 0)
    assert_close(got, want, rtol=1e-6, atol=0)
    assert all(v > 0 for v in got.values())
    assert step_amplifications(block, x, kernel) == got  # the default path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_explicit_linear_pair_on_tokens_gives_the_autograd_figures(bias: bool,
                                                                   dtype: torch.dtype) -> None:
    block = linear_block(bias, dtype)
    x = torch.randn(2, 6, 5, dtype=dtype)  # (batch, tokens, features)
    want = autograd_amplifications(block, x, 0, 4, 3, slopes=False)
    assert_close(explicit_amplifications(block, x, 0, 4, 3), want, rtol=1e-6, atol=0)


def test_an_unbatched_conv_input_is_one_sample() -> None:
    block = conv_block(2, 4, 6, 5, 3, 3, 1, 2, 1, True, torch.float32)
    x = torch.randn(4, 7, 7)
    assert_close(explicit_amplifications(block, x, 3, 4, 0),
                 autograd_amplifications(block, x[None], 3, 4, 0, slopes=False), rtol=1e-6,
                 atol=0)


def test_slopes_take_the_autograd_path_and_change_the_figure() -> None:
    block = conv_block(2, 4, 6, 5, 3, 3, 1, 2, 1, True, torch.float32)
    x = torch.randn(3, 4, 7, 7)
    with_slopes = step_amplifications(block, x, 3, slopes=True)
    assert with_slopes == autograd_amplifications(block, x, 3, 4, 0, slopes=True)
    assert with_slopes["sgd"] > step_amplifications(block, x, 3)["sgd"]


class InPlace(nn.Module):
    """``x += conv(x)``: the forward writes into the conv's input after the conv read it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        x += self.conv(x)
        return x


def test_capture_keeps_the_first_eval_input_unchanged_by_later_in_place_writes() -> None:
    torch.manual_seed(0)
    model, x = InPlace(), torch.randn(4, 3, 5, 5)
    with capture_inputs({"conv": model.conv}) as seen, torch.no_grad():
        model(x)  # train mode: not captured
        assert seen == {}
        model.eval()
        want = model.bn(x)
        model(x)
        model(x + 1)  # a second call: the first is kept
    assert_close(seen["conv"], want, rtol=0, atol=0)
    assert_close(block_input(model, model.conv, x), want, rtol=0, atol=0)
    assert not model.conv._forward_hooks


class Counted(nn.Module):
    """A CNN that counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.body(x)


@pytest.mark.parametrize("morph", ["deepen", "insert_subnet"])
def test_the_morph_measures_on_its_verification_forward(morph: str) -> None:
    torch.manual_seed(0)
    model, x = Counted(), torch.randn(4, 3, 6, 6)
    grow = {"deepen": lambda m, **kw: deepen(m, "body.3", kernel_size=3, inputs=x, **kw),
            "insert_subnet": lambda m, **kw: insert_subnet(m, "body.3", inputs=x, **kw)}[morph]
    counts = {}
    for rule in (False, True):
        model.calls = 0
        child = grow(model, step_rule=rule)
        counts[rule] = child.calls  # the parent's forwards, then (a copy) the child's
    assert counts[True] == counts[False] > 0  # the rule adds no forward of the model
    prefix = "body.3" if morph == "deepen" else "body.3.branch"
    block = child.get_submodule(prefix)
    kernel = 3 if morph == "deepen" else -1
    want = multipliers(block, block_input(child, block.first, x), kernel)
    param_map = last_report(child).param_map
    for name in (f"{prefix}.first.weight", f"{prefix}.second.bias"):
        assert param_map[name].lr_advice == want
    assert param_map[f"{prefix}.act.a"].lr_advice is None
    assert sum(n.startswith("step rule: lr multipliers") for n in last_report(child).notes) == 1
