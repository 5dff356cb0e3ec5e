"""Inserting a transformer block that is exactly the identity.

A pre-LayerNorm block adds ``attn(ln1 x)`` and then ``mlp(ln2 x)`` to the stream; it is the
identity iff both branches add exactly nothing, for every input. The schemes:

- ``net2net``: Net2DeeperNet's identity layer is, for a residual block, a zero branch. The
  copy-style part: the new block copies the LayerNorms, q/k/v and MLP input weights of its
  neighbour (the block before it; block 0 when inserting at the front), as stacking methods
  do (StackBERT, bert2BERT); its two output projections are zero.
- ``netmorph``: fresh LayerNorms, random q/k/v and MLP input weights, zero output projections.
- ``stable``: every new weight dense and non-zero. Heads come in cancelling groups (a group
  shares q, k, v, so its heads output identical values; its output-projection columns sum to
  zero), MLP units likewise (shared fan-in, zero-sum fan-out), so each branch adds exactly
  nothing; the attention output bias ``c`` and MLP output bias ``-c`` cancel too (the MLP
  branch is zero whatever its input, so shifting that input by ``c`` does no harm).
  LayerNorms are copied from the neighbour. Needs at least 2 heads and 2 MLP units. The
  output projections and ``c`` are at ``out_scale`` (default 0.1) times the neighbour's rms
  (:mod:`stablemorph.transformer.units` says why).

Random entries take the rms of the neighbour's corresponding tensor as their scale.
"""

from __future__ import annotations

import dataclasses
from typing import Unpack

import torch

from stablemorph.morphs.contract import MorphError
from stablemorph.record import ParamOrigin
from stablemorph.transformer.heads import head_units
from stablemorph.transformer.model import GPT, INIT_STD, BlockSpec, GPTConfig
from stablemorph.transformer.surgery import (
    ChildParams,
    GrowthOptions,
    Options,
    rms,
    run_growth,
)
from stablemorph.transformer.units import Units, add_units

_LN = ("ln1", "ln2")
_PROJ = ("attn.proj", "mlp.proj")


def insert_block(
    model: GPT,
    index: int,
    **options: Unpack[GrowthOptions],
) -> GPT:
    """A new GPT with an identity block inserted before block ``index`` (``0 <= index <=
    n_layer``; ``n_layer`` appends), shaped like its neighbour, computing the same logits as
    ``model``. Blocks at and after ``index`` move up by one. ``options``:
    :class:`~stablemorph.transformer.surgery.Options`. ``model`` is never modified.
    """
    op = "insert_block"
    opts = Options.check(op, model, options)
    scheme = opts.scheme
    n = model.config.n_layer
    if not isinstance(index, int) or not 0 <= index <= n:
        raise MorphError(f"{op}: unknown block index {index!r}; insert at 0..{n}")
    nb = max(index - 1, 0)
    spec = model.config.blocks[nb] if n else None
    if spec is None:
        raise MorphError(f"{op}: the model has no block to shape the new one after")
    if scheme == "stable" and (spec.n_head < 2 or spec.d_mlp < 2):
        raise MorphError(
            f"{op}: scheme 'stable' needs >= 2 heads and >= 2 MLP units to cancel, block {nb} "
            f"has {spec.n_head} heads and {spec.d_mlp} units"
        )

    def plan(child: GPT) -> tuple[GPTConfig, ChildParams]:
        params = _plan(child, index, nb, spec, scheme, opts.seed, opts.out_scale)
        blocks = list(child.config.blocks)
        blocks.insert(index, spec)
        return dataclasses.replace(child.config, blocks=tuple(blocks)), params

    return run_growth(op, model, f"blocks.{index}", opts, opts.recipe(), plan,
                      rename=lambda name: _shifted(name, index))


def _plan(model: GPT, index: int, nb: int, spec: BlockSpec, scheme: str, seed: int,
          out_scale: float) -> ChildParams:
    """The child's parameters: the parent's, renamed, and the new block's (module
    docstring)."""
    parent = ChildParams.from_parent(model)
    params = ChildParams({}, {}, {})
    for name, value in parent.values.items():
        params.set(_shifted(name, index), value, ParamOrigin(name), name)

    gen = torch.Generator().manual_seed(seed)
    new, old = f"blocks.{index}", f"blocks.{nb}"
    d = model.config.d_model
    inner = spec.n_head * spec.head_dim
    shapes = {
        "attn.q": (inner, d), "attn.k": (inner, d), "attn.v": (inner, d),
        "attn.proj": (d, inner), "mlp.fc": (spec.d_mlp, d), "mlp.proj": (d, spec.d_mlp),
    }
    for ln in _LN:
        for t in ("weight", "bias"):
            src = f"{old}.{ln}.{t}"
            if scheme == "netmorph":
                value = torch.full((d,), 1.0 if t == "weight" else 0.0, dtype=torch.float64)
                params.set(f"{new}.{ln}.{t}", value, ParamOrigin(None), src)
            else:
                params.set(f"{new}.{ln}.{t}", parent.values[src].clone(), ParamOrigin(src), src)
    # Empty (zero-unit) branches: the block starts as the identity, then units are added.
    for m, (rows, cols) in shapes.items():
        w_shape = (0, cols) if m not in _PROJ else (rows, 0)
        params.set(f"{new}.{m}.weight", torch.zeros(w_shape, dtype=torch.float64),
                   ParamOrigin(None), f"{old}.{m}.weight")
        params.set(f"{new}.{m}.bias", torch.zeros(rows if m in _PROJ else 0, dtype=torch.float64),
                   ParamOrigin(None), f"{old}.{m}.bias")

    if scheme == "net2net":
        for m, shape in shapes.items():
            for t in ("weight", "bias"):
                name, src = f"{new}.{m}.{t}", f"{old}.{m}.{t}"
                if m in _PROJ:
                    zeros = torch.zeros(shape if t == "weight" else shape[0], dtype=torch.float64)
                    params.set(name, zeros, ParamOrigin(None), src)
                else:
                    params.set(name, parent.values[src].clone(), ParamOrigin(src), src)
    else:
        std = {
            f"{new}.{m}.{t}": rms(parent.values[f"{old}.{m}.{t}"]) or INIT_STD
            for m in shapes for t in ("weight", "bias")
        }
        add_units(params, head_units(index, spec.head_dim), spec.n_head, scheme, gen, std,
                  out_scale=out_scale)
        add_units(params, mlp_units(index), spec.d_mlp, scheme, gen, std, out_scale=out_scale)
        if scheme == "stable":
            c = torch.randn(d, generator=gen, dtype=torch.float64) * (
                std[f"{new}.attn.proj.bias"] * out_scale)
            for m, sign in zip(_PROJ, (1.0, -1.0), strict=True):
                params.values[f"{new}.{m}.bias"] = sign * c

    params.new.update(n for n in params.values if n.startswith(f"{new}."))
    return params


def mlp_units(block: int) -> Units:
    p = f"blocks.{block}.mlp"
    return Units(incoming=(f"{p}.fc.weight", f"{p}.fc.bias"), outgoing=(f"{p}.proj.weight",),
                 size=1)


def _shifted(name: str, index: int) -> str:
    """Parent parameter or module name -> child name once a block is inserted at
    ``index``."""
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and int(parts[1]) >= index:
        parts[1] = str(int(parts[1]) + 1)
    return ".".join(parts)
