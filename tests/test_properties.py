"""Property-based tests (hypothesis): random small models and random morph sequences.

Models: CNNs of 1-4 blocks (plain conv blocks with random kernels, strides, groups, norms and
activations; residual adds; channel concats) and MLPs (LayerNorm/BatchNorm, residual adds),
each with a Linear head. Sequences: 1-3 morphs (deepen, widen, enlarge_kernel,
insert_subnet; every scheme) on random Conv/Linear layers of the current model.

Properties, for every step: the result is exact (``verify`` accepts it, eval and train mode)
or a :class:`MorphError` that names the layer; the model morphed is untouched (state dict,
modes). CI runs a few examples (``SM_PROPERTY_EXAMPLES``, default 8); a larger sweep:
``SM_PROPERTY_EXAMPLES=300 OMP_NUM_THREADS=1 pytest tests/test_properties.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from stablemorph.morphs import SCHEMES, MorphError, apply
from stablemorph.verify import default_tolerance, verify

torch.set_num_threads(1)

EXAMPLES = int(os.environ.get("SM_PROPERTY_EXAMPLES", "8"))
ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "leaky": lambda: nn.LeakyReLU(0.1),
        "none": nn.Identity}


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int, groups: int, norm: str,
                 act: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups)
        self.norm = (nn.BatchNorm2d(c_out) if norm == "bn" else nn.GroupNorm(1, c_out)
                     if norm == "gn" else nn.Identity())
        self.act = ACTS[act]()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class ResBlock(nn.Module):
    def __init__(self, c: int, k: int, norm: str, act: str) -> None:
        super().__init__()
        self.body = ConvBlock(c, c, k, 1, 1, norm, act)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class CatBlock(nn.Module):
    def __init__(self, c_in: int, a: int, b: int, act: str) -> None:
        super().__init__()
        self.a = nn.Conv2d(c_in, a, 3, padding=1)
        self.b = nn.Conv2d(c_in, b, 1)
        self.act = ACTS[act]()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(torch.cat([self.a(x), self.b(x)], dim=1))


class CNN(nn.Module):
    def __init__(self, blocks: list[nn.Module], c: int, classes: int = 5) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.pool(self.blocks(x)), 1))


class MLPBlock(nn.Module):
    def __init__(self, d_in: int, d_out: int, norm: str, act: str, residual: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.norm = (nn.LayerNorm(d_out) if norm == "ln" else nn.BatchNorm1d(d_out)
                     if norm == "bn" else nn.Identity())
        self.act = ACTS[act]()
        self.residual = residual and d_in == d_out

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.norm(self.fc(x)))
        return x + h if self.residual else h


class MLP(nn.Module):
    def __init__(self, blocks: list[nn.Module], d: int, classes: int = 5) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x))


@st.composite
def models(draw: st.DrawFn) -> tuple[nn.Module, Tensor]:
    """A random small model (CNN or MLP) with random weights and a probe batch."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    if draw(st.booleans()):
        side = draw(st.integers(5, 9))
        c, size, blocks = 3, side, []
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["conv", "conv", "res", "cat"]))
            act = draw(st.sampled_from(sorted(ACTS)))
            if kind == "conv":
                c_out = draw(st.integers(2, 8))
                groups = draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0
                                               and c_out % g == 0]))
                stride = draw(st.sampled_from([1, 2] if size >= 4 else [1]))
                k = draw(st.sampled_from([1, 3, 5]))
                blocks.append(ConvBlock(c, c_out, k, stride, groups,
                                        draw(st.sampled_from(["bn", "gn", "none"])), act))
                c, size = c_out, (size - 1) // stride + 1
            elif kind == "res":
                blocks.append(ResBlock(c, draw(st.sampled_from([1, 3])),
                                       draw(st.sampled_from(["bn", "none"])), act))
            else:
                a, b = draw(st.integers(1, 4)), draw(st.integers(1, 4))
                blocks.append(CatBlock(c, a, b, act))
                c = a + b
        model: nn.Module = CNN(blocks, c)
        x = torch.randn(4, 3, side, side)
    else:
        d_in = d = draw(st.integers(2, 10))
        blocks = []
        for _ in range(draw(st.integers(1, 3))):
            d_out = draw(st.integers(2, 10))
            blocks.append(MLPBlock(d, d_out, draw(st.sampled_from(["ln", "bn", "none"])),
                                   draw(st.sampled_from(sorted(ACTS))), draw(st.booleans())))
            d = d_out
        model = MLP(blocks, d)
        x = torch.randn(6, d_in)
    _settle(model, x)
    return model, x


def _settle(model: nn.Module, x: Tensor) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, then eval mode."""
    with torch.no_grad():
        model.train()
        for _ in range(2):
            model(x * 1.5 + 0.2)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | nn.GroupNorm | nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    model.eval()


def _morph_step(draw: st.DrawFn, model: nn.Module) -> tuple[str, str, dict]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    name, layer = draw(st.sampled_from(layers))
    ops = ["deepen", "widen", "insert_subnet"] + (["enlarge_kernel"]
                                                  if isinstance(layer, nn.Conv2d) else [])
    op = draw(st.sampled_from(ops))
    kw: dict = {"scheme": draw(st.sampled_from(SCHEMES))}
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if op == "widen":
        kw["width"] = out + draw(st.integers(1, 3))
    elif op == "enlarge_kernel":
        kw["kernel_size"] = layer.kernel_size[0] + 2
    elif op == "deepen" and isinstance(layer, nn.Conv2d) and draw(st.booleans()):
        kw["kernel_size"] = 3  # a second 3x3 layer: K1 + stride * 2 - K must be even
    return op, name, kw


def _state(model: nn.Module) -> tuple[dict[str, Tensor], list[bool]]:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()])


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 20, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_morph_sequences_are_exact_or_refused_by_name(data: st.DataObject) -> None:
    model, x = data.draw(models())
    for _ in range(data.draw(st.integers(1, 3))):
        op, target, kw = _morph_step(data.draw, model)
        state, modes = _state(model)
        try:
            child = apply(op, model, target, inputs=x, **kw)
        except MorphError as err:
            assert target in str(err), f"{op} {target} {kw}: {err}"
            child = None
        after, modes_after = _state(model)
        assert list(after) == list(state) and modes_after == modes
        for k, v in state.items():
            torch.testing.assert_close(after[k], v, rtol=0, atol=0)
        if child is None:
            continue
        report = verify(model, child, x)
        assert report.ok(default_tolerance(torch.float32)), (op, target, kw, report.describe())
        model = child


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_fixed_sequence_on_a_residual_cnn(scheme: str) -> None:
    """One deterministic case per scheme beside the random ones: deepen, widen, insert."""
    torch.manual_seed(0)
    model = CNN([ConvBlock(3, 4, 3, 1, 1, "bn", "relu"), ResBlock(4, 3, "bn", "relu"),
                 CatBlock(4, 2, 3, "gelu")], 5)
    x = torch.randn(4, 3, 8, 8)
    _settle(model, x)
    child = apply("deepen", model, "blocks.1.body.conv", inputs=x, scheme=scheme)
    child = apply("widen", child, "blocks.0.conv", inputs=x, scheme=scheme, width=6)
    child = apply("insert_subnet", child, "head", inputs=x, scheme=scheme)
    assert verify(model, child, x).ok(1e-5)
