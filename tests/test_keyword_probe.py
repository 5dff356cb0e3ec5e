"""widen on a model whose forward takes keyword inputs and optional parameters: the probe as a
dict of keyword inputs, parameters left at their defaults traced as such, and the refusals."""

from __future__ import annotations

import pytest
import torch
from morph_cases import assert_untouched, snapshot
from torch import Tensor, nn

import stablemorph as sm


class Gated(nn.Module):
    """``forward(x, scale=1.0, mask=None)``: optional inputs a probe may leave out."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor, scale: float = 1.0, mask: Tensor | None = None) -> Tensor:
        y = self.fc2(torch.relu(self.fc1(x))) * scale
        return y if mask is None else y * mask


@pytest.mark.parametrize("scheme", ["stable", "netmorph", "net2net"])
@pytest.mark.parametrize("keys", [(), ("mask",), ("mask", "scale")])
def test_widen_takes_a_dict_probe_and_leaves_the_rest_at_defaults(
        scheme: str, keys: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = Gated()
    extra = {"mask": torch.rand(5, 3), "scale": torch.tensor(2.0)}
    probe = {"x": torch.randn(5, 6), **{k: extra[k] for k in keys}}
    child = sm.widen(model, "fc1", 12, scheme=scheme, inputs=probe)
    assert child.fc1.out_features == 12 and child.fc2.in_features == 12
    torch.testing.assert_close(child(**probe), model(**probe), rtol=1e-5, atol=1e-6)
    assert sm.last_report(child).max_rel < 1e-5


def test_a_positional_probe_leaves_optional_parameters_at_their_defaults() -> None:
    torch.manual_seed(0)
    model, x = Gated(), torch.randn(5, 6)
    child = sm.widen(model, "fc1", 12, inputs=x)
    torch.testing.assert_close(child(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("probe", "message"), [
    ({"x": torch.randn(5, 6), "bogus": 1}, "unexpected keyword argument 'bogus'"),
    ({"scale": 2.0}, "missing 1 required positional argument: 'x'"),
])
def test_a_dict_probe_that_does_not_fit_is_refused(probe: dict, message: str) -> None:
    model = Gated()
    snap = snapshot(model)
    with pytest.raises(sm.MorphError, match=message):
        sm.widen(model, "fc1", 12, inputs=probe)
    assert_untouched(model, snap)
