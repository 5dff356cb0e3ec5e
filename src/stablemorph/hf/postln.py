r"""Widening the residual stream of a post-LayerNorm encoder (BERT) exactly.

In a post-LN block the stream *is* a LayerNorm output: ``a = LN1(x + attn(x))``,
``y = LN2(a + mlp(a))``, and the embeddings end in a LayerNorm too. Every sub-layer reads the
stream directly (no norm in front) and every LayerNorm sits on the stream. The child's stream
must be ``x' = A x`` with ``LN'(A z) = A LN(z)`` for every ``z`` (``gamma``, ``beta`` arbitrary):
copies do it, ``A`` = each coordinate repeated ``k = d'/d`` times (mean and variance of
``A z`` are those of ``z``; ``gamma' = gamma`` and ``beta' = beta`` copied), and nothing else
does for a general ``gamma`` (a mixing ``A`` would have to commute with ``diag(gamma)``).
So the hidden size grows to multiples of ``d`` only, under every scheme. Writers (embeddings,
attention and MLP output projections with their biases, the pooler) are copied row-wise;
readers ``W`` become ``W'`` with ``W' A = W``: each old column split over its copies with
shares summing to 1: ``1/k`` (``net2net``), all to the first copy (``netmorph``), random
positive shares per entry (``stable``: dense). The pooler (``tanh(P x_cls + b)``) is a reader
and a writer of copies (``tanh`` acts per coordinate), so its output is re-encoded the same
way and the classifier reads it like the stream.

Depth is refused: a new post-LN layer ends in ``LN2(a + mlp(a))``; being the identity would
need ``LN2(LN1(x) + f) = x`` for every previous LayerNorm output ``x``, which fails for a
general ``gamma``/``beta`` of that LayerNorm (``LN(x) != x``) while the attention branch mixes
tokens and the MLP branch cannot restore the token-dependent scale ``1/std(x)`` that ``LN1``
divides by.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stablemorph.hf.net import Net
from stablemorph.hf.stream import StreamError


def check_width(net: Net, d_new: int) -> None:
    d = net.d
    if d_new % d:
        lo, hi = (d_new // d) * d, (d_new // d + 1) * d
        near = [v for v in (lo, hi) if v > d]
        raise StreamError(
            f"hidden={d_new}: in a post-LayerNorm model the stream is a LayerNorm output, "
            f"which only copies of each coordinate re-encode exactly (multiples of {d}); "
            f"nearest: {near}")


def _shares(rows: int, d: int, k: int, scheme: str, gen: torch.Generator) -> Tensor:
    """``(rows, d * k)``: each old column's share in each of its ``k`` copies."""
    if scheme == "net2net":
        return torch.full((rows, d * k), 1.0 / k, dtype=torch.float64)
    if scheme == "netmorph":
        return (torch.arange(d * k) % k == 0).double().expand(rows, -1).clone()
    w = 0.5 + torch.rand(rows, d, k, generator=gen, dtype=torch.float64)
    return (w / w.sum(2, keepdim=True)).reshape(rows, d * k)


def _read(w: Tensor, k: int, scheme: str, gen: torch.Generator) -> Tensor:
    d = w.shape[1]
    return w.repeat_interleave(k, 1) * _shares(w.shape[0], d, k, scheme, gen)


def grow_hidden_postln(net: Net, d_new: int, scheme: str, gen: torch.Generator) -> None:
    """Copy every stream coordinate ``d_new / d`` times (in place; :func:`check_width`)."""
    check_width(net, d_new)
    k = d_new // net.d

    def copy_rows(t: Tensor) -> Tensor:
        return t.repeat_interleave(k, 0)

    for key, dim in net.writers:  # embeddings
        net.glob[key] = net.glob[key].repeat_interleave(k, dim)
    for key in ("lne.w", "lne.b"):
        net.glob[key] = copy_rows(net.glob[key])
    for blk in net.blocks:
        for key in ("o.w", "o.b", "down.w", "down.b", "ln1.w", "ln1.b", "ln2.w", "ln2.b"):
            blk[key] = copy_rows(blk[key])
        for r in ("q", "k", "v", "up"):
            blk[f"{r}.w"] = _read(blk[f"{r}.w"], k, scheme, gen)
    if "pool.w" in net.glob:
        net.glob["pool.w"] = _read(copy_rows(net.glob["pool.w"]), k, scheme, gen)
        net.glob["pool.b"] = copy_rows(net.glob["pool.b"])
    if "head.w" in net.glob:
        net.glob["head.w"] = _read(net.glob["head.w"], k, scheme, gen)
    net.notes.append(f"post-LN stream copied {k} times ({net.d} -> {d_new})")
    net.d = d_new
