"""Growing the MLP hidden width of transformer blocks, exactly.

``grow_mlp(model, d_mlp)`` gives the chosen blocks ``d_mlp`` hidden units; the new units are
made by :func:`stablemorph.transformer.units.add_units` (copies, zero fan-out, or dense
cancelling groups). GELU acts on each unit separately, so every scheme is exact.
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


def mlp_units(block: int) -> Units:
    p = f"blocks.{block}.mlp"
    return Units(incoming=(f"{p}.fc.weight", f"{p}.fc.bias"), outgoing=(f"{p}.proj.weight",),
                 size=1)


def grow_mlp(
    model: GPT,
    d_mlp: int,
    *,
    blocks: list[int] | None = None,
    scheme: str = "stable",
    seed: int = 0,
    probe: Tensor | None = None,
    tol: float | None = None,
    out_scale: float = DEFAULT_OUT_SCALE,
) -> GPT:
    """A new GPT whose ``blocks`` (default: all) have ``d_mlp`` MLP hidden units and which
    computes the same logits as ``model``.

    ``d_mlp`` must be larger than each chosen block's current width. ``probe``: token ids
    ``(B, T)`` for the self-check (default: a fixed random batch); ``tol``: largest relative
    logit deviation accepted (default 1e-5 in float32/64); ``out_scale`` (``stable`` only):
    rms of the new units' outgoing weights relative to the existing ones' (see
    :mod:`stablemorph.transformer.units`: why 0.1). ``model`` is never modified.
    """
    op = "grow_mlp"
    started = time.perf_counter()
    check_scheme(op, scheme)
    check_parent(op, model)
    check_out_scale(op, out_scale)
    chosen = check_blocks(op, model, blocks)
    specs = list(model.config.blocks)
    for b in chosen:
        if d_mlp <= specs[b].d_mlp:
            raise ValueError(
                f"{op}: d_mlp={d_mlp} is not larger than block {b}'s MLP width {specs[b].d_mlp}"
            )
    gen = torch.Generator().manual_seed(seed)
    params = ChildParams.from_parent(model)
    for b in chosen:
        add_units(params, mlp_units(b), d_mlp, scheme, gen, out_scale=out_scale)
        specs[b] = dataclasses.replace(specs[b], d_mlp=d_mlp)
    config = dataclasses.replace(model.config, blocks=tuple(specs))
    return finish_growth(
        op=op,
        target=",".join(f"blocks.{b}.mlp" for b in chosen),
        scheme=scheme,
        kwargs={"d_mlp": d_mlp, "blocks": chosen, "scheme": scheme, "seed": seed,
                "out_scale": out_scale},
        parent=model,
        config=config,
        params=params,
        probe=probe,
        tol=tol,
        started=started,
    )
