"""The morphs, by name: ``MORPHS[op](model, target, **kwargs) -> child``.

Every morph returns a new model computing the same function and attaches a
:class:`~stablemorph.record.MorphRecord` whose ``op``, ``target`` and ``kwargs`` replay it:
``apply(record.op, base, record.target, **record.kwargs)`` rebuilds the same architecture.
Layer morphs: ``deepen``, ``widen``, ``enlarge_kernel``, ``insert_subnet``; transformer
growths of a :class:`stablemorph.transformer.GPT` (through the same contract):
``grow_mlp``, ``grow_heads``, ``grow_d_model``, ``insert_block``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from stablemorph.morphs.contract import SCHEMES, MorphError
from stablemorph.morphs.deepen import deepen
from stablemorph.morphs.kernel import enlarge_kernel
from stablemorph.morphs.subnet import ResidualBranch, insert_subnet
from stablemorph.morphs.widen import widen


def _growth(op: str) -> Callable[..., nn.Module]:
    """The transformer growth ``op`` (:data:`stablemorph.transformer.grow.GROWTHS`), imported
    on first use (the transformer package builds on this one)."""

    def morph(model: nn.Module, target: str, **kwargs: Any) -> nn.Module:
        from stablemorph.transformer.grow import GROWTHS

        return GROWTHS[op](model, target, **kwargs)

    morph.__name__ = morph.__qualname__ = op
    return morph


MORPHS: dict[str, Callable[..., nn.Module]] = {
    "deepen": deepen,
    "widen": widen,
    "enlarge_kernel": enlarge_kernel,
    "insert_subnet": insert_subnet,
    **{op: _growth(op) for op in ("grow_mlp", "grow_heads", "grow_d_model", "insert_block")},
}


def apply(op: str, model: nn.Module, target: str, **kwargs: Any) -> nn.Module:
    """Run the morph ``op`` (a key of ``MORPHS``) on ``model``'s layer ``target``.

    ``kwargs`` are the morph's keyword arguments, e.g. a record's ``kwargs`` to replay it.
    """
    if op not in MORPHS:
        raise MorphError(f"unknown morph {op!r}; choose one of {sorted(MORPHS)}")
    return MORPHS[op](model, target, **kwargs)


__all__ = [
    "MORPHS",
    "SCHEMES",
    "MorphError",
    "ResidualBranch",
    "apply",
    "deepen",
    "enlarge_kernel",
    "insert_subnet",
    "widen",
]
