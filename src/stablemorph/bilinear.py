"""The composite ``F2 (*) F1`` as a bilinear map of two matrices, for the iterative solvers.

``F2`` is held as ``A``: ``(g, (C_out/g) K2^nd, C_mid/g)`` and ``F1`` as ``B``:
``(g, C_mid/g, (C_in/g) K1^nd)``. Then ``A @ B`` holds every product of a tap of ``F2`` with a
tap of ``F1``; the composite adds them into tap ``a + s b``. Batched matrix products in
float64 are several times faster on a CPU than the float64 convolution in
:func:`stablemorph.equation.composite`, and the adjoint is a gather plus two products.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

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
        g = self.groups
        return F1.reshape(g, self.c_mid // g, -1)

    def b_to_f1(self, B: Tensor) -> Tensor:
        return B.reshape(self.c_mid, self.c_in // self.groups, *([self.k1] * self.nd))

    def f2_to_a(self, F2: Tensor) -> Tensor:
        g, nd = self.groups, self.nd
        f2 = F2.reshape(g, self.c_out // g, self.c_mid // g, *F2.shape[2:])
        return f2.movedim(2, 2 + nd).reshape(g, -1, self.c_mid // g)

    def a_to_f2(self, A: Tensor) -> Tensor:
        g, nd = self.groups, self.nd
        a = A.reshape(g, self.c_out // g, *([self.k2] * nd), self.c_mid // g)
        return a.movedim(2 + nd, 2).reshape(self.c_out, self.c_mid // g, *([self.k2] * nd))

    def target(self, G: Tensor) -> Tensor:
        """Composite-shaped kernel ``(C_out, C_in/g, Kc...)`` -> ``(g, C_out/g, C_in/g, Kc...)``."""
        return G.reshape(self.groups, self.c_out // self.groups, *G.shape[1:])

    def untarget(self, T: Tensor) -> Tensor:
        return T.reshape(self.c_out, *T.shape[2:])

    # -- the map and its adjoint ---------------------------------------------------------------
    def _windows(self) -> list[tuple[tuple[int, ...], tuple[slice, ...]]]:
        s, k1 = self.stride, self.k1
        return [(b, tuple(slice(s * bb, s * bb + k1) for bb in b)) for b in self._taps(self.k2)]

    def apply(self, A: Tensor, B: Tensor) -> Tensor:
        """Composite ``(g, C_out/g, C_in/g, Kc...)`` of the factors ``A`` and ``B``."""
        g, nd = self.groups, self.nd
        o, i = self.c_out // g, self.c_in // g
        T = (A @ B).reshape(g, o, *([self.k2] * nd), i, *([self.k1] * nd))
        out = A.new_zeros(g, o, i, *([self.kc] * nd))
        for b, window in self._windows():
            out[(slice(None), slice(None), slice(None), *window)] += T[
                (slice(None), slice(None), *b)
            ]
        return out

    def gather(self, U: Tensor) -> Tensor:
        """Adjoint of the tap scatter: composite-shaped ``U`` ->
        ``(g, (C_out/g) K2^nd, (C_in/g) K1^nd)``."""
        g, nd = self.groups, self.nd
        o, i = self.c_out // g, self.c_in // g
        Ut = U.new_empty(g, o, *([self.k2] * nd), i, *([self.k1] * nd))
        for b, window in self._windows():
            Ut[(slice(None), slice(None), *b)] = U[(slice(None), slice(None), slice(None), *window)]
        return Ut.reshape(g, o * self.k2**nd, i * self.k1**nd)

    def adjoint(self, U: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """``(J_A^T U, J_B^T U)``: gradients of ``<U, apply(A, B)>`` in ``A`` and ``B``."""
        Ut = self.gather(U)
        return Ut @ B.transpose(1, 2), A.transpose(1, 2) @ Ut
