"""The composite ``F2 (*) F1`` as a bilinear map of two matrices, for the iterative solvers.

``F2`` is held as ``A``: ``(g, (C_out/g) K2^nd, C_mid/g)`` (rows: output channel, then tap
``b``) and ``F1`` as ``B``: ``(g, C_mid/g, K1^nd (C_in/g))`` (columns: tap ``a``, then input
channel). Then ``A @ B`` holds every product of a tap of ``F2`` with a tap of ``F1``, laid out
``(g, C_out/g, K2^nd K1^nd, C_in/g)``: each pair of taps ``(b, a)`` is one contiguous
``C_in/g`` row, and the composite adds it into tap ``a + s b`` by one product with a 0/1
matrix (the adjoint, a gather, is the product with its transpose). Batched matrix products are
several times faster on a CPU than the float64 convolution in
:func:`stablemorph.equation.composite`, need no copies between layouts, and give the same
numbers on every device.

Composites (and targets) are held ``(g, C_out/g, Kc^nd, C_in/g)``.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BilinearShape:
    """Sizes of one decomposition problem (see module docstring)."""

    c_in: int
    c_mid: int
    c_out: int
    k1: int
    k2: int
    nd: int
    stride: int = 1
    groups: int = 1

    @property
    def kc(self) -> int:
        return self.k1 + self.stride * (self.k2 - 1)

    @property
    def is_product(self) -> bool:
        """The composite is ``A @ B`` rearranged (a 1x1 factor): every tap pair lands on its
        own composite tap, so one factor solves by a plain matrix least squares."""
        return self.nd == 0 or self.k2 == 1 or (self.k1 == 1 and self.stride == 1)

    def _taps(self, k: int) -> list[tuple[int, ...]]:
        return list(itertools.product(range(k), repeat=self.nd))

    # -- conversions between layer weights and the matrix form ---------------------------------
    def f1_to_b(self, F1: Tensor) -> Tensor:
        g, m = self.groups, self.c_mid // self.groups
        return F1.reshape(g, m, self.c_in // g, -1).transpose(2, 3).reshape(g, m, -1)

    def b_to_f1(self, B: Tensor) -> Tensor:
        i = self.c_in // self.groups
        f1 = B.reshape(self.c_mid, -1, i).transpose(1, 2)
        return f1.reshape(self.c_mid, i, *([self.k1] * self.nd))

    def f2_to_a(self, F2: Tensor) -> Tensor:
        g, nd = self.groups, self.nd
        f2 = F2.reshape(g, self.c_out // g, self.c_mid // g, *F2.shape[2:])
        return f2.movedim(2, 2 + nd).reshape(g, -1, self.c_mid // g)

    def a_to_f2(self, A: Tensor) -> Tensor:
        g, nd = self.groups, self.nd
        a = A.reshape(g, self.c_out // g, *([self.k2] * nd), self.c_mid // g)
        return a.movedim(2 + nd, 2).reshape(self.c_out, self.c_mid // g, *([self.k2] * nd))

    def target(self, G: Tensor) -> Tensor:
        """Composite-shaped kernel ``(C_out, C_in/g, Kc...)`` -> ``(g, C_out/g, Kc^nd, C_in/g)``."""
        g = self.groups
        return G.reshape(g, self.c_out // g, self.c_in // g, -1).transpose(2, 3)

    def untarget(self, T: Tensor) -> Tensor:
        """The inverse of :meth:`target`: ``(C_out, C_in/g, Kc...)``."""
        return T.transpose(2, 3).reshape(self.c_out, self.c_in // self.groups,
                                         *([self.kc] * self.nd))

    # -- the map and its adjoint ---------------------------------------------------------------
    def _scatter(self, like: Tensor) -> Tensor | None:
        """The 0/1 matrix ``(K2^nd K1^nd, Kc^nd)`` sending tap pair ``(b, a)`` to composite tap
        ``a + s b`` in ``like``'s dtype and device; None where it is the identity."""
        if self.is_product:
            return None
        return _scatter_matrix(self.k1, self.k2, self.nd, self.stride, like.dtype, like.device)

    def apply(self, A: Tensor, B: Tensor) -> Tensor:
        """Composite ``(g, C_out/g, Kc^nd, C_in/g)`` of the factors ``A`` and ``B``."""
        g = self.groups
        P = (A @ B).reshape(g, self.c_out // g, -1, self.c_in // g)
        S = self._scatter(P)
        return P if S is None else S.T @ P

    def gather(self, U: Tensor) -> Tensor:
        """Adjoint of the tap scatter: composite-shaped ``U`` ->
        ``(g, (C_out/g) K2^nd, K1^nd (C_in/g))``."""
        S = self._scatter(U)
        Ut = U if S is None else S @ U
        return Ut.reshape(self.groups, (self.c_out // self.groups) * self.k2**self.nd, -1)

    def adjoint(self, U: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """``(J_A^T U, J_B^T U)``: gradients of ``<U, apply(A, B)>`` in ``A`` and ``B``."""
        Ut = self.gather(U)
        return Ut @ B.transpose(1, 2), A.transpose(1, 2) @ Ut


@functools.lru_cache(maxsize=64)
def _scatter_matrix(
    k1: int, k2: int, nd: int, stride: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``S[(b, a), u] = 1`` where composite tap ``u = a + stride b`` (taps flattened row-major);
    cached per problem, dtype and device: callers must not modify it."""
    kc = k1 + stride * (k2 - 1)
    pairs = itertools.product(itertools.product(range(k2), repeat=nd),
                              itertools.product(range(k1), repeat=nd))
    cols = [functools.reduce(lambda acc, t: acc * kc + t,
                             (aa + stride * bb for aa, bb in zip(a, b, strict=True)), 0)
            for b, a in pairs]
    with torch.inference_mode(False):  # cached: usable later where autograd records
        S = torch.zeros(len(cols), kc**nd, dtype=dtype, device=device)
        S[torch.arange(len(cols), device=device), torch.tensor(cols, device=device)] = 1
    return S
