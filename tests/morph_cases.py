"""Shared parents and real inputs for the morph tests (imported by tests/test_morph_*.py).

Parents are the zoo's small models (plus a few hand-written graphs the zoo lacks), briefly
trained on real data (scikit-learn's 8x8 digits) so that weights, biases and BatchNorm
statistics look like a trained network's rather than a fresh initialisation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from stablemorph.zoo import build_model

torch.set_num_threads(1)

RTOL = 1e-5  # the float32 exactness contract


@functools.cache
def digits() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as ``(N, 1, 8, 8)`` float32 in about [-1, 1.3], and their labels."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.tensor(data.target)


def batch(kind: str = "image", n: int = 16, offset: int = 0) -> Tensor:
    """Real inputs: images ``(n, 1, 8, 8)``, or sequences ``(n, 1, 64)`` for ``"seq"``."""
    x = digits()[0][offset:offset + n]
    return x.reshape(n, 1, 64) if kind == "seq" else x


class ConcatNet(nn.Module):
    """Two branches concatenated, then a conv: channel offsets for widening, LeakyReLU/GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(1, 3, 1)
        self.act_a = nn.LeakyReLU(0.1)
        self.c = nn.Conv2d(7, 6, 3, padding=1, bias=False)
        self.act_c = nn.GELU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(24, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([self.act_a(self.bn_a(self.a(x))), self.b(x)], dim=1)
        h = self.pool(self.act_c(self.c(h)))
        return self.head(torch.flatten(h, 1))


class NormMLP(nn.Module):
    """Linear -> LayerNorm -> GELU -> Linear -> sigmoid -> Linear; a BatchNorm1d MLP path."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 8)
        self.ln = nn.LayerNorm(8)
        self.act1 = nn.GELU()
        self.fc2 = nn.Linear(8, 6)
        self.bn = nn.BatchNorm1d(6)
        self.act2 = nn.Sigmoid()
        self.head = nn.Linear(6, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act1(self.ln(self.fc1(x.flatten(1))))
        return self.head(self.act2(self.bn(self.fc2(h))))


class GroupedNet(nn.Module):
    """A grouped conv (groups=2) with bias and stride 2 between dense convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.grouped = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.act2 = nn.Tanh()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act2(self.grouped(self.act1(self.conv1(x))))
        return self.head(self.pool(h).flatten(1))


# name -> (factory, input kind)
MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "mlp": (lambda: build_model("mlp", in_features=64, hidden=(12, 10), activation="tanh"),
            "image"),
    "cnn": (lambda: build_model("cnn", in_channels=1, widths=(4, 6), image_size=8), "image"),
    "vgg": (lambda: build_model("vgg", in_channels=1, stages=((4,), (6, 6))), "image"),
    "resnet": (lambda: build_model("resnet", in_channels=1, layers=(1, 1), widths=(4, 8)),
               "image"),
    "depthwise": (lambda: build_model("depthwise", in_channels=1, stem_width=4, widths=(6, 8),
                                      strides=(1, 2)), "image"),
    "cnn1d": (lambda: build_model("cnn1d", in_channels=1, widths=(4, 6), length=64), "seq"),
    "concat": (ConcatNet, "image"),
    "norm_mlp": (NormMLP, "image"),
    "grouped": (GroupedNet, "image"),
}


@functools.cache
def _trained(name: str) -> nn.Module:
    factory, kind = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    x, y = digits()
    x = x.reshape(-1, 1, 64) if kind == "seq" else x
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(12):
        lo = (step * 64) % 1600
        loss = nn.functional.cross_entropy(model(x[lo:lo + 64]), y[lo:lo + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def parent(name: str) -> nn.Module:
    """A briefly trained parent, in train mode (a fresh deep copy per call)."""
    import copy

    return copy.deepcopy(_trained(name)).train()


def inputs(name: str, n: int = 16) -> Tensor:
    return batch(MODELS[name][1], n)


def layer_names(model: nn.Module, kinds: tuple[type, ...]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def assert_same_function(parent_model: nn.Module, child: nn.Module, x: Tensor,
                         rtol: float = RTOL) -> None:
    """Eval and train mode outputs agree to ``rtol`` of the output scale (BN batch stats in
    train mode), checked with ``torch.testing.assert_close``; modes and buffers restored."""
    from stablemorph.verify import preserved_state

    for train in (False, True):
        with preserved_state(parent_model), preserved_state(child), torch.no_grad():
            parent_model.train(train)
            child.train(train)
            want, got = parent_model(x), child(x)
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=0, atol=rtol * scale)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything the caller could lose: tensors (cloned), modes, requires_grad."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "grad": [p.requires_grad for p in model.parameters()],
    }


def assert_untouched(model: nn.Module, snap: dict[str, Any]) -> None:
    state = model.state_dict()
    assert list(state) == list(snap["state"])
    for k, v in snap["state"].items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, equal_nan=True)
    assert [m.training for m in model.modules()] == snap["modes"]
    assert [p.requires_grad for p in model.parameters()] == snap["grad"]
