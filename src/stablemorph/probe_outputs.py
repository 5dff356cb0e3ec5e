"""A model's outputs on a probe batch, remembered from the last check that ran it, so that a
chain of morphs (``child = deepen(child, ...)`` layer after layer) runs each model on the
probe once: the child verified by one morph is the next morph's parent, and its outputs are
already known.

An entry is used only when the model is provably the same as when it was recorded: the same
module objects, the same parameter and buffer tensors, each at the same in-place version
(``Tensor._version``, bumped by every in-place write: optimiser steps, ``copy_``, BatchNorm
statistics) and storage, and a probe equal element for element (same shape, dtype, device).
A module attribute changed by hand between two morphs (a conv's stride, a hook) is not seen:
call :func:`forget` after such surgery. Entries die with their model (weak references).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

_Key = tuple[tuple[int, ...], tuple[tuple[int, int, int], ...]]
_STORE: weakref.WeakKeyDictionary[nn.Module, tuple[_Key, tuple[Tensor, ...], dict[str, Any]]] = \
    weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> _Key:
    tensors = [*model.parameters(), *model.buffers()]
    return (tuple(id(m) for m in model.modules()),
            tuple((id(t), t._version, t.data_ptr()) for t in tensors))


def _plain(probe: Sequence[Any]) -> bool:
    """Only positional tensor probes are remembered (keyword inputs are not)."""
    return not getattr(probe, "kwargs", None) and all(isinstance(t, Tensor) for t in probe)


def _same_probe(a: Sequence[Tensor], b: Sequence[Any]) -> bool:
    return _plain(b) and len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)
        for x, y in zip(a, b, strict=True))


def lookup(model: nn.Module, probe: Sequence[Any], mode: str) -> Any | None:
    """What was recorded for ``model`` on ``probe`` in ``mode``, or None."""
    entry = _STORE.get(model)
    if entry is None or mode not in entry[2] or not _same_probe(entry[1], probe):
        return None
    return entry[2][mode] if entry[0] == _fingerprint(model) else None


def record(model: nn.Module, probe: Sequence[Any], outputs: dict[str, Any]) -> None:
    """Remember ``model``'s ``outputs`` (mode -> outputs, as the caller holds them) on
    ``probe``; call it after the model's state was restored (the fingerprint holds tensor
    versions)."""
    if _plain(probe):
        _STORE[model] = (_fingerprint(model), tuple(t.detach().clone() for t in probe),
                         dict(outputs))


def forget(model: nn.Module | None = None) -> None:
    """Drop what is remembered for ``model`` (everything when None)."""
    if model is None:
        _STORE.clear()
    else:
        _STORE.pop(model, None)
