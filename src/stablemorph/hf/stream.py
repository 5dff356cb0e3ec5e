r"""Widening the residual stream (the hidden size) of a :class:`~stablemorph.hf.net.Net`.

Every write into the stream is linear (embeddings, position embeddings, attention and MLP
output projections), so the child's stream can be ``x' = A x`` (``A``: ``d' x d``): each
writer is multiplied by ``A``. Every read goes through a norm ``gamma * n(x) (+ beta)``; the
child reads exactly what the parent reads when ``n'(A x) = A n(x)`` for *every* ``x``:

- **RMSNorm** (``n(x) = x / sqrt(|x|^2 / d + eps)``): any ``A = sqrt(d'/d) U`` with
  ``U^T U = I`` (an isometry scaled by ``sqrt(d'/d)``) keeps ``|A x|^2 / d' = |x|^2 / d``, eps
  included, at every width ``d' > d``.
- **LayerNorm** (mean and variance): ``U`` must also map the mean direction to the mean
  direction; :func:`stablemorph.transformer.stream.stream_map` builds such a ``U`` at any
  width (module docstring there: why the old coordinates cannot simply stay).

**Reads.** A reader ``W (gamma * n + beta) + b`` becomes ``W' (gamma' * n' + beta') + b'`` with
``W' = W D + R N^T diag(gamma')^-1`` and ``D = diag(gamma) A^+ diag(gamma')^-1`` (``A^+ = A^T
d/d'``, so ``D diag(gamma') A = diag(gamma)``: the norm weight is folded into its readers),
``N`` an orthonormal basis of ``range(A)^perp`` (the normalised stream never has a component
there, so the random reads ``R`` change nothing yet) and ``beta' = gamma' * A (beta / gamma)``
(then ``W' beta' = W beta``: reader biases stay; where ``gamma`` has exact zeros, ``beta'`` is
``A beta / sqrt(d'/d)`` and the reader's bias absorbs ``W beta - W' beta'``).

Schemes (``k = d'/d``):

- ``stable``: ``U`` a random dense isometry (RMSNorm; LayerNorm: ``stream_map``), folded
  norms with ``gamma'`` = the rms of ``gamma``, random reads ``R`` at ``out_scale`` times the
  reader's rms. Any ``d' > d``.
- ``net2net``: ``A`` copies each coordinate ``k`` times, ``gamma'`` and ``beta'`` copied, reads
  split ``1/k``. Multiples of ``d`` only.
- ``netmorph``: RMSNorm: ``A = sqrt(k) [I; 0]`` (zero new coordinates), ``gamma' = (gamma, 1)``,
  reads of the new coordinates random; any ``d' > d``. LayerNorm: copies as ``net2net``,
  read through the first copy only plus random reads of the directions the copies never
  take (``R N^T``); multiples only.

**Tied head** (logits ``= E (gamma_f * n + beta_f)`` with ``E`` the embedding, which is
re-encoded to ``E A^T``): the final norm cannot be folded, and exactness needs
``A^T diag(gamma_f') A = diag(gamma_f)`` (and ``A^T beta_f' = beta_f``). RMSNorm: ``U`` made of
one block per old coordinate ``i`` (a random unit vector over the new coordinates of its
block) gives ``gamma_f' = gamma_f[i] d/d'`` on block ``i``: any width (a fully dense ``U``
when ``gamma_f`` is uniform). LayerNorm: only copies (``d' = k d``) do it, with
``gamma_f`` shared out over the copies (random positive shares under ``stable``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stablemorph.hf.net import Net
from stablemorph.hf.units import normal, rms


class StreamError(ValueError):
    """A hidden size no exact re-encoding reaches for this model and scheme."""


def _isometry(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    q = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64)).Q
    return q


def _complement(a: Tensor, gen: torch.Generator) -> Tensor:
    """An orthonormal basis of ``range(a)^perp`` (``d' x (d' - d)``)."""
    d_new, d = a.shape
    q = torch.linalg.qr(a).Q
    g = torch.randn(d_new, d_new - d, generator=gen, dtype=torch.float64)
    for _ in range(2):
        g = g - q @ (q.T @ g)
    return torch.linalg.qr(g).Q


def _block_isometry(d: int, d_new: int, gen: torch.Generator) -> Tensor:
    """``U`` with one block per old coordinate: block sizes as even as possible, each column
    a random unit vector on its block."""
    sizes = [d_new // d + (1 if i < d_new % d else 0) for i in range(d)]
    cols = []
    for s in sizes:
        v = torch.randn(s, 1, generator=gen, dtype=torch.float64)
        cols.append(v / v.norm())
    return torch.block_diag(*cols)


def check_width(net: Net, d_new: int, scheme: str) -> None:
    """Refuse widths no exact re-encoding reaches (message: why, and the nearest that do)."""
    d = net.d
    multiple = d_new % d == 0
    lo, hi = (d_new // d) * d, (d_new // d + 1) * d
    nearest = f"{hi}" if lo <= d else f"{lo} or {hi}"
    if multiple:
        return
    if scheme == "net2net":
        raise StreamError(
            f"hidden={d_new}: net2net copies each of the {d} stream coordinates equally often, "
            f"which only multiples of {d} allow; nearest: {nearest} (or scheme='stable')")
    if net.norm == "ln" and scheme == "netmorph":
        raise StreamError(
            f"hidden={d_new}: netmorph's zero or copied coordinates keep a LayerNorm's mean "
            f"and variance only at multiples of {d}; nearest: {nearest} (or scheme='stable')")
    if net.norm == "ln" and net.tied:
        raise StreamError(
            f"hidden={d_new}: with a LayerNorm before a head tied to the embedding, the head "
            f"must stay the re-encoded embedding, which only copies (multiples of {d}) allow; "
            f"nearest: {nearest}")


def stream_maps(net: Net, d_new: int, scheme: str, gen: torch.Generator
                ) -> tuple[Tensor, Tensor]:
    """``(A, N)`` for this net and scheme (module docstring)."""
    d = net.d
    k = d_new // d
    dup = torch.arange(d_new) // k if d_new % d == 0 else None
    if net.norm == "ln":
        if scheme == "stable" and not net.tied:
            from stablemorph.transformer.stream import stream_map
            smap = stream_map(d, d_new, gen)
            return smap.A, smap.N
        a = torch.nn.functional.one_hot(dup, d).double()
        return a, _complement(a, gen)
    s = math.sqrt(d_new / d)
    if scheme == "net2net":
        a = torch.nn.functional.one_hot(dup, d).double()
    elif scheme == "netmorph":
        a = torch.cat([torch.eye(d, dtype=torch.float64) * s,
                       torch.zeros(d_new - d, d, dtype=torch.float64)])
    elif net.tied and not _uniform(net.glob["lnf.w"]):
        a = s * _block_isometry(d, d_new, gen)
    else:
        a = s * _isometry(d_new, d, gen)
    return a, _complement(a, gen)


def _uniform(t: Tensor) -> bool:
    return bool((t == t[0]).all())


def grow_hidden(net: Net, d_new: int, scheme: str, gen: torch.Generator,
                out_scale: float) -> None:
    """Re-encode the stream at width ``d_new`` (in place; :func:`check_width` first)."""
    check_width(net, d_new, scheme)
    d = net.d
    gamma_f = net.glob["lnf.w"]
    a, n = stream_maps(net, d_new, scheme, gen)
    k = d_new // d
    first = (torch.arange(d_new) % max(k, 1) == 0)
    for key, dim in net.writers:
        net.glob[key] = _write(net.glob[key], a, dim)
    for blk in net.blocks:
        for key in ("o.w", "o.b", "down.w", "down.b"):
            if key in blk:
                blk[key] = a @ blk[key]
        for ln, readers in (("ln1", ("q", "k", "v")), ("ln2", ("up", "gate"))):
            _fold(blk, ln, readers, a, n, scheme, gen, out_scale, first)
    if net.tied:
        _tied_final(net, a, scheme, gen, k)
    else:
        _fold(net.glob, "lnf", ("head",), a, n, scheme, gen, out_scale, first)
    if scheme == "net2net" or (net.norm == "ln" and (scheme == "netmorph" or net.tied)):
        kind = "copies"
    elif scheme == "netmorph":
        kind = "zero-padded"
    elif net.norm == "ln":
        kind = "mean/variance-preserving map"
    elif net.tied and not _uniform(gamma_f):
        kind = "one random unit vector per coordinate: tied head, non-uniform final norm"
    else:
        kind = "dense isometry"
    norms = "folded into their readers" if scheme == "stable" else "carried over"
    net.notes.append(f"stream re-encoded {d} -> {d_new} ({kind}); norm weights {norms}"
                     + (" (final norm kept: tied head)" if net.tied else ""))
    net.d = d_new


def _write(t: Tensor, a: Tensor, dim: int) -> Tensor:
    moved = t.movedim(dim, -1)
    return (moved @ a.T).movedim(-1, dim)


def _fold(tensors: dict[str, Tensor], ln: str, readers: tuple[str, ...], a: Tensor,
          n: Tensor, scheme: str, gen: torch.Generator, out_scale: float,
          first: Tensor) -> None:
    d_new, d = a.shape
    gamma = tensors[f"{ln}.w"]
    beta = tensors.get(f"{ln}.b")
    ratio = d_new / d
    if scheme == "stable":
        g_rms = rms(gamma)
        gamma_new = torch.full((d_new,), g_rms if g_rms > 0 else 1.0, dtype=torch.float64)
        beta_new = None
        if beta is not None and bool((gamma != 0).all()):
            # W' beta' = W beta exactly: W D diag(gamma') A (beta / gamma) = W beta, and
            # the random reads see nothing (N^T A = 0); reader biases stay
            beta_new = gamma_new * (a @ (beta / gamma))
        elif beta is not None:
            beta_new = a @ beta / math.sqrt(ratio)
        decode = gamma[:, None] * a.T / ratio / gamma_new
    else:
        dup = a.abs().argmax(1)
        if scheme == "netmorph" and (a[d:].abs().sum() == 0):  # RMS: sqrt(k) [I; 0]
            gamma_new = torch.cat([gamma, torch.ones(d_new - d, dtype=torch.float64)])
            beta_new = None
            decode = torch.cat([torch.eye(d, dtype=torch.float64) / math.sqrt(ratio),
                                torch.zeros(d, d_new - d, dtype=torch.float64)], 1)
        else:  # copies: net2net reads 1/k of each copy, netmorph the first copy only
            gamma_new = gamma[dup]
            beta_new = beta[dup] if beta is not None else None
            onehot = torch.nn.functional.one_hot(dup, d).double().T
            decode = onehot / round(ratio) if scheme == "net2net" else onehot * first.double()
    tensors[f"{ln}.w"] = gamma_new
    if beta is not None:
        tensors[f"{ln}.b"] = beta_new
    for r in readers:
        if f"{r}.w" not in tensors:
            continue
        w = tensors[f"{r}.w"]
        w_new = w @ decode
        if scheme != "net2net" and n.shape[1]:
            scale = rms(w) * (out_scale if scheme == "stable" else 1.0)
            w_new = w_new + normal((w.shape[0], n.shape[1]), scale, gen) @ n.T / gamma_new
        if beta is not None and scheme == "stable" and not bool((gamma != 0).all()):
            if f"{r}.b" not in tensors:
                raise StreamError(
                    f"the LayerNorm {ln!r} has weights that are exactly 0 and its reader "
                    f"{r!r} has no bias to absorb the shift of the re-encoded LayerNorm bias; "
                    f"use a multiple of the width with scheme='net2net'")
            tensors[f"{r}.b"] = tensors[f"{r}.b"] + w @ beta - w_new @ beta_new
        tensors[f"{r}.w"] = w_new


def _tied_final(net: Net, a: Tensor, scheme: str, gen: torch.Generator, k: int) -> None:
    """The final norm before a head tied to the (re-encoded) embedding."""
    d_new, d = a.shape
    gamma, beta = net.glob["lnf.w"], net.glob.get("lnf.b")
    if net.norm == "rms" and scheme != "net2net":
        # A^T diag(gamma') A = diag(gamma) with A a (block) isometry times sqrt(d'/d):
        # gamma' = gamma d/d' on each old coordinate's block (netmorph: the old coordinates;
        # the zero new coordinates take 1).
        owner = a.abs().argmax(1)
        gamma_new = gamma[owner] * d / d_new
        if scheme == "netmorph":
            gamma_new[d:] = 1.0
        net.glob["lnf.w"] = gamma_new
        return
    dup = torch.arange(d_new) // k
    if scheme == "net2net":
        shares = torch.full((d_new,), 1.0 / k, dtype=torch.float64)
    elif scheme == "netmorph":
        shares = (torch.arange(d_new) % k == 0).double()
    else:
        w = 0.5 + torch.rand(d, k, generator=gen, dtype=torch.float64)
        shares = (w / w.sum(1, keepdim=True)).reshape(-1)
    net.glob["lnf.w"] = gamma[dup] * shares
    if beta is not None:
        net.glob["lnf.b"] = beta[dup] * shares
