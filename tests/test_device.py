"""Growth stays on the model's device and in its dtype: deepen (cancelling pairs and the
Levenberg-Marquardt path), widen and the bare solver, on the CPU always and on CUDA where a
device is present (skipped otherwise). Every morph runs with ``Tensor.cpu`` and
``Tensor.numpy`` made to raise, so a silent copy to the host fails the test on any device."""

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from stablemorph.equation import composite
from stablemorph.morphs import deepen, widen
from stablemorph.record import last_report
from stablemorph.solvers import decompose

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
PLACES = [("cpu", torch.float32), ("cpu", torch.float64),
          pytest.param("cuda", torch.float32, marks=CUDA),
          pytest.param("cuda", torch.float64, marks=CUDA)]


@pytest.fixture
def no_host_copies(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(self: torch.Tensor, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"a {tuple(self.shape)} tensor on {self.device} was copied to the "
                             f"host during growth")

    monkeypatch.setattr(torch.Tensor, "cpu", refuse)
    monkeypatch.setattr(torch.Tensor, "numpy", refuse)
    yield


def _net(kernel: int, device: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    p = kernel // 2
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel, padding=p), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, kernel, padding=p), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).to(device, dtype)


def _grow(morph: Callable[..., nn.Module], kernel: int, device: str, dtype: torch.dtype,
          target: str, **kwargs: object) -> nn.Module:
    """``morph`` of a two-conv net with ``kernel``-sized convs on ``device`` in ``dtype``; the
    child checked to be there, in that dtype, exact and dense."""
    model = _net(kernel, device, dtype)
    x = torch.randn(4, 3, 8, 8, device=device, dtype=dtype)
    child = morph(model, target, inputs=x, **kwargs)
    assert {p.device.type for p in child.parameters()} == {device}
    assert {p.dtype for p in child.parameters()} == {dtype}
    report = last_report(child)
    assert report.max_rel < (1e-5 if dtype == torch.float32 else 1e-9)  # solver tol 1e-10
    assert report.near_zero_fraction < 0.01
    return child


@pytest.mark.parametrize(("device", "dtype"), PLACES)
def test_deepen_with_a_3x3_second_factor_stays_put(
    device: str, dtype: torch.dtype, no_host_copies: None
) -> None:
    child = _grow(deepen, 3, device, dtype, "3", kernel_size=3)
    convs = [m for m in child[3].modules() if isinstance(m, nn.Conv2d)]
    assert [c.weight.shape[-1] for c in convs] == [3, 3]


@pytest.mark.parametrize(("device", "dtype"), PLACES)
def test_deepen_of_a_5x5_conv_into_two_3x3_stays_put(
    device: str, dtype: torch.dtype, no_host_copies: None
) -> None:
    """A generic 5x5 target: the Levenberg-Marquardt path, its float32 inner solve included."""
    child = _grow(deepen, 5, device, dtype, "3", kernel_size=3, first_kernel_size=3)
    assert any("via lm" in note for note in last_report(child).notes)


@pytest.mark.parametrize(("device", "dtype"), PLACES)
def test_widen_stays_put(device: str, dtype: torch.dtype, no_host_copies: None) -> None:
    child = _grow(widen, 3, device, dtype, "0", width=10)
    assert child[0].weight.shape[0] == 10


@pytest.mark.parametrize(("device", "dtype"), PLACES)
def test_levenberg_marquardt_solves_on_the_device_like_the_cpu(
    device: str, dtype: torch.dtype, no_host_copies: None
) -> None:
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(6, 6, 5, 5, generator=gen, dtype=torch.float64) * 0.1
    F1, F2, rep = decompose(G.to(device, dtype), 12, (3, 3))
    assert rep.how == "lm" and rep.residual <= 1e-10
    assert F1.device.type == F2.device.type == device
    assert F1.dtype == F2.dtype == dtype
    # the factors compose to the target (checked on the CPU, after the solve)
    comp = composite(F1.to("cpu", torch.float64), F2.to("cpu", torch.float64))
    scale = G.abs().max()
    assert_close(comp / scale, G / scale, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-9)
