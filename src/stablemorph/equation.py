"""The network morphism equation ``G~ = F2 (*) F1``: composite kernels, the linear maps of one
factor given the other, feasibility counts, and sparsity measures.

Shapes (``nd`` spatial dims: 0 for linear layers, 1 for Conv1d, 2 for Conv2d; ``g`` groups):

- ``F1``: ``(C_mid, C_in/g, K1, ...)``, the first layer; it carries the stride ``s``.
- ``F2``: ``(C_out, C_mid/g, K2, ...)``, the second layer, stride 1.
- composite ``G~``: ``(C_out, C_in/g, Kc, ...)`` with ``Kc = K1 + s (K2 - 1)``.

Running ``F1`` (stride ``s``, padding ``p``) then ``F2`` (stride 1, padding 0) equals one conv
with ``G~`` (stride ``s``, padding ``p``) everywhere, borders included. Two "same"-padded
convs would not be: the inner zero padding differs from convolving the padded image.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from stablemorph.bilinear import BilinearShape

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def spatial_dims(kernel: Tensor) -> int:
    """Number of spatial dims of a weight: 0 (linear), 1, 2 or 3."""
    if kernel.dim() < 2 or kernel.dim() > 5:
        raise ValueError(
            f"a kernel must have 2 to 5 dims (linear or conv), got {tuple(kernel.shape)}"
        )
    return kernel.dim() - 2


def composite_size(k1: int, k2: int, stride: int = 1) -> int:
    """Kernel size of ``F2 (*) F1`` when ``F1`` has kernel ``k1`` and stride ``stride``."""
    return k1 + stride * (k2 - 1)


def composite(F1: Tensor, F2: Tensor, stride: int = 1, groups: int = 1) -> Tensor:
    """The composite kernel ``F2 (*) F1`` of running layer ``F1`` then layer ``F2``.

    Differentiable in both factors. For linear layers (2-D weights) it is ``F2 @ F1``.
    For convolutions it is ``conv(F1^T, flip(F2), padding=s (K2-1), dilation=s)^T``, computed
    per group by a grouped convolution.
    """
    nd = _check_pair(F1, F2, groups)
    if nd == 0:
        if groups != 1:
            raise ValueError("linear layers have no groups")
        return F2 @ F1
    k2 = F2.shape[2]
    out = _CONV[nd](
        F1.transpose(0, 1),
        F2.flip(list(range(2, 2 + nd))),
        padding=stride * (k2 - 1),
        dilation=stride,
        groups=groups,
    )
    return out.transpose(0, 1)


def pad_kernel(G: Tensor, size: int) -> Tensor:
    """``G`` zero-padded to spatial ``size`` (centred); needs ``size - K`` even and >= 0."""
    nd = spatial_dims(G)
    if nd == 0:
        return G
    k = G.shape[-1]
    if any(s != k for s in G.shape[2:]):
        raise ValueError(f"only square kernels are supported, got {tuple(G.shape)}")
    extra = size - k
    if extra < 0 or extra % 2:
        raise ValueError(
            f"cannot centre a kernel of size {k} in size {size}: the difference must be even "
            f"and >= 0"
        )
    return F.pad(G, [extra // 2] * (2 * nd))


def _tap_offsets(k: int, nd: int) -> list[tuple[int, ...]]:
    return list(itertools.product(range(k), repeat=nd))


def second_factor_map(F1: Tensor, k2: int, stride: int = 1, groups: int = 1) -> Tensor:
    """Matrices ``M`` (one per group) with ``vec(G~[o]) = M @ vec(F2[o])`` for fixed ``F1``.

    Returns ``(groups, (C_in/g) Kc^nd, (C_mid/g) K2^nd)``; every output channel ``o`` of
    group ``j`` shares ``M[j]``, which makes the solve for ``F2`` a least-squares problem with
    ``C_out/g`` right-hand sides.
    """
    nd = spatial_dims(F1)
    c_mid, c_in_g = F1.shape[:2]
    m_g = c_mid // groups
    k1 = F1.shape[2] if nd else 1
    kc = composite_size(k1, k2, stride)
    f1 = F1.reshape(groups, m_g, c_in_g, *F1.shape[2:])
    # M[j, i, u..., m, b...] = F1[j, m, i, u - s b]
    M = F1.new_zeros(groups, c_in_g, *([kc] * nd), m_g, *([k2] * nd))
    src = f1.movedim(1, 1 + 1 + nd) if nd else f1.transpose(1, 2)  # (g, i, a..., m)
    for b in _tap_offsets(k2, nd):
        window = tuple(slice(stride * bb, stride * bb + k1) for bb in b)
        M[(slice(None), slice(None), *window, slice(None), *b)] = src
    return M.reshape(groups, c_in_g * kc**nd, m_g * k2**nd)


def first_factor_map(F2: Tensor, k1: int, stride: int = 1, groups: int = 1) -> Tensor:
    """Matrices ``M`` with ``vec(G~[:, i]) = M @ vec(F1[:, i])`` for fixed ``F2``, per group.

    Returns ``(groups, (C_out/g) Kc^nd, (C_mid/g) K1^nd)``; every input channel ``i`` of a
    group shares the group's matrix.
    """
    nd = spatial_dims(F2)
    c_out, m_g = F2.shape[:2]
    o_g = c_out // groups
    k2 = F2.shape[2] if nd else 1
    kc = composite_size(k1, k2, stride)
    f2 = F2.reshape(groups, o_g, m_g, *F2.shape[2:])
    # M[j, o, u..., m, a...] = F2[j, o, m, (u - a) / s]
    M = F2.new_zeros(groups, o_g, *([kc] * nd), m_g, *([k1] * nd))
    src = f2.movedim(2, 2 + nd) if nd else f2  # (g, o, b..., m)
    for a in _tap_offsets(k1, nd):
        window = tuple(slice(aa, aa + stride * (k2 - 1) + 1, stride) for aa in a)
        M[(slice(None), slice(None), *window, slice(None), *a)] = src
    return M.reshape(groups, o_g * kc**nd, m_g * k1**nd)


@dataclass(frozen=True)
class Feasibility:
    """Whether ``G~ = F2 (*) F1`` can be solved exactly with dense factors, and how.

    ``how``:

    - ``"solve-F2"`` / ``"solve-F1"``: one factor random, the other by least squares plus the
      random start's null-space part (exact, dense, generic);
    - ``"pairs"``: the parent kernel is smaller than the composite (its ring is zero), where
      the exact solutions are degenerate and second-order solvers only creep (measured:
      relative residual 1e-5 after 100 Levenberg-Marquardt steps). A dense exact point is
      built instead: the identity factorisation plus cancelling pairs of middle channels
      (same ``F1`` row, opposite ``F2`` columns), mixed by a random rotation of the middle
      channels; needs ``C_mid/g >= C_out/g + 2`` (or ``C_in/g + 2`` mirrored);
    - ``"nonlinear"``: a generic target with enough parameters (count minus the ``C_mid^2``
      gauge, with a 10% margin): Levenberg-Marquardt, quadratic convergence in probes;
    - ``"infeasible"``.

    ``nearest_mid`` is the smallest ``C_mid`` (a multiple of ``groups``) at or above the
    requested one for which an exact dense solution is expected.
    """

    exact: bool
    how: str
    nearest_mid: int
    message: str


def _how(
    c_in: int, c_mid: int, c_out: int, k1: int, k2: int, groups: int, nd: int, stride: int, k: int
) -> str:
    i, m, o = c_in // groups, c_mid // groups, c_out // groups
    kc1 = composite_size(k1, k2, stride) if nd else 1
    kc = kc1**nd
    # One factor random, the other solved: its map has m K^nd columns, less the Koszul
    # syzygies (p_m = f_n, p_n = -f_m) that exist with one channel on the far side; they
    # stop being independent beyond K^nd channels (measured ranks: 17, 24, 25 for
    # m = 2, 3, 4 with 3x3 factors and one input channel).
    def koszul(k: int) -> int:
        n = min(m, k**nd)
        return n * (n - 1) // 2

    # A zero-ringed target (the parent kernel smaller than the composite) needs a strictly
    # underdetermined solve: an exactly determined one copies the ring's zeros into the factor.
    spare = 1 if kc1 > k else 0
    if m * k2**nd - (koszul(k2) if i == 1 and k2 >= k1 else 0) >= i * kc + spare:
        return "solve-F2"
    if m * k1**nd - (koszul(k1) if o == 1 and k1 >= k2 else 0) >= o * kc + spare:
        return "solve-F1"
    if kc1 > k:
        second = k2 % 2 == 1 and k1 >= k and (k1 - k) % 2 == 0 and m >= o + 2
        first = stride == 1 and k1 % 2 == 1 and k2 >= k and (k2 - k) % 2 == 0 and m >= i + 2
        return "pairs" if second or first else "infeasible"
    dof = m * (i * k1**nd + o * k2**nd) - m * m
    if dof >= 1.1 * o * i * kc:
        return "nonlinear"
    return "infeasible"


def feasibility(
    c_in: int,
    c_mid: int,
    c_out: int,
    k1: int,
    k2: int,
    groups: int = 1,
    nd: int = 2,
    stride: int = 1,
    k: int | None = None,
) -> Feasibility:
    """Say, before solving, whether a dense exact decomposition can be expected.

    ``k`` is the parent's kernel size (default ``k1``: the usual deepening, where the first
    factor keeps the parent's kernel).
    """
    for name, c in (("c_in", c_in), ("c_mid", c_mid), ("c_out", c_out)):
        if c <= 0 or c % groups:
            raise ValueError(f"{name}={c} must be a positive multiple of groups={groups}")
    k = k1 if k is None else k
    how = _how(c_in, c_mid, c_out, k1, k2, groups, nd, stride, k)
    nearest = c_mid
    while _how(c_in, nearest, c_out, k1, k2, groups, nd, stride, k) == "infeasible":
        nearest += groups
    if how == "infeasible":
        msg = (
            f"no dense exact solution expected for C_in={c_in}, C_mid={c_mid}, C_out={c_out}, "
            f"K1={k1}, K2={k2}, groups={groups}, stride={stride}: use C_mid >= {nearest}"
            + (" or a 1x1 second factor (K2=1)" if k2 > 1 else "")
        )
    else:
        msg = f"dense exact solution expected ({how})"
    return Feasibility(how != "infeasible", how, nearest, msg)


def min_mid_channels(
    c_in: int,
    c_out: int,
    k1: int,
    k2: int,
    groups: int = 1,
    nd: int = 2,
    stride: int = 1,
    k: int | None = None,
) -> int:
    """Smallest ``C_mid >= C_out`` for which ``"stable"`` gives a dense exact solution."""
    start = max(c_out, groups)
    start += (-start) % groups
    return feasibility(c_in, start, c_out, k1, k2, groups, nd, stride, k).nearest_mid


def sparsity(*tensors: Tensor, near: float = 1e-3) -> tuple[float, float]:
    """(fraction of exact zeros, fraction with ``|w| < near * rms``) over all ``tensors``
    together; the rms is taken per tensor (in the tensor's own precision, at least float32:
    it only sets a threshold)."""
    total = zeros = small = 0
    for t in tensors:
        t = t.detach()
        n = t.numel()
        if n == 0:
            continue
        if not t.is_floating_point() or t.element_size() < 4:
            t = t.float()
        rms = torch.linalg.vector_norm(t) / math.sqrt(n)
        total += n
        zeros += n - int(torch.count_nonzero(t))
        small += int((t.abs() < near * rms).sum())
    return (zeros / total, small / total) if total else (0.0, 0.0)


def _check_pair(F1: Tensor, F2: Tensor, groups: int) -> int:
    """The factors' number of spatial dims, once checked to be of one kind and to chain."""
    nd = spatial_dims(F1)
    if spatial_dims(F2) != nd:
        raise ValueError(f"factors differ in kind: F1 {tuple(F1.shape)}, F2 {tuple(F2.shape)}")
    if F1.shape[0] != F2.shape[1] * groups:
        raise ValueError(
            f"F1 has {F1.shape[0]} output channels but F2 expects {F2.shape[1] * groups} "
            f"(F1 {tuple(F1.shape)}, F2 {tuple(F2.shape)}, groups={groups})"
        )
    return nd


def factor_shape(F1: Tensor, F2: Tensor, stride: int = 1, groups: int = 1) -> BilinearShape:
    """The :class:`~stablemorph.bilinear.BilinearShape` of a pair of factors (checked to fit
    together, as in :func:`composite`)."""
    nd = _check_pair(F1, F2, groups)
    k1, k2 = (F1.shape[2], F2.shape[2]) if nd else (1, 1)
    return BilinearShape(
        F1.shape[1] * groups, F1.shape[0], F2.shape[0], k1, k2, nd, stride, groups
    )


def relative_residual(
    F1: Tensor,
    F2: Tensor,
    G: Tensor,
    stride: int = 1,
    groups: int = 1,
    probes: int | None = None,
    seed: int = 0,
) -> float:
    """``||F2 (*) F1 - G~|| / ||G~||`` in float64 on the factors' device (``G~`` = ``G``
    padded to the composite size).

    Computed through the matrix form (:class:`~stablemorph.bilinear.BilinearShape`): one
    batched product ``A @ B`` and a scatter of its taps, the same number as the float64
    convolution of :func:`composite` (up to rounding) at a fraction of its cost.

    ``probes``: ``None`` (default) for the exact value. An integer ``k`` below ``C_out /
    groups`` gives an unbiased estimate of the squared residual from ``k`` random
    orthonormal output directions per group (``Z = sqrt(o/k) Q``, ``Q`` Haar): the cost drops
    by about ``C_out / (groups k)``. Its relative spread is at most ``sqrt(2/k)`` on the
    squared residual when the residual has rank one, and far smaller for the full-rank
    rounding residuals of an exact decomposition; ``k >= C_out / groups`` is exact.
    ``seed`` seeds the directions.
    """
    shape = factor_shape(F1, F2, stride, groups)
    g, nd, o, i = groups, shape.nd, shape.c_out // groups, shape.c_in // groups
    A = shape.f2_to_a(F2.detach().double())
    B = shape.f1_to_b(F1.detach().double())
    k = G.shape[-1] if nd else 1
    if (tuple(G.shape[:2]) != (shape.c_out, i) or any(s != k for s in G.shape[2:])
            or G.dim() != F1.dim() or k > shape.kc or (shape.kc - k) % 2):
        raise ValueError(
            f"composite {(shape.c_out, i, *([shape.kc] * nd))} does not match kernel "
            f"{tuple(G.shape)}"
        )
    T = G.detach().to(A.device, torch.float64).reshape(g, o, -1)  # (g, o, i K^nd)
    denom = float(T.norm())
    if probes is not None and 0 < probes < o:
        gen = torch.Generator().manual_seed(seed)
        Q = torch.linalg.qr(torch.randn(g, o, probes, generator=gen, dtype=torch.float64))[0]
        Zt = (Q * math.sqrt(o / probes)).transpose(1, 2).to(A.device)  # (g, k, o)
        A = (Zt @ A.reshape(g, o, -1)).reshape(g, probes * shape.k2**nd, -1)
        T = Zt @ T
        shape = replace(shape, c_out=probes * g)
    T = shape.target(pad_kernel(T.reshape(shape.c_out, i, *G.shape[2:]), shape.kc))
    R = shape.apply(A, B) - T  # (g, o', Kc^nd, i)
    return float(R.norm()) / (denom if denom > 0 else 1.0)


def he_std(fan_in: int) -> float:
    """Standard deviation of He (Kaiming normal, gain sqrt 2) initialisation."""
    return math.sqrt(2.0 / max(fan_in, 1))
