"""Growing the MLP hidden width of transformer blocks, exactly: :func:`stablemorph.widen` of
each block's ``mlp.fc``.

``grow_mlp(model, d_mlp)`` widens ``blocks.<b>.mlp.fc`` (and with it ``mlp.proj``'s columns)
to ``d_mlp`` units with the generic widen (copies with split outgoing shares, zero fan-out, or
dense cancelling pairs), then keeps the :class:`GPTConfig` in step. GELU acts on each unit
separately, so every scheme is exact. The one transformer-specific step is ``out_scale``
(``stable``): the new pairs' outgoing columns ``(Z, -Z)`` are scaled by it, which keeps their
cancellation exact (:mod:`stablemorph.transformer.units` says why 0.1).
"""

from __future__ import annotations

import dataclasses
from typing import Unpack

import torch
from torch import Tensor

from stablemorph.morphs.contract import Surgery
from stablemorph.morphs.widen import widen
from stablemorph.record import HISTORY_ATTR, ParamOrigin, last_report
from stablemorph.transformer.model import GPT
from stablemorph.transformer.surgery import (
    GrowthOptions,
    Options,
    blocks_target,
    check_blocks,
    run_morph_on_gpt,
)


def grow_mlp(
    model: GPT,
    d_mlp: int,
    *,
    blocks: list[int] | None = None,
    **options: Unpack[GrowthOptions],
) -> GPT:
    """A new GPT whose ``blocks`` (default: all) have ``d_mlp`` MLP hidden units and which
    computes the same logits as ``model``.

    ``d_mlp`` must be larger than each chosen block's current width. ``options``
    (:class:`~stablemorph.transformer.surgery.Options`): ``scheme``, ``seed``, ``probe``
    (token ids ``(B, T)`` for the self-check), ``tol``, ``out_scale`` (``stable`` only: rms of
    the new units' outgoing weights relative to the existing ones'; see
    :mod:`stablemorph.transformer.units`: why 0.1). ``model`` is never modified. As a morph:
    ``sm.apply("grow_mlp", model, "blocks.0.mlp", d_mlp=...)``.
    """
    op = "grow_mlp"
    opts = Options.check(op, model, options)
    chosen = check_blocks(op, model, blocks, "d_mlp", d_mlp, lambda c: f"MLP width {c}")

    def surgery(child: GPT, _probe: tuple[Tensor, ...]) -> Surgery:
        origins: dict[str, ParamOrigin] = {}
        notes = []
        specs = list(child.config.blocks)
        shape = [2, min(8, child.config.block_size), child.config.d_model]
        for b in chosen:
            # the GPT growth's own rule (out_scale; adaptive_new marked by run_morph), not
            # widen's SGD multiplier, measured on CNN/MLP widen only (stability_research.md)
            block = widen(child.blocks[b], "mlp.fc", d_mlp, scheme=opts.scheme,
                          seed=opts.seed + b, input_shape=shape, tol=opts.tol,
                          step_rule=False)
            report = last_report(block)
            object.__delattr__(block, HISTORY_ATTR)
            if opts.scheme == "stable":
                _scale_fresh_columns(block.mlp.proj.weight, report.param_map["mlp.proj.weight"],
                                     opts.out_scale)
            child.blocks[b] = block
            prefix = f"blocks.{b}."
            for name in report.changed:
                o = report.param_map[name]
                origins[prefix + name] = dataclasses.replace(
                    o, source=None if o.source is None else prefix + o.source)
            notes.append(f"block {b}: {report.summary()}")
            specs[b] = dataclasses.replace(specs[b], d_mlp=d_mlp)
        child.config = dataclasses.replace(child.config, blocks=tuple(specs))
        return Surgery(origins=origins, notes=notes)

    return run_morph_on_gpt(op, model, blocks_target(chosen, "mlp"), opts,
                            opts.recipe(d_mlp=d_mlp), surgery)


@torch.no_grad()
def _scale_fresh_columns(weight: torch.nn.Parameter, origin: ParamOrigin, factor: float) -> None:
    """Scale the columns of units with no parent counterpart (``index < 0``: widen's
    cancelling pairs, whose sum stays exactly zero)."""
    fresh = (origin.index < 0).to(weight.device)
    weight[:, fresh] *= factor
