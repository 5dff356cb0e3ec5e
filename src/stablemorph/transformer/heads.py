"""Adding attention heads to transformer blocks, exactly.

Heads keep their size (``head_dim``), so an old head's attention pattern and output are
unchanged; a new head owns ``head_dim`` new rows of ``q``, ``k``, ``v`` (weights and biases)
and ``head_dim`` new columns of the output projection. The new heads are made by
:func:`stablemorph.transformer.units.add_units`: a copied head attends exactly like its
original (``net2net``); a head with zero output columns adds nothing (``netmorph``); heads of
a cancelling group share q, k, v, so they produce identical outputs, which their zero-sum
output columns cancel (``stable``).
"""

from __future__ import annotations

import dataclasses
from typing import Unpack

import torch

from stablemorph.transformer.model import GPT, GPTConfig
from stablemorph.transformer.surgery import (
    ChildParams,
    GrowthOptions,
    Options,
    blocks_target,
    check_blocks,
    run_growth,
)
from stablemorph.transformer.units import Units, add_units


def head_units(block: int, head_dim: int) -> Units:
    p = f"blocks.{block}.attn"
    incoming = tuple(f"{p}.{m}.{t}" for m in ("q", "k", "v") for t in ("weight", "bias"))
    return Units(incoming=incoming, outgoing=(f"{p}.proj.weight",), size=head_dim)


def grow_heads(
    model: GPT,
    n_head: int,
    *,
    blocks: list[int] | None = None,
    **options: Unpack[GrowthOptions],
) -> GPT:
    """A new GPT whose ``blocks`` (default: all) have ``n_head`` attention heads of unchanged
    ``head_dim`` and which computes the same logits as ``model``.

    ``n_head`` must be larger than each chosen block's head count. ``options``:
    :class:`~stablemorph.transformer.surgery.Options`. ``model`` is never modified. As a morph:
    ``sm.apply("grow_heads", model, "blocks.0.attn,blocks.1.attn", n_head=...)``.
    """
    op = "grow_heads"
    opts = Options.check(op, model, options)
    chosen = check_blocks(op, model, blocks, "n_head", n_head, lambda c: f"{c} heads")

    def plan(child: GPT) -> tuple[GPTConfig, ChildParams]:
        gen = torch.Generator().manual_seed(opts.seed)
        params = ChildParams.from_parent(child)
        specs = list(child.config.blocks)
        for b in chosen:
            add_units(params, head_units(b, specs[b].head_dim), n_head, opts.scheme, gen,
                      out_scale=opts.out_scale)
            specs[b] = dataclasses.replace(specs[b], n_head=n_head)
        return dataclasses.replace(child.config, blocks=tuple(specs)), params

    return run_growth(op, model, blocks_target(chosen, "attn"), opts, opts.recipe(n_head=n_head),
                      plan)

