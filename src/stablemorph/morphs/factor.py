"""Build ``F1 -> PAct(a=1) -> F2`` from a kernel ``G``: the two-layer block that deepen,
the dense kernel enlargement and the subnet branch all insert.

Arrangement (DESIGN.md section 1, "Borders" and "Stride"): ``F1`` carries the parent's
stride and padding ``p + (Kc - K) / 2`` (``Kc = K1 + stride (K2 - 1)``), ``F2`` has stride 1
and padding 0. Then ``F2(F1(x))`` equals the parent conv on the whole output, borders
included. Biases: with scheme ``"stable"`` ``F1`` gets a dense random bias ``b1`` and ``F2``
the parent's bias minus ``F2``'s response to the constant ``b1`` (exact because ``F2`` never
pads), so no new parameter is zero; the other schemes use ``b1 = 0`` and ``b2 = b``.

The stable step rule's gauge (:func:`orthogonalise_`): a pointwise pair is re-factored
exactly with a dense random orthogonal (He-scaled) second factor. The published solve leaves
the parent's spectrum in ``F2``, whose anisotropy amplifies the first optimiser steps
(``benchmarks/results/stability_research.md``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablemorph.activations import PAct
from stablemorph.equation import (
    composite_size,
    feasibility,
    min_mid_channels,
    sparsity,
)
from stablemorph.graph import CONV
from stablemorph.morphs.contract import MorphError, generator, randn, scale_of
from stablemorph.solvers import DecompositionReport, decompose

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# The morph's residuals are estimated from this many random output directions per group
# (exact for narrower layers): the probe-batch check measures the function itself, and an
# exact float64 residual of a 512-channel 3x3 (*) 3x3 block costs ten forward passes.
RESIDUAL_PROBES = 32
_CONV_CLS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass(frozen=True)
class Geometry:
    """A Linear (``nd = 0``) or square Conv1d/2d layer's shape: what the factors must match."""

    nd: int
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    groups: int

    @staticmethod
    def of(layer: nn.Module, name: str, op: str) -> Geometry:
        """The geometry of ``layer``; MorphError for what the factorisation cannot keep exact
        (non-zero padding modes, dilation, non-square kernels or strides, 3-D convs)."""
        if isinstance(layer, nn.Linear):
            return Geometry(0, layer.in_features, layer.out_features, 1, 1, 0, 1)
        if not isinstance(layer, CONV) or isinstance(layer, nn.Conv3d):
            raise MorphError(f"{op}: layer {name!r} is a {type(layer).__name__}; supported: "
                             f"Linear, Conv1d, Conv2d")
        if layer.padding_mode != "zeros":
            raise MorphError(f"{op}: layer {name!r} uses padding_mode={layer.padding_mode!r}; "
                             f"only 'zeros' keeps the factorised layer exact at the borders")
        if any(d != 1 for d in layer.dilation):
            raise MorphError(f"{op}: layer {name!r} has dilation {layer.dilation}; only "
                             f"dilation 1 is supported")
        k, s = layer.kernel_size, layer.stride
        if len(set(k)) != 1 or len(set(s)) != 1:
            raise MorphError(f"{op}: layer {name!r} has kernel {k} and stride {s}; only square "
                             f"kernels and strides are supported")
        pad = layer.padding
        if pad == "valid":
            pad = (0,) * len(k)
        elif pad == "same":
            if k[0] % 2 == 0:
                raise MorphError(f"{op}: layer {name!r} has padding='same' with an even kernel "
                                 f"{k}, which pads asymmetrically")
            pad = ((k[0] - 1) // 2,) * len(k)
        if len(set(pad)) != 1:
            raise MorphError(f"{op}: layer {name!r} has unequal padding {pad}")
        return Geometry(len(k), layer.in_channels, layer.out_channels, k[0], s[0], pad[0],
                        layer.groups)

    def composite(self, k1: int, k2: int) -> int:
        return composite_size(k1, k2, self.stride) if self.nd else 1


@dataclass
class Factors:
    """The built block and what the decomposition reported."""

    block: nn.Sequential
    report: DecompositionReport
    width: int
    kernels: tuple[int, int]
    bias_kept: bool  # F2's bias is the parent's, unchanged
    orthogonal: bool = False  # re-factored by orthogonalise_ (the stable step rule)
    not_orthogonal: str | None = None  # why the step rule kept the published solve

    @property
    def notes(self) -> list[str]:
        r = self.report
        return [
            f"decomposition {r.method}/{r.variant} via {r.how}: residual {r.residual:.2e} "
            f"(float64), {r.residual_cast:.2e} (as stored); width {self.width}, kernels "
            f"{self.kernels}",
            *r.notes,
            *(["step rule: pointwise pair re-factored with an orthogonal second factor"]
              if self.orthogonal else []),
            *([self.not_orthogonal] if self.not_orthogonal else []),
        ]


def default_width(geom: Geometry, k1: int, k2: int) -> int:
    """The same for every scheme: ``C_out``, or more when ``"stable"`` needs more middle
    channels for a dense exact solution (``min_mid_channels`` with the parent's kernel: a
    composite larger than the parent's needs a strictly underdetermined solve, else the
    unique solution copies the zero ring of ``G~`` into the solved factor)."""
    if geom.nd == 0:
        return geom.out_channels
    return max(geom.out_channels, min_mid_channels(
        geom.in_channels, geom.out_channels, k1, k2, geom.groups, geom.nd, geom.stride,
        k=geom.kernel))


def resolve_kernels(geom: Geometry, k1: int | None, k2: int | None, name: str,
                    op: str) -> tuple[int, int]:
    """``(K1, K2)`` with defaults ``K1 = K`` and ``K2 = 1``, checked to compose to a kernel that
    holds the parent's centred (``Kc - K`` even and >= 0)."""
    if geom.nd == 0:
        if (k1 or 1, k2 or 1) != (1, 1):
            raise MorphError(f"{op}: layer {name!r} is Linear: it has no kernel to set")
        return 1, 1
    k1 = geom.kernel if k1 is None else int(k1)
    k2 = 1 if k2 is None else int(k2)
    if k1 < 1 or k2 < 1:
        raise MorphError(f"{op}: layer {name!r}: kernel sizes must be >= 1, got {(k1, k2)}")
    extra = geom.composite(k1, k2) - geom.kernel
    if extra < 0 or extra % 2:
        raise MorphError(
            f"{op}: layer {name!r}: kernels K1={k1}, K2={k2} (stride {geom.stride}) compose to "
            f"size {geom.composite(k1, k2)}, which cannot hold the {geom.kernel}-wide kernel "
            f"centred; K1 + stride*(K2-1) - K must be even and >= 0 ({_fitting(geom, k1, k2, op)})"
        )
    return k1, k2


def _fitting(geom: Geometry, k1: int, k2: int, op: str) -> str:
    """The nearest option that composes to a kernel holding the parent's, for the message:
    ``deepen`` sets only K2 (K1 is the layer's kernel), ``insert_subnet`` both."""
    def fits(a: int, b: int) -> bool:
        extra = geom.composite(a, b) - geom.kernel
        return extra >= 0 and extra % 2 == 0

    if op == "insert_subnet":
        a = next(a for a in range(1, geom.kernel + 2) if fits(a, k2))
        return f"the smallest that fits with K2={k2}: kernel_sizes=({a}, {k2})"
    b = next((b for b in range(k2 + 1, k2 + 3) if fits(k1, b)), None)
    return f"with K1={k1}: kernel_size={b}" if b else "no kernel_size fits this layer"


def check_feasible(geom: Geometry, width: int, k1: int, k2: int, name: str, op: str) -> None:
    """Refuse, before any work, a ``"stable"`` request with no dense exact solution."""
    if width % geom.groups:
        raise MorphError(f"{op}: layer {name!r}: width {width} must be a multiple of "
                         f"groups={geom.groups}")
    feas = feasibility(geom.in_channels, width, geom.out_channels, k1, k2, geom.groups,
                       geom.nd, geom.stride, k=geom.kernel)
    if not feas.exact:
        hint = f"width >= {feas.nearest_mid}" + (", or a 1x1 second kernel" if k2 > 1 else "")
        raise MorphError(f"{op}: layer {name!r}: scheme 'stable' cannot be exact and dense "
                         f"here ({feas.message}); use {hint}")


def _layer(geom: Geometry, c_in: int, c_out: int, k: int, stride: int, padding: int,
           bias: bool) -> nn.Module:
    if geom.nd == 0:
        return nn.Linear(c_in, c_out, bias=bias)
    return _CONV_CLS[geom.nd](c_in, c_out, k, stride=stride, padding=padding,
                              groups=geom.groups, bias=bias)


def _response(F2: Tensor, b1: Tensor, geom: Geometry) -> Tensor:
    """``F2`` applied to the constant map ``b1`` (one value per output channel)."""
    if geom.nd == 0:
        return F2 @ b1
    size = F2.shape[2:]
    const = b1.reshape(1, -1, *([1] * geom.nd)).expand(1, b1.numel(), *size)
    return _CONV_FN[geom.nd](const, F2, groups=geom.groups).flatten()


def build_factors(
    geom: Geometry,
    G: Tensor,
    bias: Tensor | None,
    *,
    scheme: str,
    width: int,
    kernels: tuple[int, int],
    activation: str,
    seed: int,
    variant: str | None = None,
    orthogonal: bool = False,
) -> Factors:
    """``Sequential(first=F1, act=PAct(activation, a=1), second=F2)`` computing the layer
    ``(G, bias)`` of geometry ``geom`` exactly (module docstring), in ``G``'s dtype/device;
    with ``orthogonal`` a pointwise pair is re-factored by :func:`orthogonalise_` (seed
    ``seed + 2``) unless that leaves it less dense (:func:`_orthogonalise_if_dense`).

    Raises:
        DecompositionError: the solver missed its tolerance (the message has the numbers).
    """
    k1, k2 = kernels
    F1w, F2w, rep = decompose(G.detach(), width, kernel_sizes=(k1, k2) if geom.nd else None,
                              method=scheme, stride=geom.stride, groups=geom.groups, seed=seed,
                              variant=variant, residual_probes=RESIDUAL_PROBES)
    extra = (geom.composite(k1, k2) - geom.kernel) // 2
    has_bias = bias is not None
    first = _layer(geom, geom.in_channels, width, k1, geom.stride, geom.padding + extra,
                   has_bias)
    second = _layer(geom, width, geom.out_channels, k2, 1, 0, has_bias)
    act = PAct(activation, channels=width, channel_dim=1 if geom.nd else -1)
    block = nn.Sequential(OrderedDict(first=first, act=act, second=second))
    block.to(device=G.device, dtype=G.dtype)
    bias_kept = True
    with torch.no_grad():
        first.weight.copy_(F1w)
        second.weight.copy_(F2w)
        if bias is not None:
            if scheme == "stable":
                b1 = randn((width,), scale_of(bias, F1w[0].numel()), generator(seed + 1), bias)
                first.bias.copy_(b1)
                second.bias.copy_(bias - _response(F2w, b1, geom).to(bias.dtype))
                bias_kept = False
            else:
                first.bias.zero_()
                second.bias.copy_(bias)
    kept = None
    if orthogonal and is_pointwise(second):
        kept = _orthogonalise_if_dense(first, second, generator(seed + 2))
    return Factors(block, rep, width, (k1, k2), bias_kept, kept is None and orthogonal
                   and is_pointwise(second), kept)


NEAR_ZERO_LIMIT = 0.01  # the dense contract: under 1% near zeros among new parameters


def _orthogonalise_if_dense(first: nn.Module, second: nn.Module,
                            gen: torch.Generator) -> str | None:
    """:func:`orthogonalise_` the pair unless that leaves more near zeros than the published
    solve (and over 1%): then the published factors are restored and the reason returned.

    That happens when ``F1`` has taps outside the composite's kernel: they must cancel
    through ``F2``'s null space, and an orthogonal ``F2`` with ``C_mid`` at or barely above
    ``C_out`` leaves them none or one direction (insert_subnet's (3, 1) branch on a 1x1 layer
    or an identity shortcut: 20-66% near zeros measured)."""
    params = [p for m in (first, second) for p in (m.weight, m.bias) if p is not None]
    published = [p.detach().clone() for p in params]
    before = sparsity(first.weight, second.weight)[1]
    orthogonalise_(first, second, gen)
    after = sparsity(first.weight, second.weight)[1]
    if after <= max(NEAR_ZERO_LIMIT, before):
        return None
    with torch.no_grad():
        for p, old in zip(params, published, strict=True):
            p.copy_(old)
    return (f"step rule: orthogonal second factor not used: it left {after:.1%} near zeros "
            f"in the factors (published solve {before:.1%})")


def is_pointwise(second: nn.Module) -> bool:
    """A second factor :func:`orthogonalise_` re-factors: Linear or a 1x1 conv, groups 1,
    at least as many inputs as outputs."""
    w = second.weight
    return (getattr(second, "groups", 1) == 1 and (w.dim() == 2 or w[0, 0].numel() == 1)
            and w.shape[1] >= w.shape[0])


@torch.no_grad()
def orthogonalise_(first: nn.Module, second: nn.Module, gen: torch.Generator) -> None:
    """Re-factor the pair ``second o act o first`` (``act`` the identity at ``a = 1``) in
    place, exactly, when ``second`` is pointwise (:func:`is_pointwise`; else nothing): ``F2 =
    c Q`` (``Q`` a dense random matrix with orthonormal rows drawn from ``gen``, ``c = 2^0.5``:
    He-scaled entries, std ``(2 / C_mid)^0.5``) and ``F1 = F2^+ W + (I - F2^+ F2) R`` (``W``
    the pair's composite kernel, ``R`` the old ``F1``: its component in ``F2``'s null space
    keeps ``F1`` dense when ``C_mid > C_out``). ``F1``'s bias keeps its values; ``F2``'s is
    recomputed so the pair's bias is unchanged. Computed in float64."""
    if not is_pointwise(second):
        return
    w1, w2 = first.weight.detach().double(), second.weight.detach().double()
    c_out, m = w2.shape[0], w2.shape[1]
    A1 = w1.reshape(m, -1)
    A2 = w2.reshape(c_out, m)
    Wc = A2 @ A1
    bias = b1 = None
    if second.bias is not None:
        b1 = (first.bias.detach().double() if first.bias is not None
              else torch.zeros(m, dtype=torch.float64, device=w1.device))
        bias = second.bias.detach().double() + A2 @ b1
    q, r = torch.linalg.qr(torch.randn(m, c_out, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    Q = q.T.to(w1.device) * 2.0**0.5  # (C_out, m)
    pinv = torch.linalg.pinv(Q)
    F1 = pinv @ Wc + (torch.eye(m, dtype=torch.float64, device=w1.device) - pinv @ Q) @ A1
    first.weight.copy_(F1.reshape(w1.shape).to(first.weight.dtype))
    second.weight.copy_(Q.reshape(w2.shape).to(second.weight.dtype))
    if bias is not None:
        second.bias.copy_((bias - Q @ b1).to(second.bias.dtype))
