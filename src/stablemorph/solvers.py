"""Solving the morphism equation ``G~ = F2 (*) F1`` for the two factors, by three schemes.

- ``"stable"``: dense factors, no zeros. Both factors start dense and random; where one
  factor alone can match ``G~`` (a 1x1 factor, or enough middle channels) the other stays
  random and the solved one is the least-squares solution *plus the random start's
  null-space component* (exact and dense; the bare minimum-norm solution would not be
  random in the free directions). Otherwise Levenberg-Marquardt in float64, matrix-free
  with preconditioned conjugate gradients. Finally each middle channel is balanced
  (``F1[m] *= s_m``, ``F2[:, m] /= s_m``, the product unchanged) to the weight scale of a
  freshly initialised layer of its shape.
- ``"netmorph"``: NetMorph (Wei et al. 2016). Variant ``"practical"`` (their algorithm 2,
  default) shrinks one factor's kernel so the smaller problem is solvable, solves it by
  alternating least squares and zero-pads the shrunken factor back; ``"als"`` (algorithm 1)
  alternates least-squares solves of each factor from a random start. Both end with the
  factors scaled to equal standard deviation.
- ``"net2net"``: the identity factorisation: ``F1 = G`` and ``F2`` the centred identity
  (``"identity-second"``, default), or the mirror image (``"identity-first"``).

All solving is done in float64 on ``G``'s device (random starts are drawn on the CPU from the
seeded generator, so a seed gives the same factors on every device, and moved there); the
factors come back in ``G``'s dtype, and the report gives the residual both before and after
that cast, each computed once through the matrix form (exactly, or estimated from random
output directions when ``residual_probes`` asks for it).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from stablemorph.bilinear import BilinearShape
from stablemorph.equation import (
    Feasibility,
    composite_size,
    feasibility,
    first_factor_map,
    pad_kernel,
    relative_residual,
    second_factor_map,
    sparsity,
    spatial_dims,
)

METHODS = ("stable", "netmorph", "net2net")
VARIANTS = {
    "stable": ("auto", "linear", "pairs", "lm"),
    "netmorph": ("practical", "als"),
    "net2net": ("identity-second", "identity-first"),
}


class DecompositionError(ValueError):
    """The equation could not be solved to the requested tolerance, or the request is
    malformed. The message carries the residual reached and the nearest feasible request."""


@dataclass
class DecompositionReport:
    """What a decomposition reached.

    ``residual``: ``||F2 (*) F1 - G~|| / ||G~||`` in float64; ``residual_cast``: the same
    after casting the factors to ``G``'s dtype. ``zero_fraction`` / ``near_zero_fraction``:
    exact zeros and ``|w| < 1e-3 rms`` over both factors. ``how``: the path taken
    (``solve-F1``, ``solve-F2``, ``lm``, ``als``, ``practical``, ``identity``).
    """

    method: str
    variant: str
    how: str
    residual: float
    residual_cast: float
    zero_fraction: float
    near_zero_fraction: float
    norm_f1: float
    norm_f2: float
    iterations: int
    seconds: float
    feasibility: str
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# linear sub-problems: one factor fixed


def _lstsq(M: Tensor, rhs: Tensor, driver: str = "gelsd") -> Tensor:
    """Minimum-norm least-squares solution of ``M X = rhs`` (batched). On the CPU LAPACK's
    ``driver``: ``gelsd`` (SVD) by default; ``gelsy`` (a pivoted QR, 7x quicker at 1600 x
    1152) where only a good start is needed. Elsewhere (CUDA's ``lstsq`` takes full-rank
    tall systems only) the SVD pseudo-inverse, the same minimum-norm solution."""
    if M.device.type == "cpu":
        return torch.linalg.lstsq(M, rhs, driver=driver).solution
    return torch.linalg.pinv(M) @ rhs


def _solve_x(M: Tensor, rhs: Tensor, start: Tensor | None, driver: str = "gelsd") -> Tensor:
    """Least-squares ``X`` for ``M X = rhs``; with ``start``, the solution nearest to it
    (``start`` + the minimum-norm correction), which keeps ``start``'s null-space part."""
    if start is None:
        return _lstsq(M, rhs, driver)
    return start + _lstsq(M, rhs - M @ start, driver)


def _second_given_first(
    shape: BilinearShape, F1: Tensor, Gp: Tensor, start: Tensor | None, driver: str = "gelsd"
) -> Tensor:
    """Best ``F2`` for fixed ``F1`` (``start``: an ``F2``-shaped random start or None;
    ``driver``: see :func:`_lstsq`)."""
    g, nd = shape.groups, shape.nd
    if shape.is_product:  # composite = A @ B: solve A^T from B^T, no Kronecker blow-up
        B, T = shape.f1_to_b(F1), shape.gather(shape.target(Gp))
        X0 = None if start is None else shape.f2_to_a(start).transpose(1, 2)
        X = _solve_x(B.transpose(1, 2), T.transpose(1, 2), X0, driver)
        return shape.a_to_f2(X.transpose(1, 2))
    M = second_factor_map(F1, shape.k2, shape.stride, g)  # (g, i Kc, m K2)
    T = Gp.reshape(g, shape.c_out // g, -1).transpose(1, 2)  # (g, i Kc, o)
    X0 = None if start is None else start.reshape(g, shape.c_out // g, -1).transpose(1, 2)
    X = _solve_x(M, T, X0, driver)  # (g, m K2, o)
    return X.transpose(1, 2).reshape(shape.c_out, shape.c_mid // g, *([shape.k2] * nd))


def _first_given_second(
    shape: BilinearShape, F2: Tensor, Gp: Tensor, start: Tensor | None
) -> Tensor:
    """Best ``F1`` for fixed ``F2`` (the mirror of :func:`_second_given_first`)."""
    if shape.is_product:
        A, T = shape.f2_to_a(F2), shape.gather(shape.target(Gp))
        X0 = None if start is None else shape.f1_to_b(start)
        return shape.b_to_f1(_solve_x(A, T, X0))
    g, nd = shape.groups, shape.nd
    o, i, m = shape.c_out // g, shape.c_in // g, shape.c_mid // g
    M = first_factor_map(F2, shape.k1, shape.stride, g)  # (g, o Kc, m K1)

    def columns(F: Tensor, rows: int) -> Tensor:  # (rows*g, i, K...) -> (g, rows K, i)
        return F.reshape(g, rows, i, -1).permute(0, 1, 3, 2).reshape(g, -1, i)

    T = columns(Gp, o)
    X0 = None if start is None else columns(start, m)
    X = _solve_x(M, T, X0)  # (g, m K1, i)
    F1 = X.reshape(g, m, shape.k1**nd, i).permute(0, 1, 3, 2)
    return F1.reshape(shape.c_mid, i, *([shape.k1] * nd))


# ----------------------------------------------------------------------------------------------
# random starts and balancing


def _randn(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> Tensor:
    """Standard normal float64 values drawn on the CPU from ``gen`` (reproducible on every
    device), placed on ``device``."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device)


def _he(
    shape: tuple[int, ...], fan_in: int, gen: torch.Generator, device: torch.device
) -> Tensor:
    return _randn(shape, gen, device) * (2.0 / max(fan_in, 1)) ** 0.5


def _orthogonal_rows(
    shape: tuple[int, ...], fan_in: int, gen: torch.Generator, device: torch.device
) -> Tensor:
    """Dense random weight whose flattened matrix has orthogonal rows or columns, scaled to
    He's standard deviation: perfectly conditioned, so solving against it does not blow up."""
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    q, r = torch.linalg.qr(_randn((max(rows, cols), min(rows, cols)), gen, device))
    q = q * torch.sign(torch.diagonal(r))
    q = q if rows >= cols else q.T
    std = (2.0 / max(fan_in, 1)) ** 0.5
    return (q * std * (rows * cols / q.pow(2).sum()) ** 0.5).reshape(shape)


def _random_first(shape: BilinearShape, gen: torch.Generator, device: torch.device) -> Tensor:
    """A He-initialised ``F1``."""
    g, nd = shape.groups, shape.nd
    return _he((shape.c_mid, shape.c_in // g, *([shape.k1] * nd)),
               shape.c_in // g * shape.k1**nd, gen, device)


def _random_second(shape: BilinearShape, gen: torch.Generator, device: torch.device) -> Tensor:
    """A He-initialised ``F2``."""
    g, nd = shape.groups, shape.nd
    return _he((shape.c_out, shape.c_mid // g, *([shape.k2] * nd)),
               shape.c_mid // g * shape.k2**nd, gen, device)


def _random_factors(
    shape: BilinearShape, gen: torch.Generator, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """He-initialised ``(F1, F2)`` (``F1`` drawn first)."""
    F1 = _random_first(shape, gen, torch.device(device))
    return F1, _random_second(shape, gen, torch.device(device))


def balance(F1: Tensor, F2: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Rescale each middle channel so both factors have the weight scale of a fresh
    He-initialised layer of their shape; ``F2 (*) F1`` is unchanged (up to rounding).

    Middle channel ``m`` is row ``F1[m]`` and column ``F2[:, m]``; scaling the row by
    ``s_m`` and the column by ``1/s_m`` is a symmetry of the equation.
    """
    c_mid = F1.shape[0]
    m_g = c_mid // groups
    fan1 = F1[0].numel()  # (C_in/g) K1^nd
    k2n = F2[0, 0].numel()
    o_g = F2.shape[0] // groups
    row = F1.reshape(c_mid, -1).norm(dim=1)
    col = F2.reshape(groups, o_g, m_g, k2n).transpose(1, 2).reshape(c_mid, -1).norm(dim=1)
    target_row = (fan1 * 2.0 / fan1) ** 0.5
    target_col = (o_g * k2n * 2.0 / (m_g * k2n)) ** 0.5
    ok = (row > 0) & (col > 0)
    s = torch.where(
        ok, ((col / target_col) / (row / target_row).clamp_min(1e-300)).sqrt(), torch.ones_like(row)
    )
    F1 = F1 * s.reshape(-1, *([1] * (F1.dim() - 1)))
    s2 = s.reshape(groups, 1, m_g, *([1] * (F2.dim() - 2))).expand(
        groups, o_g, m_g, *([1] * (F2.dim() - 2))
    )
    F2 = F2 / s2.reshape(F2.shape[0], m_g, *([1] * (F2.dim() - 2)))
    return F1, F2


def _equal_std(F1: Tensor, F2: Tensor) -> tuple[Tensor, Tensor]:
    """NetMorph's normalisation: one scalar so both factors have the same standard deviation."""
    # Population std: a one-element factor (a single output channel) has std 0, not NaN.
    s1, s2 = F1.std(correction=0), F2.std(correction=0)
    if not (s1 > 0 and s2 > 0):
        return F1, F2
    s = (s2 / s1).sqrt()
    return F1 * s, F2 / s


# ----------------------------------------------------------------------------------------------
# Levenberg-Marquardt


def _lm(
    shape: BilinearShape, Gp: Tensor, F1: Tensor, F2: Tensor, tol: float, max_iter: int
) -> tuple[Tensor, Tensor, int]:
    """Minimise ``||F2 (*) F1 - Gp||`` by Levenberg-Marquardt; each step solves the damped
    Gauss-Newton system by conjugate gradients, preconditioned per factor with the
    Gauss-Newton matrix's block for that factor less its tap cross terms: ``I (x) (B B^T +
    lam)`` for ``A`` and ``I (x) (A^T A + lam)`` for ``B``, one ``C_mid/g`` square matrix
    each (the exact diagonal blocks couple the middle channels through these; measured at 64
    channels, 5x5 into 3x3 (*) 3x3: 20% fewer inner steps than the diagonal alone).

    Mixed precision: residuals, gradients and accepted points are float64; the inner
    conjugate-gradient solve (only a search direction, to a relative accuracy of at least
    ``1e-5``) runs in float32 on float64 problems, twice as fast, and each outer step still
    gains up to that accuracy, so the float64 residual converges to the same tolerance (an
    iterative refinement)."""
    T = shape.target(Gp)
    tnorm = T.norm().clamp_min(1e-300)
    A, B = shape.f2_to_a(F2), shape.f1_to_b(F1)
    r = shape.apply(A, B) - T
    f = r.pow(2).sum()
    # Nielsen's start: a small fraction of the Gauss-Newton diagonal's mean (its entries:
    # ||F1[m]||^2 for F2's, ||F2[:, m]||^2 for F1's), independent of the problem's size
    lam = 1e-2 * (B.pow(2).sum() * A.shape[1] + A.pow(2).sum() * B.shape[2]) / (
        A.numel() + B.numel())
    # Inexact Newton: loose inner solves while steps converge fast; tightened whenever an
    # accepted step gains less than a factor 4 (degenerate, slowly converging targets), given
    # more room when a solve used all of it, never tighter than the last step needs.
    cg_rtol, cg_iters = 0.1, 40
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        rel = f.sqrt() / tnorm
        if rel < tol:
            break
        gA, gB = shape.adjoint(r, A, B)
        lo = torch.float32 if A.dtype == torch.float64 else A.dtype
        Al, Bl, laml = A.to(lo), B.to(lo), lam.to(lo)
        eye = torch.eye(B.shape[1], dtype=lo, device=A.device)
        precA = torch.linalg.inv(Bl @ Bl.transpose(1, 2) + laml * eye)  # (g, m, m)
        precB = torch.linalg.inv(Al.transpose(1, 2) @ Al + laml * eye)

        def normal(
            pA: Tensor, pB: Tensor, A: Tensor = Al, B: Tensor = Bl, lam: Tensor = laml
        ) -> tuple[Tensor, Tensor]:
            """(J^T J + lam) p at the current point (one product for J p)."""
            Jp = shape.apply(torch.cat([pA, A], 2), torch.cat([B, pB], 1))
            qA, qB = shape.adjoint(Jp, A, B)
            return qA + lam * pA, qB + lam * pB

        rtol = max(min(cg_rtol, float(rel) ** 0.5), 1e-5, 0.3 * tol / float(rel))
        (dA, dB), used = _pcg(normal, (-gA.to(lo), -gB.to(lo)), (precA, precB),
                              rtol=rtol, maxiter=cg_iters)
        A2, B2 = A + dA.to(A.dtype), B + dB.to(B.dtype)
        r2 = shape.apply(A2, B2) - T
        f2 = r2.pow(2).sum()
        if f2 < f:
            if f2 > 0.25 * f:
                cg_rtol, cg_iters = max(cg_rtol / 10, 1e-6), min(cg_iters * 2, 400)
            elif used == cg_iters:
                cg_iters = min(cg_iters * 2, 400)
            A, B, r, f = A2, B2, r2, f2
            lam = lam / 3
        else:
            lam = lam * 4
    return shape.b_to_f1(B), shape.a_to_f2(A), it


def _pcg(
    op: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    b: tuple[Tensor, Tensor],
    prec: tuple[Tensor, Tensor],
    rtol: float,
    maxiter: int,
) -> tuple[tuple[Tensor, Tensor], int]:
    """Preconditioned conjugate gradients on the pair ``(A, B)`` from zero; ``prec``: the
    inverse preconditioner ``(PA, PB)``, ``(g, m, m)`` each, applied as ``rA @ PA`` and
    ``PB @ rB``. Returns the solution and the steps taken."""
    bA, bB = b
    PA, PB = prec
    xA, xB = torch.zeros_like(bA), torch.zeros_like(bB)
    rA, rB = bA.clone(), bB.clone()
    zA, zB = rA @ PA, PB @ rB
    pA, pB = zA.clone(), zB.clone()
    rz = (rA * zA).sum() + (rB * zB).sum()
    bnorm = (bA.pow(2).sum() + bB.pow(2).sum()).sqrt()
    step = 0
    for step in range(1, maxiter + 1):  # noqa: B007
        qA, qB = op(pA, pB)
        alpha = rz / ((pA * qA).sum() + (pB * qB).sum())
        xA, xB = xA + alpha * pA, xB + alpha * pB
        rA, rB = rA - alpha * qA, rB - alpha * qB
        if (rA.pow(2).sum() + rB.pow(2).sum()).sqrt() < rtol * bnorm:
            break
        zA, zB = rA @ PA, PB @ rB
        rz_new = (rA * zA).sum() + (rB * zB).sum()
        pA, pB = zA + (rz_new / rz) * pA, zB + (rz_new / rz) * pB
        rz = rz_new
    return (xA, xB), step


# ----------------------------------------------------------------------------------------------
# the schemes; each returns (F1, F2, how, iterations, notes) in float64


Residual = Callable[[Tensor, Tensor], float]


def _stable(
    shape: BilinearShape,
    G: Tensor,
    k: int,
    variant: str,
    tol: float,
    max_iter: int,
    gen: torch.Generator,
    measure: Residual,
    feas: Feasibility,
) -> tuple[Tensor, Tensor, str, int, list[str], float]:
    """The stable scheme; returns the balanced factors, the path, iterations, notes and the
    float64 residual of the returned factors (``measure``: the residual function)."""
    device = G.device
    Gp = functools.cache(lambda: pad_kernel(G, shape.kc) if shape.nd else G)  # pairs: unused
    notes: list[str] = [] if feas.exact else [feas.message]
    if variant == "auto":
        # the count is necessary, not sufficient: fall back along the chain if a path misses
        first = "lm" if feas.how in ("nonlinear", "infeasible") else feas.how
        chain = [first] + [h for h in ("pairs", "lm") if h != first]
    else:
        chain = [variant]
    best: tuple[float, Tensor, Tensor, str, int] | None = None
    for how in chain:
        iters = 1
        if how == "linear":
            how = feas.how if feas.how in ("solve-F1", "solve-F2") else "solve-F2"
        if how == "solve-F2":
            F1 = _random_first(shape, gen, device)
            if shape.k1 == 1:
                F1 = _orthogonal_rows(tuple(F1.shape), F1[0].numel(), gen, device)
            F2 = _second_given_first(shape, F1, Gp(), _random_second(shape, gen, device))
        elif how == "solve-F1":
            F1r = _random_first(shape, gen, device)
            F2 = _random_second(shape, gen, device)
            if shape.k2 == 1:
                F2 = _orthogonal_rows(tuple(F2.shape), F2[0].numel(), gen, device)
            F1 = _first_given_second(shape, F2, Gp(), F1r)
        elif how == "pairs":
            try:
                F1, F2 = _pairs(shape, G, k, gen)
            except DecompositionError as err:
                notes.append(f"pairs: {err}")
                continue
            iters = 0
        else:
            # warm start: F1 random, F2 its least-squares partner (a variable-projection step)
            F1r, F2r = _random_factors(shape, gen, device)
            F2 = _second_given_first(shape, F1r, Gp(), F2r, driver="gelsy")  # only a start
            F1, F2, iters = _lm(shape, Gp(), F1r, F2, tol * 0.1, max_iter)
            how = "lm"
        F1, F2 = balance(F1, F2, shape.groups)
        residual = measure(F1, F2)
        if best is None or residual < best[0]:
            best = (residual, F1, F2, how, iters)
        if residual <= tol:
            break
        notes.append(f"{how} reached only {residual:.2e}")
    assert best is not None
    residual, F1, F2, how, iters = best
    return F1, F2, how, iters, notes, residual


def _pairs(shape: BilinearShape, G: Tensor, k: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """A dense exact point for a zero-ringed target (see ``Feasibility``): the identity
    factorisation, its spare middle channels filled with cancelling groups (one shared
    ``F1`` row ``v``; ``F2`` columns ``w_1 .. w_n`` summing to zero, so
    ``sum_j w_j (*) v = 0``), then every group's middle channels mixed by a random rotation
    ``X`` (``F1 -> X F1``, ``F2 -> F2 X^T``), which leaves the composite unchanged and spreads
    the pairs' full-support taps into every channel.

    On the identity's side every tap off the centre comes from the groups alone: with one
    group (the usual ``C_mid = C_out + 2``) it is the product ``w[o, tap] (X u)[n]`` of the
    group's kernel and the rotated group direction ``u``. A Gaussian times a Gaussian puts
    about 4% of such products below ``1e-3`` of the tensor's rms, so the rotation is made to
    send ``u`` to a vector of equal-magnitude entries with random signs (a Householder
    reflection after a Haar rotation) and that side's group kernels have magnitudes in
    ``[0.5, 1]`` of a quarter of the centre taps' scale with random signs: no entry is near
    zero. The
    other side's group kernels are Gaussian at the parent kernel's rms, so the cancelling
    terms are of the size of the parent's own."""
    g, nd = shape.groups, shape.nd
    o, i, m = shape.c_out // g, shape.c_in // g, shape.c_mid // g
    device = G.device
    second = shape.k2 % 2 == 1 and shape.k1 >= k and (shape.k1 - k) % 2 == 0 and m >= o + 2
    F1, F2, *_ = _net2net(shape, G, "identity-second" if second else "identity-first", gen,
                          spare_rows=False)
    used = o if second else i
    F1 = F1.reshape(g, m, i, -1)
    F2 = F2.reshape(g, o, m, -1)
    spare = list(range(used, m))
    if len(spare) < 2:
        raise DecompositionError(f"pairs need 2 spare middle channels per group, have {len(spare)}")
    chunks = [spare[j : j + 2] for j in range(0, len(spare) - len(spare) % 2, 2)]
    if len(spare) % 2:
        chunks[-1].append(spare[-1])  # an odd count: one group of three
    rms = float(G.double().pow(2).mean().sqrt())
    scale = rms if rms > 0 else (2.0 / (i * shape.k1**nd)) ** 0.5

    def bounded(*size: int) -> Tensor:  # random signs, magnitudes in [0.5, 1]
        sign = torch.randint(0, 2, size, generator=gen, dtype=torch.float64) * 2 - 1
        return (sign * (0.5 + 0.5 * torch.rand(size, generator=gen, dtype=torch.float64))).to(
            device
        )

    # sizes so that (group kernel) * (X u) is a quarter of a rotated identity tap, 1 / sqrt(m):
    # far from zero, yet the cancelling terms stay small (measured at 512 channels: float32
    # residual 4.1e-8 against 3.6e-8 with the old Gaussian groups, 9e-8 at full size)
    for j in range(g):
        for chunk in chunks:
            n = len(chunk)
            if second:  # identity in F2: the group's F2 columns carry its off-centre taps
                v = _randn((i, shape.k1**nd), gen, device) * scale
                w = bounded(o, n - 1, shape.k2**nd) / (4 * 2**0.5)
            else:  # identity in F1: the shared F1 row carries them
                v = bounded(i, shape.k1**nd) / (4 * n**0.5)
                w = _randn((o, n - 1, shape.k2**nd), gen, device) * scale
            F1[j, chunk] = v
            F2[j, :, chunk] = torch.cat([w, -w.sum(1, keepdim=True)], 1)
    X = torch.linalg.qr(_randn((g, m, m), gen, device))[0]
    # Householder: send the first group's direction u to equal magnitudes with random signs
    u = torch.zeros(m, dtype=torch.float64, device=device)
    first = chunks[0]
    if second:
        u[first[0]], u[first[-1]] = 1.0, -1.0
    else:
        u[first] = 1.0
    signs = torch.randint(0, 2, (g, m), generator=gen, dtype=torch.float64).to(device) * 2 - 1
    h = X @ u - signs * (u.norm() / m**0.5)  # (g, m)
    hh = (h * h).sum(1, keepdim=True).clamp_min(1e-300)
    X = X - 2 * h.unsqueeze(2) * (h.unsqueeze(1) @ X) / hh.unsqueeze(2)
    if second:
        F1 = torch.einsum("jnm,jmia->jnia", X, F1)
        F2 = _rotate_identity(F2.transpose(1, 2), X, used).transpose(1, 2)
    else:
        F1 = _rotate_identity(F1, X, used)
        F2 = torch.einsum("joma,jnm->jona", F2, X)
    return (
        F1.reshape(shape.c_mid, i, *([shape.k1] * nd)),
        F2.reshape(shape.c_out, m, *([shape.k2] * nd)),
    )


def _rotate_identity(F: Tensor, X: Tensor, used: int) -> Tensor:
    """``einsum("jnm,jmca->jnca", X, F)`` for a factor ``F`` ``(g, m, used, taps)`` whose
    first ``used`` middle channels are the centred identity (``F[j, r, r, centre] = 1``, no
    other entry; the rest are :func:`_pairs`' groups): the identity's part is ``X``'s columns
    placed at the centre tap, so only the groups' ``m - used`` channels are multiplied (the
    full product multiplies ``m`` channels, almost all zeros: the same sums up to float64
    rounding)."""
    taps = F.shape[-1]
    out = torch.einsum("jnm,jmca->jnca", X[:, :, used:], F[:, used:])
    out[..., (taps - 1) // 2] += X[:, :, :used]
    return out


def _shrunk_size(shape: BilinearShape, k: int) -> tuple[str, int] | None:
    """Which factor NetMorph's practical algorithm shrinks, and to what kernel size: the
    smallest size keeping the composite at least the parent's ``k`` with centred padding."""
    s = shape.stride
    for k2 in range(1, shape.k2 + 1):
        extra = shape.k1 + s * (k2 - 1) - k
        if extra >= 0 and extra % 2 == 0:
            if k2 < shape.k2:
                return "F2", k2
            break
    if s == 1:
        for k1 in range(1, shape.k1 + 1):
            extra = k1 + (shape.k2 - 1) - k
            if extra >= 0 and extra % 2 == 0:
                return ("F1", k1) if k1 < shape.k1 else None
    return None


def _als(
    shape: BilinearShape, Gp: Tensor, tol: float, max_iter: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, int]:
    """NetMorph algorithm 1: alternate least-squares solves from a random ``F2``. The random
    start has orthogonal rows (dense, perfectly conditioned): a plain Gaussian square start
    is often so ill-conditioned that the solved factor's norm blows up and the float32 cast
    loses the product (measured: 2e-4 to 7e-4 output error on ResNet-18 layers)."""
    F1, F2 = _random_factors(shape, gen, Gp.device)  # drawn for the seed's stream only
    F2 = _orthogonal_rows(tuple(F2.shape), F2[0].numel(), gen, Gp.device)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        F1 = _first_given_second(shape, F2, Gp, None)
        F2 = _second_given_first(shape, F1, Gp, None)
        if relative_residual(F1, F2, Gp, shape.stride, shape.groups) < tol:
            break
    F1, F2 = _equal_std(F1, F2)
    return F1, F2, it


def _netmorph(
    shape: BilinearShape,
    Gp: Tensor,
    k: int,
    variant: str,
    tol: float,
    max_iter: int,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor, str, int, list[str]]:
    shrink = _shrunk_size(shape, k) if variant == "practical" else None
    if shrink is None:
        notes = [] if variant == "als" else ["nothing to shrink: plain alternating least squares"]
        F1, F2, it = _als(shape, Gp, tol, max_iter, gen)
        return F1, F2, "als", it, notes
    which, size = shrink
    small = BilinearShape(
        shape.c_in,
        shape.c_mid,
        shape.c_out,
        size if which == "F1" else shape.k1,
        size if which == "F2" else shape.k2,
        shape.nd,
        shape.stride,
        shape.groups,
    )
    Gs = pad_kernel(
        Gp[
            (
                slice(None),
                slice(None),
                *[slice((shape.kc - small.kc) // 2, (shape.kc + small.kc) // 2)] * shape.nd,
            )
        ],
        small.kc,
    )
    F1, F2, it = _als(small, Gs, tol, max_iter, gen)
    if which == "F1":
        F1 = pad_kernel(F1, shape.k1)
    else:
        F2 = pad_kernel(F2, shape.k2)
    return (
        F1,
        F2,
        "practical",
        it,
        [
            f"{which} solved at kernel {size}, zero-padded to "
            f"{shape.k1 if which == 'F1' else shape.k2}"
        ],
    )


def _identity(
    c_out: int, c_in_g: int, k: int, nd: int, groups: int, device: torch.device
) -> Tensor:
    """Centred identity kernel ``(c_out, c_in_g, k...)``: output ``j`` of each group copies its
    group's input ``j`` (needs ``c_in_g >= c_out / groups``)."""
    eye = torch.zeros(c_out, c_in_g, *([k] * nd), dtype=torch.float64, device=device)
    rows = torch.arange(c_out, device=device)
    eye[(rows, rows % (c_out // groups), *([k // 2] * nd))] = 1.0
    return eye


def _net2net(
    shape: BilinearShape, G: Tensor, variant: str, gen: torch.Generator, spare_rows: bool = True
) -> tuple[Tensor, Tensor, str, int, list[str]]:
    """The identity factorisation; ``spare_rows=False`` leaves the spare middle channels'
    ``F1`` rows zero (for :func:`_pairs`, which fills them) instead of drawing them."""
    g, nd, device = shape.groups, shape.nd, G.device
    o, i, m = shape.c_out // g, shape.c_in // g, shape.c_mid // g
    k = G.shape[-1] if nd else 1
    if variant == "identity-second":
        if m < o or shape.k2 % 2 == 0 or shape.k1 < k or (shape.k1 - k) % 2:
            raise DecompositionError(
                f"net2net identity-second needs C_mid/groups >= C_out/groups ({m} < {o}?), an odd "
                f"K2 (got {shape.k2}) and K1 >= K with K1 - K even (K1={shape.k1}, K={k})"
            )
        F2 = _identity(shape.c_out, m, shape.k2, nd, g, device)
        size = (shape.c_mid, i, *([shape.k1] * nd))
        F1 = (_he(size, i * shape.k1**nd, gen, device) if spare_rows
              else torch.zeros(size, dtype=torch.float64, device=device))
        F1.reshape(g, m, -1)[:, :o] = (pad_kernel(G, shape.k1) if nd else G).reshape(g, o, -1)
        return (
            F1,
            F2,
            "identity",
            0,
            ["extra middle channels: random F1 rows, zero F2 columns"] if m > o else [],
        )
    if m < i or shape.k1 % 2 == 0 or shape.stride != 1 or shape.k2 < k or (shape.k2 - k) % 2:
        raise DecompositionError(
            f"net2net identity-first needs C_mid/groups >= C_in/groups ({m} < {i}?), an odd K1 "
            f"(got {shape.k1}), stride 1 (got {shape.stride}) and K2 >= K with K2 - K even "
            f"(K2={shape.k2}, K={k})"
        )
    # F1 maps input i of group j to middle channel j*m + i; F2 reads those columns.
    F1 = torch.zeros(shape.c_mid, i, *([shape.k1] * nd), dtype=torch.float64, device=device)
    inputs = torch.arange(i, device=device)
    rows = (torch.arange(g, device=device).unsqueeze(1) * m + inputs).flatten()
    F1[(rows, inputs.repeat(g), *([shape.k1 // 2] * nd))] = 1.0
    F2 = torch.zeros(shape.c_out, m, *([shape.k2] * nd), dtype=torch.float64, device=device)
    Gk = pad_kernel(G, shape.k2) if nd else G
    F2[:, :i] = Gk
    return F1, F2, "identity", 0, []


# ----------------------------------------------------------------------------------------------
# public entry point


def decompose(
    G: Tensor,
    mid_channels: int,
    kernel_sizes: tuple[int, int] | None = None,
    method: str = "stable",
    stride: int = 1,
    groups: int = 1,
    tol: float | None = None,
    seed: int = 0,
    allow_approximate: bool = False,
    variant: str | None = None,
    max_iter: int = 200,
    residual_probes: int | None = None,
) -> tuple[Tensor, Tensor, DecompositionReport]:
    """Factor a layer's weight ``G`` into two layers with ``F2 (*) F1 = G~`` (``G`` centred in
    the composite kernel size ``K1 + stride (K2 - 1)``).

    Args:
        G: ``(C_out, C_in/groups, K[, K])`` conv weight or ``(C_out, C_in)`` linear weight;
            square kernels only.
        mid_channels: ``C_mid``, the first factor's output channels (a multiple of groups).
        kernel_sizes: ``(K1, K2)``; default ``(K, 1)`` (a 1x1 second factor, always dense and
            exact with ``C_mid >= C_out``).
        method: ``"stable"``, ``"netmorph"`` or ``"net2net"`` (module docstring).
        stride: the parent's stride, carried by ``F1``.
        groups: the parent's groups; both factors get the same groups.
        tol: relative residual to reach in float64 (default ``1e-10``).
        seed: seeds every random start.
        allow_approximate: return the best factors found instead of raising when ``tol`` is
            missed; the residual is in the report.
        variant: ``"stable"``: ``"auto"`` | ``"linear"`` | ``"lm"``; ``"netmorph"``:
            ``"practical"`` | ``"als"``; ``"net2net"``: ``"identity-second"`` |
            ``"identity-first"``.
        max_iter: iteration cap for the iterative paths.
        residual_probes: ``None`` (default): both residuals exact. An integer ``k``: both
            estimated from ``k`` random output directions per group (see
            :func:`~stablemorph.equation.relative_residual`; exact when ``k >= C_out /
            groups``), about ``C_out / (groups k)`` times cheaper. Morphs use it, since their
            probe-batch check measures the function itself.

    Returns:
        ``(F1, F2, report)``; ``F1``: ``(C_mid, C_in/groups, K1[, K1])``, ``F2``:
        ``(C_out, C_mid/groups, K2[, K2])`` in ``G``'s dtype and device.

    Raises:
        DecompositionError: malformed request, non-finite ``G``, or ``tol`` not reached.
    """
    start = time.perf_counter()
    nd = spatial_dims(G) if G.dim() >= 2 else -1
    if nd < 0 or nd > 2:
        raise DecompositionError(
            f"G must be a linear, Conv1d or Conv2d weight, got shape {tuple(G.shape)}"
        )
    if not (torch.isfinite(G.sum()) or torch.isfinite(G).all()):  # a finite sum: all finite
        raise DecompositionError(f"G {tuple(G.shape)} has non-finite entries")
    if method not in METHODS:
        raise DecompositionError(f"unknown method {method!r}; choose one of {METHODS}")
    variant = variant or VARIANTS[method][0]
    if variant not in VARIANTS[method]:
        raise DecompositionError(
            f"unknown variant {variant!r} for {method!r}; choose one of {VARIANTS[method]}"
        )
    k = G.shape[-1] if nd else 1
    if nd and any(s != k for s in G.shape[2:]):
        raise DecompositionError(f"only square kernels are supported, got {tuple(G.shape)}")
    k1, k2 = kernel_sizes if kernel_sizes is not None else (k, 1)
    if nd == 0 and (k1, k2) != (1, 1):
        raise DecompositionError(
            f"a linear weight has no kernel: kernel_sizes must be (1, 1), got {(k1, k2)}"
        )
    if k1 < 1 or k2 < 1 or stride < 1 or groups < 1:
        raise DecompositionError(
            f"kernel sizes, stride and groups must be >= 1, got {(k1, k2)}, {stride}, {groups}"
        )
    c_out, c_in = G.shape[0], G.shape[1] * groups
    if c_out % groups or mid_channels % groups or mid_channels < 1:
        raise DecompositionError(
            f"C_out={c_out} and mid_channels={mid_channels} must be positive multiples of "
            f"groups={groups}"
        )
    shape = BilinearShape(c_in, mid_channels, c_out, k1, k2, nd, stride, groups)
    kc = composite_size(k1, k2, stride) if nd else 1
    if nd and (kc < k or (kc - k) % 2):
        raise DecompositionError(
            f"kernels K1={k1}, K2={k2} with stride {stride} compose to size {kc}, which cannot "
            f"hold the parent's {k}x{k} kernel centred: need K1 + stride*(K2-1) - K even and >= 0"
        )
    tol = 1e-10 if tol is None else tol
    feas = feasibility(c_in, mid_channels, c_out, k1, k2, groups, nd, stride, k)
    if method == "stable" and not feas.exact and not allow_approximate:
        raise DecompositionError(
            f"stable: {feas.message} (G {tuple(G.shape)}); pass allow_approximate=True to get "
            f"the best approximation instead"
        )
    gen = torch.Generator().manual_seed(seed)
    Gd = G.detach().to(torch.float64)

    def measure(F1: Tensor, F2: Tensor) -> float:
        return relative_residual(F1, F2, Gd, stride, groups, probes=residual_probes, seed=seed)

    if method == "stable":
        F1, F2, how, iters, notes, residual = _stable(
            shape, Gd, k, variant, tol, max_iter, gen, measure, feas
        )
    else:
        if method == "netmorph":
            Gp = pad_kernel(Gd, kc) if nd else Gd
            F1, F2, how, iters, notes = _netmorph(shape, Gp, k, variant, tol, max_iter, gen)
        else:
            F1, F2, how, iters, notes = _net2net(shape, Gd, variant, gen)
        residual = measure(F1, F2)
    F1c, F2c = F1.to(G.dtype), F2.to(G.dtype)
    residual_cast = residual if G.dtype == torch.float64 else measure(F1c, F2c)
    zeros, near = sparsity(F1c, F2c)
    report = DecompositionReport(
        method=method,
        variant=variant,
        how=how,
        residual=residual,
        residual_cast=residual_cast,
        zero_fraction=zeros,
        near_zero_fraction=near,
        norm_f1=float(F1.norm()),
        norm_f2=float(F2.norm()),
        iterations=iters,
        seconds=time.perf_counter() - start,
        feasibility=feas.message,
        notes=notes,
    )
    if residual > tol and not allow_approximate:
        raise DecompositionError(
            f"{method} ({how}) reached relative residual {residual:.3e} > tol {tol:.1e} for "
            f"G {tuple(G.shape)} -> C_mid={mid_channels}, K1={k1}, K2={k2}, stride={stride}, "
            f"groups={groups}. {feas.message}. Nearest feasible: C_mid >= {feas.nearest_mid}"
            + (", or kernel_sizes=(K1, 1)" if k2 > 1 else "")
            + "; or pass allow_approximate=True to accept the residual."
        )
    return F1c, F2c, report
