"""The parametric activation: identity at a = 1, the plain activation at a = 0, per-channel
slopes on either channel dim, and the [0, 1] clamp."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stablemorph.activations import ACTIVATIONS, PAct, clamp_pact_, make_phi

torch.set_num_threads(1)

PHIS = {
    "relu": torch.relu,
    "leaky_relu": lambda x: nn.functional.leaky_relu(x, 0.01),
    "gelu": nn.functional.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}


def test_every_named_activation_is_covered() -> None:
    assert set(PHIS) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(PHIS))
@pytest.mark.parametrize("channels", [None, 5])
def test_identity_at_one_exactly(name: str, channels: int | None) -> None:
    x = torch.randn(3, 5, 4, 4) * 3
    act = PAct(name, channels=channels)
    torch.testing.assert_close(act(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(PHIS))
def test_interpolates_phi_and_identity(name: str) -> None:
    x = torch.randn(4, 3, 6)
    act = PAct(name, channels=3)
    with torch.no_grad():
        act.a.copy_(torch.tensor([0.0, 0.3, 1.0]))
    a = act.a.detach().reshape(1, 3, 1)
    expected = (1 - a) * PHIS[name](x) + a * x
    torch.testing.assert_close(act(x), expected)
    torch.testing.assert_close(act(x)[:, 0], PHIS[name](x[:, 0]))


def test_relu_pact_is_prelu_with_slope_a() -> None:
    x = torch.randn(8, 4)
    act = PAct("relu", channels=4, channel_dim=-1, a=0.25)
    prelu = nn.PReLU(4, init=0.25)
    torch.testing.assert_close(act(x), prelu(x))


def test_channel_dim_last_for_linear_features() -> None:
    x = torch.randn(2, 7, 3)  # (N, T, C)
    act = PAct("tanh", channels=3, channel_dim=-1)
    with torch.no_grad():
        act.a.copy_(torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(act(x)[..., 0], torch.tanh(x[..., 0]))
    torch.testing.assert_close(act(x)[..., 2], x[..., 2])


def test_gradient_reaches_a() -> None:
    act = PAct("relu", channels=2)
    x = -torch.ones(1, 2, 3)
    act(x).sum().backward()
    # d/da of x + (1 - a)(relu(x) - x) = x - relu(x) = -1 per element
    torch.testing.assert_close(act.a.grad, torch.full((2,), -3.0))


def test_clamp_keeps_a_in_unit_interval() -> None:
    model = nn.Sequential(nn.Linear(3, 3), PAct("relu", channels=3, channel_dim=-1),
                          nn.Sequential(PAct("gelu")))
    with torch.no_grad():
        model[1].a.copy_(torch.tensor([-0.5, 0.5, 1.5]))
        model[2][0].a.fill_(2.0)
    assert clamp_pact_(model) == 2
    torch.testing.assert_close(model[1].a.detach(), torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(model[2][0].a.detach(), torch.tensor(1.0))


def test_custom_module_phi_and_dtype() -> None:
    act = PAct(nn.Softplus(), channels=2, dtype=torch.float64, a=0.0)
    x = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(act(x), nn.functional.softplus(x))
    assert act.a.dtype == torch.float64


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        make_phi("swish")
    act = PAct("relu", channels=4)
    with pytest.raises(ValueError, match=r"PAct with 4 channels got input \(2, 3, 5\)"):
        act(torch.randn(2, 3, 5))
