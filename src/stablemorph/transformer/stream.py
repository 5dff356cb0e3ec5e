r"""Widening the residual stream (``d_model``) exactly, LayerNorm included.

**What must hold.** Every write into the stream is linear (embeddings, attention and MLP
output projections), so the child's stream can be any fixed linear re-encoding ``x' = A x``
(``A``: ``d' x d``) of the parent's: multiply each writer by ``A``. Every read goes through a
LayerNorm, ``LN(x) = gamma * n(x) + beta`` with ``n(x) = C x / sqrt(|C x|^2 / d + eps)`` and
``C = I - 11^T/d`` the centring projector. The child reads exactly what the parent reads iff
``n'(A x)`` determines ``n(x)`` linearly *for every* ``x``. Letting ``x -> 0`` gives
``L C' A = C`` for the decoding map ``L``; then equal denominators are needed for every ``x``
(``eps > 0`` makes the scale visible), i.e. ``|C' A x|^2 / d' = |C x|^2 / d``:

    A^T C' A = (d'/d) C            (the stream's variance is preserved)

So ``C' A = sqrt(d'/d) V`` with ``V`` an isometry on ``1^perp``. We use ``A = sqrt(d'/d) U``
with ``U^T U = I_d`` and ``U 1_d = sqrt(d/d') 1_{d'}``: it preserves the stream's mean and
variance, hence ``n'(A x) = sqrt(d'/d) U n(x)`` and ``n(x) = sqrt(d/d') U^T n'(A x)``.

**Which widths.** Such a ``U`` exists for *every* ``d' > d``. With ``g = gcd(d, d')`` we build
it block-diagonal: ``g`` blocks each map ``q = d/g`` old coordinates to ``p = d'/g`` new ones by
``U_b = f e^T + P Q^T`` (``e = 1_q/sqrt q``, ``f = 1_p/sqrt p``, ``Q`` an orthonormal basis of
``e^perp``, ``P`` random orthonormal vectors in ``f^perp``). For ``d' = k d`` (``q = 1``) this
is plain duplication: ``x' = (x_1, .., x_1, x_2, .., x_2, ...)``, ``k`` copies of each.

The *old coordinates cannot stay as they are* for ``d' < 2d - 2``: ``A = [I; B]`` needs
``B^T B = (d'/d - 1) I + (a symmetric matrix of rank <= 2)``, whose rank is ``>= d - 2``,
while ``B`` has only ``d' - d`` rows. Copying some coordinates (Net2Net) or appending zero
coordinates (NetMorph) changes the LayerNorm mean and variance, so with a standard LayerNorm:

- ``net2net`` (copies, reads split ``1/k``) and ``netmorph`` (copies, new copies read with
  zero weights) are exact only for ``d' = k d``; other widths raise ``ValueError``;
- ``stable`` works for every ``d' > d`` (dense mixing within blocks when ``k`` is not an
  integer), and adds random reads of the ``d' - d`` directions orthogonal to ``range(A)``,
  which the LayerNorm output never contains at growth time (so they change nothing yet), at
  ``out_scale`` (default 0.1) times the reader's rms.

**Reads.** A reader ``W (gamma * n + beta) + b`` becomes
``W' (gamma' * n' + beta') + b'`` with ``W' = W D + R N^T diag(gamma')^-1``, where
``D diag(gamma') A = diag(gamma)``, ``N`` spans ``range(A)^perp`` and
``b' = b + W beta - W' beta'`` (every reader here has a bias). ``stable`` uses
``D = diag(gamma) U^T diag(gamma')^-1 / sqrt(d'/d)``, ``gamma'`` = ``gamma`` copied (``q = 1``) or
the rms of ``gamma`` over the block (``q > 1``), ``beta' = A beta``.

**Tied head.** The head must then equal the grown embedding ``E A^T``, so exactness needs
``A^T diag(gamma_f') A = diag(gamma_f)``: only possible for ``d' = k d`` (each old
coordinate's copies share ``gamma_f``: equally under ``net2net``, all to the first copy under
``netmorph``, random positive shares under ``stable``). Other widths raise ``ValueError``;
untie the head first.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Unpack

import torch
from torch import Tensor

from stablemorph.morphs.contract import MorphError
from stablemorph.record import ParamOrigin
from stablemorph.transformer.model import GPT, GPTConfig
from stablemorph.transformer.surgery import (
    ChildParams,
    GrowthOptions,
    Options,
    dup_origin,
    rms,
    run_growth,
)


@dataclass(frozen=True)
class StreamMap:
    """``x' = A x`` with ``A = sqrt(d'/d) U`` (``d' x d``); ``N`` (``d' x (d' - d)``) an
    orthonormal basis of ``range(A)^perp``; ``q -> p`` the block sizes; ``dup`` (``q = 1``
    only) the old coordinate each new coordinate copies."""

    A: Tensor
    U: Tensor
    N: Tensor
    q: int
    p: int

    @property
    def dup(self) -> Tensor:
        return torch.arange(self.A.shape[0]) // self.p


def stream_map(d: int, d_new: int, gen: torch.Generator) -> StreamMap:
    """The mean- and variance-preserving re-encoding of a width-``d`` stream into ``d_new``
    coordinates (float64; see module docstring)."""
    g = math.gcd(d, d_new)
    q, p = d // g, d_new // g
    e = torch.full((q, 1), q**-0.5, dtype=torch.float64)
    f = torch.full((p, 1), p**-0.5, dtype=torch.float64)
    u_blocks, n_blocks = [], []
    for _ in range(g):
        u = f @ e.T
        if q > 1:
            u = u + _orthonormal_complement(f, q - 1, gen) @ _orthonormal_complement(e, q - 1,
                                                                                    gen).T
        u_blocks.append(u)
        n_blocks.append(_orthonormal_complement(u, p - q, gen))
    U = torch.block_diag(*u_blocks)
    # Plain duplication is built from exact ones (sqrt(k) * k**-0.5 need not round to 1).
    A = torch.block_diag(*[torch.ones(p, 1, dtype=torch.float64)] * g) if q == 1 else (
        math.sqrt(d_new / d) * U
    )
    return StreamMap(A=A, U=U, N=torch.block_diag(*n_blocks), q=q, p=p)


def _orthonormal_complement(basis: Tensor, m: int, gen: torch.Generator) -> Tensor:
    """``m`` random orthonormal columns orthogonal to the orthonormal columns of ``basis``."""
    g = torch.randn(basis.shape[0], m, generator=gen, dtype=torch.float64)
    g = g - basis @ (basis.T @ g)
    g = g - basis @ (basis.T @ g)  # second pass: orthogonal to machine precision
    return torch.linalg.qr(g).Q


def _readers(model: GPT) -> list[tuple[str, list[str]]]:
    """(LayerNorm, the Linears reading it) pairs."""
    pairs = [
        (f"blocks.{b}.ln{i}", [f"blocks.{b}.{r}" for r in readers])
        for b in range(model.config.n_layer)
        for i, readers in ((1, ("attn.q", "attn.k", "attn.v")), (2, ("mlp.fc",)))
    ]
    return [*pairs, ("ln_f", ["head"])]


def _writers(model: GPT) -> list[tuple[str, int]]:
    """(parameter, stream dim) of everything that writes the stream."""
    out = [("wte.weight", 1), ("wpe.weight", 1)]
    for b in range(model.config.n_layer):
        out += [(f"blocks.{b}.{m}.proj.{t}", 0) for m in ("attn", "mlp") for t in ("weight",
                                                                                  "bias")]
    return out


def grow_d_model(
    model: GPT,
    d_model: int,
    **options: Unpack[GrowthOptions],
) -> GPT:
    """A new GPT with residual width ``d_model`` computing the same logits as ``model``.

    ``net2net`` and ``netmorph`` need ``d_model`` to be a multiple of the current width; a tied
    head needs that under every scheme; ``stable`` otherwise takes any larger width (module
    docstring: why). ``out_scale`` (``stable``): rms of the reads of the new stream directions
    relative to the reader's rms. ``options``:
    :class:`~stablemorph.transformer.surgery.Options`.
    ``model`` is never modified.
    """
    op = "grow_d_model"
    opts = Options.check(op, model, options)
    scheme = opts.scheme
    d = model.config.d_model
    if not isinstance(d_model, int) or d_model <= d:
        raise MorphError(f"{op}: d_model={d_model!r} is not larger than the current {d}")
    multiple = d_model % d == 0
    if not multiple and scheme != "stable":
        raise MorphError(
            f"{op}: scheme {scheme!r} is exact with a standard LayerNorm only for multiples of "
            f"d_model={d} ({d * 2}, {d * 3}, ...), got {d_model}: copying or zero-padding part "
            f"of the stream changes the LayerNorm mean and variance. Use scheme='stable' "
            f"(any width) or a multiple."
        )
    if not multiple and model.config.tie_head:
        raise MorphError(
            f"{op}: with a tied head only multiples of d_model={d} ({d * 2}, {d * 3}, ...) are "
            f"exact, got {d_model}: the head must equal the re-encoded embedding. Untie the head "
            f"or grow to a multiple."
        )

    def plan(child: GPT) -> tuple[GPTConfig, ChildParams]:
        params = _plan(child, d_model, scheme, opts.seed, opts.out_scale)
        return dataclasses.replace(child.config, d_model=d_model), params

    return run_growth(op, model, "d_model", opts, opts.recipe(d_model=d_model), plan)


def _plan(model: GPT, d_model: int, scheme: str, seed: int, out_scale: float) -> ChildParams:
    """The child's parameters (module docstring)."""
    d = model.config.d_model
    multiple = d_model % d == 0
    gen = torch.Generator().manual_seed(seed)
    smap = stream_map(d, d_model, gen)
    params = ChildParams.from_parent(model)
    parent_values = dict(params.values)
    k = d_model // d if multiple else 0
    dup = smap.dup if multiple else None

    def origin(name: str, dim: int, scale: Tensor | None = None) -> ParamOrigin:
        return dup_origin(name, dim, dup, scale) if multiple else ParamOrigin(None)

    for name, dim in _writers(model):
        w = parent_values[name]
        params.set(name, smap.A @ w if dim == 0 else w @ smap.A.T, origin(name, dim), name)

    tied = model.config.tie_head
    first = torch.arange(d_model) % max(k, 1) == 0
    for ln, readers in _readers(model):
        gamma, beta = parent_values[f"{ln}.weight"], parent_values[f"{ln}.bias"]
        tied_head = tied and ln == "ln_f"
        if tied_head:
            shares = _shares(scheme, k, first, gen)
            gamma_new, beta_new = gamma[dup] * shares, beta[dup] * shares
            index = torch.where(shares == 0, -1, dup)
            ln_origin = {t: dup_origin(f"{ln}.{t}", 0, index, shares) for t in ("weight", "bias")}
        else:
            gamma_new = gamma[dup] if multiple else _block_rms(gamma, smap)
            beta_new = beta[dup] if multiple else smap.A @ beta
            ln_origin = {t: origin(f"{ln}.{t}", 0) for t in ("weight", "bias")}
            if scheme == "stable" and (gamma_new == 0).any():  # stable divides by gamma'
                gamma_new = torch.where(gamma_new == 0, 1.0, gamma_new)
                ln_origin["weight"] = ParamOrigin(None)
        params.set(f"{ln}.weight", gamma_new, ln_origin["weight"], f"{ln}.weight")
        params.set(f"{ln}.bias", beta_new, ln_origin["bias"], f"{ln}.bias")
        if tied_head:
            # E A^T diag(gamma') A = E diag(gamma) and E A^T beta' = E beta: the head (the
            # re-encoded embedding, set above) and its bias need nothing more.
            continue
        decode = _decode(scheme, gamma, gamma_new, smap, first)
        for r in readers:
            w, b = parent_values[f"{r}.weight"], parent_values[f"{r}.bias"]
            w_new = w @ decode
            if scheme == "stable" and smap.N.shape[1]:
                noise = torch.randn(w.shape[0], smap.N.shape[1], generator=gen,
                                    dtype=torch.float64) * (rms(w) * out_scale)
                w_new = w_new + noise @ smap.N.T / gamma_new
            if scheme == "stable":
                b_new, b_origin = b + w @ beta - w_new @ beta_new, ParamOrigin(None)
            else:  # W' beta' = W beta exactly: the bias stays
                b_new, b_origin = b, ParamOrigin(f"{r}.bias")
            if scheme == "net2net":
                w_origin = origin(f"{r}.weight", 1, torch.full((d_model,), 1.0 / k))
            elif scheme == "netmorph":
                w_origin = dup_origin(f"{r}.weight", 1, torch.where(first, dup, -1))
            else:
                w_origin = ParamOrigin(None)
            params.set(f"{r}.weight", w_new, w_origin, f"{r}.weight")
            params.set(f"{r}.bias", b_new, b_origin, f"{r}.bias")

    params.notes.append(
        f"stream re-encoded x' = A x by {d // smap.q} blocks of {smap.q} -> {smap.p} coordinates"
    )
    return params


def _shares(scheme: str, k: int, first: Tensor, gen: torch.Generator) -> Tensor:
    """Per new coordinate, its share of the old coordinate's ``gamma_f``/``beta_f`` (shares of
    one old coordinate's ``k`` copies sum to 1)."""
    if scheme == "net2net":
        return torch.full(first.shape, 1.0 / k, dtype=torch.float64)
    if scheme == "netmorph":
        return first.double()
    w = 0.5 + torch.rand(first.shape[0] // k, k, generator=gen, dtype=torch.float64)
    return (w / w.sum(1, keepdim=True)).reshape(-1)


def _block_rms(gamma: Tensor, smap: StreamMap) -> Tensor:
    """Per new coordinate, the rms of ``gamma`` over its block's old coordinates (1 where
    that is 0)."""
    block = gamma.view(-1, smap.q).pow(2).mean(1).sqrt()
    block = torch.where(block > 0, block, torch.ones_like(block))
    return block.repeat_interleave(smap.p)


def _decode(scheme: str, gamma: Tensor, gamma_new: Tensor, smap: StreamMap,
            first: Tensor) -> Tensor:
    """``D`` (``d x d'``) with ``D diag(gamma') A = diag(gamma)``: reader ``W`` becomes
    ``W D``."""
    d, d_new = smap.A.shape[1], smap.A.shape[0]
    if scheme == "stable":
        return gamma[:, None] * smap.U.T / gamma_new / math.sqrt(d_new / d)
    onehot = torch.nn.functional.one_hot(smap.dup, d).double().T  # (d, d')
    if scheme == "net2net":
        return onehot / smap.p
    return onehot * first.double()
