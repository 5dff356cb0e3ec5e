"""decompose(): residuals, zeros, the three schemes, stride and groups, the error paths."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from stablemorph.equation import composite, pad_kernel
from stablemorph.solvers import DecompositionError, balance, decompose


def trained_looking(c_out: int, c_in: int, k: int, seed: int = 0) -> torch.Tensor:
    """A kernel with the structure of trained filters: smooth, low-rank-ish, a few strong
    channels, not i.i.d. noise."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(c_out, 4, generator=gen) @ torch.randn(4, c_in * k * k, generator=gen)
    smooth = base.reshape(c_out, c_in, k, k)
    smooth = smooth + 0.3 * torch.randn(c_out, c_in, k, k, generator=gen)
    return 0.05 * smooth * torch.linspace(0.2, 2.0, c_out).reshape(-1, 1, 1, 1)


def random_kernel(c_out: int, c_in: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(c_out, c_in, k, k, generator=gen)


KERNELS = {"random": random_kernel, "trained": trained_looking}

# (c_in, c_out, k, c_mid, (k1, k2), stride, groups, expected path)
STABLE_CASES = [
    (16, 16, 3, 16, (3, 1), 1, 1, "solve-F1"),  # 3x3 (*) 1x1, C_mid = C_out
    (16, 16, 3, 24, (3, 1), 2, 1, "solve-F1"),  # with stride
    (8, 16, 3, 48, (3, 3), 1, 1, "solve-F2"),  # enough middle channels: one side random
    (16, 16, 3, 20, (3, 3), 1, 1, "pairs"),  # zero-ringed target, few spare channels
    (16, 16, 3, 20, (3, 3), 2, 1, "pairs"),
    (8, 8, 3, 24, (3, 3), 1, 8, "pairs"),  # depthwise
    (8, 8, 3, 32, (3, 3), 1, 2, "solve-F2"),  # grouped
    (6, 6, 5, 12, (3, 3), 1, 1, "lm"),  # generic 5x5 target: Levenberg-Marquardt
]


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize(
    "case", STABLE_CASES, ids=[c[-1] + str(i) for i, c in enumerate(STABLE_CASES)]
)
def test_stable_is_exact_and_dense(kind: str, case: tuple) -> None:
    ci, co, k, cm, ks, s, g, path = case
    G = KERNELS[kind](co, ci // g, k)
    F1, F2, rep = decompose(G, cm, ks, method="stable", stride=s, groups=g)
    assert rep.how == path
    assert F1.shape == (cm, ci // g, ks[0], ks[0]) and F2.shape == (co, cm // g, ks[1], ks[1])
    assert F1.dtype == G.dtype == F2.dtype
    assert rep.residual <= 1e-10
    assert rep.residual_cast <= 1e-6
    assert rep.zero_fraction == 0.0
    assert (F1 != 0).all() and (F2 != 0).all()
    assert rep.near_zero_fraction < 0.01
    # the two layers, run on a real input, equal the parent conv (borders included)
    x = torch.randn(2, ci, 9, 10, dtype=torch.float64)
    kc = ks[0] + s * (ks[1] - 1)
    p = (kc - k) // 2 + k // 2
    parent = F.conv2d(x, G.double(), stride=s, padding=k // 2, groups=g)
    child = F.conv2d(F.conv2d(x, F1.double(), stride=s, padding=p, groups=g), F2.double(), groups=g)
    scale = parent.abs().max()
    assert_close(child / scale, parent / scale, rtol=0, atol=1e-6)


def test_stable_linear_layer_keeps_random_null_space() -> None:
    """With C_mid > C_in the solved factor is the random start plus a minimum-norm correction,
    not the bare minimum-norm solution: two seeds give different, equally exact factors."""
    G = torch.randn(10, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a1, a2, r = decompose(G, 30, method="stable", seed=0)
    b1, b2, _ = decompose(G, 30, method="stable", seed=1)
    assert r.residual < 1e-12 and r.zero_fraction == 0.0
    assert_close(a2 @ a1, G)
    assert_close(b2 @ b1, G)
    assert (a1 - b1).abs().max() > 0.1


def test_netmorph_practical_and_net2net_leave_zeros() -> None:
    G = trained_looking(16, 16, 3)
    _, F2, rep = decompose(G, 16, (3, 3), method="netmorph")
    assert rep.how == "practical" and rep.residual < 1e-10
    assert rep.zero_fraction > 0.25
    assert (F2[..., 0, :] == 0).all()  # the shrunken 1x1 factor, zero-padded back to 3x3
    _, _, rep = decompose(G, 16, (3, 3), method="net2net")
    assert rep.how == "identity" and rep.residual == 0.0 and rep.zero_fraction > 0.45


def test_netmorph_als_solves_and_equalises_std() -> None:
    G = random_kernel(8, 8, 3)
    F1, F2, rep = decompose(G, 32, (3, 3), method="netmorph", variant="als", tol=1e-9)
    assert rep.how == "als" and rep.residual < 1e-9
    assert_close(F1.std(), F2.std(), rtol=1e-4, atol=0)


def test_net2net_identity_first_with_groups() -> None:
    G = random_kernel(8, 2, 3)  # groups=4: C_in = 8
    F1, F2, rep = decompose(G, 8, (1, 3), method="net2net", variant="identity-first", groups=4)
    assert rep.residual == 0.0
    assert_close(composite(F1.double(), F2.double(), groups=4), G.double())


def test_balance_keeps_product_and_equalises_scale() -> None:
    gen = torch.Generator().manual_seed(5)
    F1 = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64) * 100
    F2 = torch.randn(5, 6, 3, 3, generator=gen, dtype=torch.float64) * 0.01
    B1, B2 = balance(F1, F2)
    assert_close(composite(B1, B2), composite(F1, F2))
    ratio = (B1.std() / (2 / 36) ** 0.5) / (B2.std() / (2 / 54) ** 0.5)
    assert 0.5 < float(ratio) < 2


def test_infeasible_request_is_refused_before_solving() -> None:
    G = random_kernel(16, 16, 3)
    with pytest.raises(DecompositionError, match=r"use C_mid >= 18"):
        decompose(G, 16, (3, 3), method="stable")


def test_allow_approximate_returns_best_with_residual() -> None:
    G = random_kernel(6, 6, 3)
    *_, rep = decompose(G, 6, (3, 3), method="stable", allow_approximate=True, max_iter=5)
    assert rep.residual > 1e-6
    assert any("no dense exact solution" in n for n in rep.notes)


def test_tolerance_miss_raises_with_residual() -> None:
    G = random_kernel(8, 8, 3)
    with pytest.raises(DecompositionError, match=r"reached relative residual .* > tol"):
        decompose(G, 8, (3, 3), method="netmorph", variant="als", max_iter=2, tol=1e-14)


@pytest.mark.parametrize(
    ("G", "kwargs", "message"),
    [
        (torch.full((4, 4, 3, 3), float("nan")), {}, "non-finite"),
        (torch.zeros(4, 4, 3, 2), {}, "only square kernels"),
        (torch.zeros(4), {}, "linear, Conv1d or Conv2d weight"),
        (torch.zeros(4, 4, 3, 3), {"method": "magic"}, "unknown method 'magic'"),
        (torch.zeros(4, 4, 3, 3), {"variant": "x"}, "unknown variant 'x'"),
        (torch.zeros(4, 4, 3, 3), {"kernel_sizes": (2, 1)}, "cannot hold the parent's 3x3"),
        (torch.zeros(4, 4), {"kernel_sizes": (3, 1)}, "linear weight has no kernel"),
        (torch.zeros(4, 2, 3, 3), {"groups": 2, "mid_channels": 3}, "multiples of groups=2"),
    ],
)
def test_bad_input_is_rejected(G: torch.Tensor, kwargs: dict, message: str) -> None:
    before = G.clone()
    kwargs = {"mid_channels": 8, **kwargs}
    with pytest.raises(DecompositionError, match=message):
        decompose(G, **kwargs)
    assert_close(G, before, equal_nan=True)


def test_factors_follow_dtype_and_padding_target() -> None:
    G = random_kernel(8, 4, 3).double()
    F1, F2, rep = decompose(G, 24, (3, 3))
    assert F1.dtype == torch.float64
    assert_close(composite(F1, F2), pad_kernel(G, 5), rtol=0, atol=1e-12)
    assert rep.residual_cast == pytest.approx(rep.residual, rel=1e-3, abs=1e-15)


def test_netmorph_deepen_of_a_one_channel_conv_is_finite_and_exact() -> None:
    """NetMorph's equal-std normalisation took the (Bessel) std of a one-element factor: NaN."""
    import stablemorph as sm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3, padding=1))
    x = torch.randn(4, 3, 8, 8)
    child = sm.deepen(model, "0", scheme="netmorph", inputs=x)
    torch.testing.assert_close(child(x), model(x), rtol=1e-5, atol=1e-6)
