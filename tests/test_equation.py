"""The composite kernel against running the two layers on real inputs, borders included."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from stablemorph.equation import (
    composite,
    feasibility,
    first_factor_map,
    min_mid_channels,
    pad_kernel,
    relative_residual,
    second_factor_map,
    sparsity,
)

CONV = {1: F.conv1d, 2: F.conv2d}

# (c_in, c_mid, c_out, k1, k2, stride, groups, padding of F1)
CASES = [
    (4, 6, 8, 3, 3, 1, 1, 1),
    (4, 6, 8, 3, 3, 2, 1, 1),
    (4, 8, 4, 3, 1, 2, 2, 1),
    (6, 6, 6, 3, 3, 1, 6, 1),  # depthwise
    (3, 5, 4, 1, 3, 2, 1, 0),
    (3, 5, 4, 5, 3, 1, 1, 2),
    (2, 4, 3, 2, 2, 1, 1, 0),  # even kernels
]


@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_composite_equals_two_layers_everywhere(nd: int, case: tuple[int, ...]) -> None:
    """F1 (stride s, padding p) then F2 (padding 0) is one conv with the composite kernel
    (stride s, padding p) on every output pixel, the border ones too."""
    ci, cm, co, k1, k2, s, g, p = case
    gen = torch.Generator().manual_seed(0)
    F1 = torch.randn(cm, ci // g, *[k1] * nd, generator=gen, dtype=torch.float64)
    F2 = torch.randn(co, cm // g, *[k2] * nd, generator=gen, dtype=torch.float64)
    x = torch.randn(2, ci, *[11, 13][:nd], generator=gen, dtype=torch.float64)
    conv = CONV[nd]
    two = conv(conv(x, F1, stride=s, padding=p, groups=g), F2, groups=g)
    one = conv(x, composite(F1, F2, s, g), stride=s, padding=p, groups=g)
    assert one.shape == two.shape
    assert_close(one, two, rtol=1e-12, atol=1e-12)


def test_same_padding_twice_is_not_exact_at_the_border() -> None:
    """The trap: two 'same'-padded convs differ from the composite conv near the border."""
    gen = torch.Generator().manual_seed(1)
    F1 = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    F2 = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(1, 2, 8, 8, generator=gen, dtype=torch.float64)
    same_twice = F.conv2d(F.conv2d(x, F1, padding=1), F2, padding=1)
    composite_conv = F.conv2d(x, composite(F1, F2), padding=2)
    interior = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert_close(same_twice[interior], composite_conv[interior])
    assert (same_twice - composite_conv).abs().max() > 1e-3


def test_linear_composite_is_matrix_product() -> None:
    gen = torch.Generator().manual_seed(2)
    F1 = torch.randn(5, 3, generator=gen)
    F2 = torch.randn(4, 5, generator=gen)
    assert_close(composite(F1, F2), F2 @ F1)


@pytest.mark.parametrize("case", CASES)
def test_factor_maps_are_the_linear_maps_of_the_composite(case: tuple[int, ...]) -> None:
    ci, cm, co, k1, k2, s, g, _ = case
    gen = torch.Generator().manual_seed(3)
    F1 = torch.randn(cm, ci // g, k1, k1, generator=gen, dtype=torch.float64)
    F2 = torch.randn(co, cm // g, k2, k2, generator=gen, dtype=torch.float64)
    G = composite(F1, F2, s, g)
    M2 = second_factor_map(F1, k2, s, g)
    via_f2 = torch.einsum("jrc,joc->jor", M2, F2.reshape(g, co // g, -1)).reshape(G.shape)
    assert_close(via_f2, G)
    M1 = first_factor_map(F2, k1, s, g)
    f1 = F1.reshape(g, cm // g, ci // g, -1).permute(0, 2, 1, 3).reshape(g, ci // g, -1)
    via_f1 = torch.einsum("jrc,jic->jir", M1, f1)
    expect = G.reshape(g, co // g, ci // g, -1).permute(0, 2, 1, 3).reshape(g, ci // g, -1)
    assert_close(via_f1, expect)


def test_pad_kernel_centres_and_rejects_odd_difference() -> None:
    G = torch.arange(9.0).reshape(1, 1, 3, 3)
    P = pad_kernel(G, 5)
    assert P.shape == (1, 1, 5, 5)
    assert_close(P[0, 0, 1:4, 1:4], G[0, 0])
    assert P.abs().sum() == G.abs().sum()
    with pytest.raises(ValueError, match="cannot centre a kernel of size 3 in size 4"):
        pad_kernel(G, 4)


def test_composite_rejects_mismatched_factors() -> None:
    with pytest.raises(ValueError, match="F1 has 3 output channels but F2 expects 4"):
        composite(torch.zeros(3, 2, 3, 3), torch.zeros(5, 4, 3, 3))
    with pytest.raises(ValueError, match="factors differ in kind"):
        composite(torch.zeros(3, 2, 3, 3), torch.zeros(5, 3))


def test_feasibility_counts() -> None:
    # a 1x1 second factor: exact and dense as soon as C_mid >= C_out
    assert feasibility(64, 64, 64, 3, 1).exact
    assert not feasibility(64, 63, 64, 3, 1).exact
    assert min_mid_channels(64, 64, 3, 1) == 64
    # 3x3 (*) 3x3 of a 3x3 parent: the cancelling-pairs construction needs 2 spare channels
    f = feasibility(64, 64, 64, 3, 3)
    assert not f.exact and f.nearest_mid == 66 and "C_mid >= 66" in f.message
    assert feasibility(64, 66, 64, 3, 3).how == "pairs"
    # one factor random and the other solved needs C_mid K2^2 >= C_in Kc^2
    assert feasibility(32, 96, 64, 3, 3).how == "solve-F2"
    # a generic 5x5 parent into 3x3 (*) 3x3: the parameter count decides (gauge subtracted)
    assert feasibility(64, 100, 64, 3, 3, k=5).how == "infeasible"
    assert feasibility(64, 128, 64, 3, 3, k=5).how == "nonlinear"
    with pytest.raises(ValueError, match="c_mid=6 must be a positive multiple of groups=4"):
        feasibility(8, 6, 8, 3, 3, groups=4)


def test_sparsity_counts_exact_and_near_zeros() -> None:
    t = torch.tensor([0.0, 1.0, -1.0, 1e-5])
    zeros, near = sparsity(t)
    assert zeros == 0.25 and near == 0.5


def test_relative_residual_of_exact_factors_is_tiny() -> None:
    gen = torch.Generator().manual_seed(4)
    F1 = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64)
    F2 = torch.randn(5, 6, 1, 1, generator=gen, dtype=torch.float64)
    assert relative_residual(F1, F2, composite(F1, F2)) < 1e-15
