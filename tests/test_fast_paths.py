"""The fast paths of issue 14 against the slow computations they replace, the density of the
cancelling-pairs construction, the reuse of probe outputs along a chain of morphs, and the
same work on CUDA where a device is present (skipped otherwise)."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from stablemorph import probe_outputs, solvers
from stablemorph.activations import PAct
from stablemorph.bilinear import _scatter_matrix
from stablemorph.equation import (
    composite,
    factor_shape,
    pad_kernel,
    relative_residual,
    sparsity,
)
from stablemorph.morphs import deepen
from stablemorph.record import last_report
from stablemorph.solvers import decompose

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def conv_residual(F1: torch.Tensor, F2: torch.Tensor, G: torch.Tensor, stride: int = 1,
                  groups: int = 1) -> float:
    """The residual as computed before issue 14: the float64 convolution of ``composite``."""
    comp = composite(F1.double(), F2.double(), stride, groups)
    target = pad_kernel(G.double(), comp.shape[-1]) if G.dim() > 2 else G.double()
    return float((comp - target).norm() / target.norm())


# (c_in, c_mid, c_out, k1, k2, stride, groups, nd)
CASES = [
    (8, 10, 8, 3, 3, 1, 1, 2),
    (6, 12, 10, 3, 3, 2, 1, 2),
    (8, 8, 8, 3, 3, 1, 8, 2),  # depthwise
    (8, 12, 4, 3, 1, 2, 2, 2),
    (5, 7, 6, 5, 3, 1, 1, 1),
    (5, 7, 6, 1, 1, 1, 1, 0),  # linear
]


@pytest.mark.parametrize("case", CASES)
def test_matrix_form_residual_equals_the_convolution(case: tuple[int, ...]) -> None:
    ci, cm, co, k1, k2, s, g, nd = case
    gen = torch.Generator().manual_seed(0)
    F1 = torch.randn(cm, ci // g, *[k1] * nd, generator=gen, dtype=torch.float64)
    F2 = torch.randn(co, cm // g, *[k2] * nd, generator=gen, dtype=torch.float64)
    kc = k1 + s * (k2 - 1)
    k = kc - 2 if kc > 2 else kc
    G = torch.randn(co, ci // g, *[k] * nd, generator=gen)
    # a non-trivial residual and a rounding-level one (exact factors cast to float32)
    assert_close(relative_residual(F1, F2, G, s, g), conv_residual(F1, F2, G, s, g),
                 rtol=1e-12, atol=0)
    exact = composite(F1, F2, s, g)
    f1, f2 = F1.float(), F2.float()
    cast = conv_residual(f1, f2, exact, s, g)
    assert 1e-9 < cast < 1e-6
    assert_close(relative_residual(f1, f2, exact, s, g), cast, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_matrix_form_is_the_composite_and_its_adjoint_the_gradient(case: tuple[int, ...]) -> None:
    """The taps-major matrix form the solvers iterate on: ``apply`` is the convolution's
    composite, the layout conversions invert each other, ``adjoint`` is autograd's gradient."""
    ci, cm, co, k1, k2, s, g, nd = case
    gen = torch.Generator().manual_seed(2)
    F1 = torch.randn(cm, ci // g, *[k1] * nd, generator=gen, dtype=torch.float64)
    F2 = torch.randn(co, cm // g, *[k2] * nd, generator=gen, dtype=torch.float64)
    shape = factor_shape(F1, F2, s, g)
    A, B = shape.f2_to_a(F2), shape.f1_to_b(F1)
    assert_close(shape.b_to_f1(B), F1, rtol=0, atol=0)
    assert_close(shape.a_to_f2(A), F2, rtol=0, atol=0)
    comp = composite(F1, F2, s, g)
    assert_close(shape.untarget(shape.apply(A, B)), comp, rtol=1e-12, atol=1e-12)
    assert_close(shape.apply(A, B), shape.target(comp), rtol=1e-12, atol=1e-12)
    U = torch.randn(shape.apply(A, B).shape, generator=gen, dtype=torch.float64)
    A.requires_grad_(True)
    B.requires_grad_(True)
    (shape.apply(A, B) * U).sum().backward()
    gA, gB = shape.adjoint(U, A.detach(), B.detach())
    assert_close(gA, A.grad, rtol=1e-12, atol=1e-12)
    assert_close(gB, B.grad, rtol=1e-12, atol=1e-12)


def test_sketched_residual_is_close_and_exact_when_it_covers_every_output() -> None:
    gen = torch.Generator().manual_seed(1)
    F1 = torch.randn(66, 64, 3, 3, generator=gen, dtype=torch.float64)
    F2 = torch.randn(64, 66, 3, 3, generator=gen, dtype=torch.float64)
    G = composite(F1, F2)
    f1, f2 = F1.float(), F2.float()  # a full-rank rounding residual, as after a cast
    exact = relative_residual(f1, f2, G)
    assert_close(relative_residual(f1, f2, G, probes=16), exact, rtol=0.15, atol=0)
    assert relative_residual(f1, f2, G, probes=64) == exact  # k >= C_out: the exact sum
    # a rank-one residual: still unbiased, within its larger spread
    bad = G.clone()
    bad[3] += 0.1 * torch.randn(64, 5, 5, generator=gen, dtype=torch.float64)
    est = [relative_residual(F1, F2, bad, probes=32, seed=s) for s in range(8)]
    assert_close(sum(e * e for e in est) / 8, relative_residual(F1, F2, bad) ** 2, rtol=0.3,
                 atol=0)


@pytest.mark.parametrize(("c_in", "c_out", "c_mid"), [(128, 128, 130), (64, 128, 66)])
def test_cancelling_pairs_leave_no_near_zeros(c_in: int, c_out: int, c_mid: int) -> None:
    """Measured before issue 14 at 128 channels: 1.5% near zeros (a Gaussian times a
    Gaussian on the identity's side); the second case is the mirrored construction."""
    gen = torch.Generator().manual_seed(2)
    G = torch.randn(c_out, c_in, 3, 3, generator=gen) * (2 / (9 * c_in)) ** 0.5
    F1, F2, rep = decompose(G, c_mid, (3, 3))
    assert rep.how == "pairs"
    assert rep.residual < 1e-13 and rep.residual_cast < 1e-7
    assert rep.zero_fraction == 0.0
    assert sparsity(F1)[1] < 0.002 and sparsity(F2)[1] < 0.002
    assert rep.near_zero_fraction == sparsity(F1, F2)[1]


@pytest.mark.parametrize(("c_in", "c_out", "c_mid"), [(128, 128, 130), (64, 128, 66),
                                                 (16, 8, 12)])
def test_pairs_rotation_of_the_identity_side_is_the_full_product(
        c_in: int, c_out: int, c_mid: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rotation skips the identity's zeros (identity in F2, in F1, and several groups of
    pairs): the same factors as the full product, to float64 rounding, and the same float32
    factors bit for bit."""
    gen = torch.Generator().manual_seed(4)
    G = torch.randn(c_out, c_in, 3, 3, generator=gen, dtype=torch.float64) * 0.1
    fast = decompose(G, c_mid, (3, 3), variant="pairs")
    monkeypatch.setattr(solvers, "_rotate_identity",
                        lambda F, X, used: torch.einsum("jnm,jmca->jnca", X, F))
    full = decompose(G, c_mid, (3, 3), variant="pairs")
    for a, b in zip(fast[:2], full[:2], strict=True):
        assert_close(a, b, rtol=0, atol=1e-15 * float(b.abs().max()))
        assert torch.equal(a.float(), b.float())
    assert fast[2].how == full[2].how == "pairs"


def test_levenberg_marquardt_mixed_precision_reaches_float64_tolerance() -> None:
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(8, 8, 5, 5, generator=gen, dtype=torch.float64) * 0.1
    F1, F2, rep = decompose(G, 16, (3, 3), tol=1e-12)
    assert rep.how == "lm" and rep.residual <= 1e-12
    assert conv_residual(F1, F2, G) <= 1e-12


class _Counted(nn.Sequential):
    """Counts the forward calls of one instance (``watched``); deep copies are not counted."""

    watched: object = None
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self is _Counted.watched:
            _Counted.calls += 1
        return super().forward(x)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return _Counted(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                    nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_a_chain_of_morphs_runs_each_model_once_on_the_probe() -> None:
    model = _net()
    x = torch.randn(4, 3, 8, 8)
    child = deepen(model, "0", kernel_size=3, inputs=x)
    _Counted.watched, _Counted.calls = child, 0
    grand = deepen(child, "3", kernel_size=3, inputs=x)
    # its eval and train outputs were known from the first check; only the float64 copy for
    # the noise floor runs (a deep copy: not counted)
    assert _Counted.calls == 0
    assert last_report(grand).max_rel < 1e-5
    # an in-place change (an optimiser step) makes it run again, in both modes
    with torch.no_grad():
        child[8].weight.add_(0.01)
    deepen(child, "3", kernel_size=3, inputs=x)
    assert _Counted.calls == 2
    # and so does a different probe
    deepen(child, "3", kernel_size=3, inputs=x + 1)
    assert _Counted.calls == 4
    _Counted.watched = None


def test_cached_outputs_equal_a_fresh_run() -> None:
    model = _net()
    x = torch.randn(4, 3, 8, 8)
    child = deepen(model, "0", kernel_size=3, inputs=x)
    cached = probe_outputs.lookup(child, (x,), "train")
    assert cached is not None
    leaves, _ = cached
    child.train()
    fresh = child(x)
    assert_close(leaves[0][1], fresh, rtol=0, atol=0)
    probe_outputs.forget(child)
    assert probe_outputs.lookup(child, (x,), "train") is None


@pytest.mark.parametrize("device", DEVICES)
def test_decompose_stays_on_the_device_and_matches_the_cpu(device: str) -> None:
    gen = torch.Generator().manual_seed(4)
    G = torch.randn(16, 16, 3, 3, generator=gen) * 0.1
    for ks, cm in (((3, 3), 18), ((3, 1), 16), ((3, 3), 48)):
        F1, F2, rep = decompose(G.to(device), cm, ks, residual_probes=8)
        assert F1.device.type == F2.device.type == device
        assert F1.dtype == F2.dtype == torch.float32
        C1, C2, _ = decompose(G, cm, ks, residual_probes=8)
        assert_close(F1.cpu(), C1, rtol=1e-5, atol=1e-6)
        assert_close(F2.cpu(), C2, rtol=1e-5, atol=1e-6)
        assert rep.residual < 1e-10


@pytest.mark.parametrize("device", DEVICES)
def test_deepen_grows_on_the_device(device: str) -> None:
    model = _net().to(device)
    x = torch.randn(4, 3, 8, 8, device=device)
    child = deepen(model, "3", kernel_size=3, inputs=x)
    assert {p.device.type for p in child.parameters()} == {device}
    assert {p.dtype for p in child.parameters()} == {torch.float32}
    assert last_report(child).max_rel < 1e-5


def test_a_solve_under_inference_mode_leaves_the_matrix_form_usable_by_autograd() -> None:
    """The tap-scatter matrix is cached: one first built under ``torch.inference_mode`` must
    still serve a later solve that autograd records (as the benchmark's Adam does)."""
    _scatter_matrix.cache_clear()
    G = torch.randn(6, 6, 5, 5, generator=torch.Generator().manual_seed(6),
                    dtype=torch.float64) * 0.1
    with torch.inference_mode():
        F1, F2, rep = decompose(G, 12, (3, 3))
    assert rep.residual <= 1e-10
    shape = factor_shape(F1, F2)
    A = shape.f2_to_a(F2.clone()).requires_grad_(True)
    loss = (shape.apply(A, shape.f1_to_b(F1.clone())) - shape.target(pad_kernel(G, 5))).pow(2)
    loss.sum().backward()
    assert A.grad is not None and A.grad.abs().max() < 1e-8


class CountingReLU(nn.ReLU):
    """A ReLU that counts its calls (to see whether PAct's formula ran)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CountingReLU.calls += 1
        return super().forward(x)


def pact_formula(act: PAct, x: torch.Tensor) -> torch.Tensor:
    """``(1 - a) phi(x) + a x`` written out as the slow path computes it."""
    a = act._a_shaped(x)
    return x + (1 - a) * (act.phi(x) - x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [None, 6])
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "sigmoid", "leaky_relu"])
def test_pact_identity_fast_path_is_the_formula(dtype: torch.dtype, channels: int | None,
                                                activation: str) -> None:
    act = PAct(activation, channels=channels, dtype=dtype)
    x = torch.randn(3, 6, 5, 5, generator=torch.Generator().manual_seed(1), dtype=dtype) * 50
    with torch.no_grad():
        fast = act(x)
        want = pact_formula(act, x)
    assert torch.equal(fast, want) and fast.dtype == want.dtype
    assert fast.data_ptr() != x.data_ptr()  # a fresh tensor, as the formula gives


def test_pact_fast_path_taken_only_at_one_without_gradients() -> None:
    act = PAct(CountingReLU(), channels=4)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    CountingReLU.calls = 0
    with torch.no_grad():
        act(x)
    assert CountingReLU.calls == 0  # a = 1, no gradient: the formula is skipped
    y = act(x)  # gradients recorded: the formula runs and a gets its gradient
    assert CountingReLU.calls == 1
    y.sum().backward()
    assert_close(act.a.grad, (x - torch.relu(x)).sum((0, 2, 3)))
    with torch.no_grad():
        act.a[1] = 0.5  # an in-place change: the cached answer is renewed
        out = act(x)
    assert CountingReLU.calls == 2
    with torch.no_grad():
        assert torch.equal(out, pact_formula(act, x))  # phi's third call
        act.a.fill_(1.0)
        assert torch.equal(act(x), x)
    assert CountingReLU.calls == 3


def test_pact_fast_path_keeps_the_formulas_dtype_promotion() -> None:
    act = PAct("relu", channels=4, dtype=torch.float64)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = act(x)
    assert out.dtype == torch.float64
    assert torch.equal(out, pact_formula(act, x))
