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
import time

import torch
from torch import Tensor

from stablemorph.transformer.model import GPT
from stablemorph.transformer.surgery import (
    ChildParams,
    check_blocks,
    check_out_scale,
    check_parent,
    check_scheme,
    finish_growth,
)
from stablemorph.transformer.units import DEFAULT_OUT_SCALE, Units, add_units


def head_units(block: int, head_dim: int) -> Units:
    p = f"blocks.{block}.attn"
    incoming = tuple(f"{p}.{m}.{t}" for m in ("q", "k", "v") for t in ("weight", "bias"))
    return Units(incoming=incoming, outgoing=(f"{p}.proj.weight",), size=head_dim)


def grow_heads(
    model: GPT,
    n_head: int,
    *,
    blocks: list[int] | None = None,
    scheme: str = "stable",
    seed: int = 0,
    probe: Tensor | None = None,
    tol: float | None = None,
    out_scale: float = DEFAULT_OUT_SCALE,
) -> GPT:
    """A new GPT whose ``blocks`` (default: all) have ``n_head`` attention heads of unchanged
    ``head_dim`` and which computes the same logits as ``model``.

    ``n_head`` must be larger than each chosen block's head count. Other arguments as in
    :func:`stablemorph.transformer.grow_mlp`. ``model`` is never modified.
    """
    op = "grow_heads"
    started = time.perf_counter()
    check_scheme(op, scheme)
    check_parent(op, model)
    check_out_scale(op, out_scale)
    chosen = check_blocks(op, model, blocks)
    specs = list(model.config.blocks)
    for b in chosen:
        if n_head <= specs[b].n_head:
            raise ValueError(
                f"{op}: n_head={n_head} is not larger than block {b}'s {specs[b].n_head} heads"
            )
    gen = torch.Generator().manual_seed(seed)
    params = ChildParams.from_parent(model)
    for b in chosen:
        units = head_units(b, specs[b].head_dim)
        add_units(params, units, n_head, scheme, gen, out_scale=out_scale)
        specs[b] = dataclasses.replace(specs[b], n_head=n_head)
    config = dataclasses.replace(model.config, blocks=tuple(specs))
    return finish_growth(
        op=op,
        target=",".join(f"blocks.{b}.attn" for b in chosen),
        scheme=scheme,
        kwargs={"n_head": n_head, "blocks": chosen, "scheme": scheme, "seed": seed,
                "out_scale": out_scale},
        parent=model,
        config=config,
        params=params,
        probe=probe,
        tol=tol,
        started=started,
    )
