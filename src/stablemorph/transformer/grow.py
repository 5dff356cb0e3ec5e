"""Growing a GPT to a target size in one call, as a chain of exact growths.

Order: MLP width, heads, residual width, then depth (each growth's
:class:`~stablemorph.record.MorphRecord` is kept in the child's history, and each is verified
on its own). New blocks are spread evenly: for ``n_layer = 2 L`` one after every block.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Unpack

from stablemorph.morphs.contract import MorphError
from stablemorph.record import history
from stablemorph.transformer.depth import insert_block
from stablemorph.transformer.heads import grow_heads
from stablemorph.transformer.mlp_width import grow_mlp
from stablemorph.transformer.model import GPT
from stablemorph.transformer.stream import grow_d_model
from stablemorph.transformer.surgery import GrowthOptions, Options, as_morph, blocks_of


def _d_model_target(target: str) -> dict[str, Any]:
    if target not in ("", "d_model"):
        raise MorphError(f"grow_d_model: target must be 'd_model' (the residual stream), got "
                         f"{target!r}")
    return {}


def _insert_target(target: str) -> dict[str, Any]:
    match = re.fullmatch(r"blocks\.(\d+)", target)
    if match is None:
        raise MorphError(f"insert_block: target must be 'blocks.<index>' (the new block's "
                         f"index), got {target!r}")
    return {"index": int(match.group(1))}


#: The transformer growths as morphs (entries of :data:`stablemorph.morphs.MORPHS`):
#: ``GROWTHS[op](model, target, **kwargs)``. Targets: ``"blocks.0.mlp,blocks.1.mlp"`` /
#: ``"blocks.0.attn"`` (``"blocks"``: every block), ``"d_model"``, ``"blocks.<index>"``.
GROWTHS: dict[str, Callable[..., GPT]] = {
    "grow_mlp": as_morph("grow_mlp", grow_mlp,
                         lambda t: {"blocks": blocks_of("grow_mlp", t, "mlp")}),
    "grow_heads": as_morph("grow_heads", grow_heads,
                           lambda t: {"blocks": blocks_of("grow_heads", t, "attn")}),
    "grow_d_model": as_morph("grow_d_model", grow_d_model, _d_model_target),
    "insert_block": as_morph("insert_block", insert_block, _insert_target),
}


def insertion_points(n_layer: int, n_new: int) -> list[int]:
    """Child block indices at which to insert ``n_new`` blocks, applied in the order given, so
    that the new blocks follow evenly spaced parent blocks (``n_new = n_layer``: one after
    each)."""
    after = [((r + 1) * n_layer) // n_new - 1 for r in range(n_new)]  # parent block indices
    # Inserting right after parent block j, once r earlier blocks went in before it.
    return [j + 1 + r for r, j in enumerate(sorted(after))]


def grow(
    model: GPT,
    *,
    d_model: int | None = None,
    n_head: int | None = None,
    d_mlp: int | None = None,
    n_layer: int | None = None,
    **options: Unpack[GrowthOptions],
) -> GPT:
    """A new GPT grown to the sizes given (``None``: keep), computing the same logits.

    ``n_head`` and ``d_mlp`` apply to every block; each must be larger than every block's
    current value, ``n_layer`` larger than the current depth. ``options``: those of every
    growth (:class:`~stablemorph.transformer.surgery.Options`); the individual growths are
    seeded ``seed, seed + 1, ...``. ``model`` is never modified.
    """
    Options.check("grow", model, options)
    common = {k: v for k, v in options.items() if k != "seed"}
    seed = options.get("seed", 0)
    child = model
    steps = 0

    def next_seed() -> int:
        nonlocal steps
        steps += 1
        return seed + steps - 1

    if d_mlp is not None:
        child = grow_mlp(child, d_mlp, seed=next_seed(), **common)
    if n_head is not None:
        child = grow_heads(child, n_head, seed=next_seed(), **common)
    if d_model is not None:
        child = grow_d_model(child, d_model, seed=next_seed(), **common)
    if n_layer is not None:
        n = model.config.n_layer
        if n_layer <= n:
            raise MorphError(f"grow: n_layer={n_layer} is not larger than the current {n}")
        for index in insertion_points(n, n_layer - n):
            child = insert_block(child, index, seed=next_seed(), **common)
    if child is model:
        raise MorphError("grow: nothing to grow; give d_model, n_head, d_mlp or n_layer")
    _chain_growth_advice(child, len(history(child)) - len(history(model)))
    return child


def _chain_growth_advice(child: GPT, steps: int) -> None:
    """Make one ``transfer_optimizer`` over the last ``steps`` growths give every parameter the
    chain's SGD multiplier (:mod:`~stablemorph.transformer.sgd_rule`: each growth records
    ``E_before / E_after`` on every parameter, which multiplies along a parameter's sources
    to ``E_model / E_child``). A parameter a later growth creates has no earlier source, so
    its record is multiplied by the growths before it here (their multipliers are the same
    on every parameter; a growth that recorded none counts 1)."""
    carried = 1.0
    for record in history(child)[-steps:]:
        advice = {o.width_advice for o in record.report.param_map.values()}
        for origin in record.report.param_map.values():
            if origin.is_fresh and origin.width_advice is not None:
                origin.width_advice *= carried
        if len(advice) == 1 and None not in advice:
            carried *= advice.pop()
