"""Module hooks across a morph: the child keeps the caller's hooks where their meaning is clear.

A morph replaces a layer by a module that stands for it (same input, same output on every
input). Hooks registered on the parent's modules (forward, forward-pre, full backward and
backward-pre hooks) are carried to the child: the very same hook objects (not the copies
``copy.deepcopy`` makes), with the same flags, on the module that stands for the hooked one:

- the module of the same name, when it still holds the hook (unchanged, or a surgery moved
  the hook dicts there) or when the hooked module was replaced (deepen) or wrapped (the old
  module now lives inside it, e.g. insert_subnet's shortcut: the copy there is removed);
- the module a surgery moved the hook to under another name (a renamed block).

A hook is refused, with its name and the layer's, when its meaning changes: the module is
gone from the child, or the tensors it sees change shape (e.g. the widened layer's output).

Usage in the morph driver: :func:`collect` the parent's hooks, run the surgery on a deep
copy, :func:`carry` them in the child, then :func:`check_shapes`. The hooks that
``torch.nn.utils.weight_norm`` and ``spectral_norm`` install are the layer's own weight
computation, not the caller's: they are left as the deep copy makes them (a morph reads the
layer's effective weight).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

_KINDS = ("forward_pre", "forward", "backward_pre", "backward")


class HookError(ValueError):
    """A hook cannot be carried to the child (the message names the hook and the layer)."""


@dataclass
class Hook:
    """One hook of one module: ``kind`` (forward_pre, forward, backward_pre, backward), the
    callable itself, and its registration flags."""

    layer: str
    kind: str
    key: int
    fn: Callable[..., Any]
    with_kwargs: bool = False
    always_call: bool = False

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", None) or repr(self.fn)


def _dicts(module: nn.Module) -> dict[str, dict[int, Any]]:
    return {"forward_pre": module._forward_pre_hooks, "forward": module._forward_hooks,
            "backward_pre": module._backward_pre_hooks, "backward": module._backward_hooks}


def collect(model: nn.Module) -> list[Hook]:
    """Every hook on ``model``'s modules, in registration order per module and kind."""
    hooks: list[Hook] = []
    for name, module in model.named_modules():
        for kind, table in _dicts(module).items():
            for key, fn in table.items():
                if isinstance(fn, WeightNorm | SpectralNorm):
                    continue
                if kind == "backward" and module._is_full_backward_hook is False:
                    raise HookError(
                        f"layer {name or '<model>'!r}: hook {getattr(fn, '__qualname__', fn)!r} "
                        f"is a non-full backward hook (register_backward_hook, deprecated); "
                        f"its meaning across a morph is undefined: remove it, morph, and "
                        f"register a full backward hook on the child")
                hooks.append(Hook(
                    name, kind, key, fn,
                    with_kwargs=key in (module._forward_pre_hooks_with_kwargs if kind ==
                                        "forward_pre" else module._forward_hooks_with_kwargs
                                        if kind == "forward" else {}),
                    always_call=kind == "forward" and key in module._forward_hooks_always_called,
                ))
    return hooks


def _drop(module: nn.Module, kind: str, key: int) -> None:
    _dicts(module)[kind].pop(key, None)
    module._forward_hooks_with_kwargs.pop(key, None)
    module._forward_pre_hooks_with_kwargs.pop(key, None)
    module._forward_hooks_always_called.pop(key, None)


def _register(module: nn.Module, h: Hook) -> None:
    if h.kind == "forward_pre":
        module.register_forward_pre_hook(h.fn, with_kwargs=h.with_kwargs)
    elif h.kind == "forward":
        module.register_forward_hook(h.fn, with_kwargs=h.with_kwargs, always_call=h.always_call)
    elif h.kind == "backward_pre":
        module.register_full_backward_pre_hook(h.fn)
    else:
        module.register_full_backward_hook(h.fn)


def carry(model: nn.Module, hooks: list[Hook]) -> list[str]:
    """Put ``hooks`` (the caller's objects) on the modules of ``model`` (the child) that stand
    for the hooked ones (module docstring); returns, per hook, the child module's name.

    Raises:
        HookError: a hooked layer is gone from the child, or a hook was copied to several.
    """
    modules = dict(model.named_modules())
    places = []
    for h in hooks:
        holders = [n for n, m in modules.items() if h.key in _dicts(m)[h.kind]]
        inside = [n for n in holders if n.startswith(f"{h.layer}.") and h.layer]
        if h.layer in holders:
            place = h.layer
        elif inside and h.layer in modules:  # the old module was wrapped by its replacement
            for n in inside:
                _drop(modules[n], h.kind, h.key)
            _register(modules[h.layer], h)
            places.append(h.layer)
            continue
        elif len(holders) == 1:  # the surgery moved the hook to a renamed module
            place = holders[0]
        elif holders:
            raise HookError(f"layer {h.layer!r}: {h.kind} hook {h.name!r} was copied to "
                            f"{holders}; remove it, morph, and register it on the child")
        elif h.layer in modules:  # the hooked module was replaced
            _register(modules[h.layer], h)
            places.append(h.layer)
            continue
        else:
            raise HookError(
                f"layer {h.layer!r}: {h.kind} hook {h.name!r} cannot be carried: the morph "
                f"removed the layer; remove the hook, morph, and register it on the child")
        _dicts(modules[place])[h.kind][h.key] = h.fn  # the caller's object, not a copy
        places.append(place)
    return places


def _shapes(value: Any) -> Shapes:
    if isinstance(value, torch.Tensor):
        return [tuple(value.shape)]
    if isinstance(value, dict):
        return [s for k in sorted(value, key=str) for s in _shapes(value[k])]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _shapes(v)]
    return []


Shapes = list[tuple[int, ...]]
Calls = dict[str, list[tuple[Shapes, Shapes]]]


def io_shapes(model: nn.Module, layers: set[str], run: Callable[[nn.Module], Any]) -> Calls:
    """The tensor shapes each of ``layers`` receives and returns while ``run(model)`` runs:
    per call, ``(input shapes, output shapes)``; temporary hooks, removed afterwards."""
    seen: Calls = {name: [] for name in layers}
    handles = []
    modules = dict(model.named_modules())
    for name in layers:
        if name in modules:
            def record(_m: nn.Module, args: Any, kwargs: Any, out: Any, name: str = name
                       ) -> None:
                seen[name].append((_shapes(args) + _shapes(kwargs), _shapes(out)))
            handles.append(modules[name].register_forward_hook(record, with_kwargs=True,
                                                               prepend=True))
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    return seen


def check_shapes(hooks: list[Hook], places: list[str], parent: Calls, child: Calls) -> None:
    """Refuse a hook whose layer sees other tensor shapes in the child (at ``places``, as
    :func:`carry` returns them) than in the parent."""
    for h, place in zip(hooks, places, strict=True):
        if parent.get(h.layer) != child.get(place):
            was, now = parent.get(h.layer), child.get(place)
            raise HookError(
                f"layer {h.layer!r}: {h.kind} hook {h.name!r} cannot be carried: the morph "
                f"changes what the layer sees (input/output shapes {_fmt(was)} in the parent, "
                f"{_fmt(now)} in the child), so the hook's meaning would change; remove it, "
                f"morph, and register a hook meant for the child")


def _fmt(calls: list[tuple[Shapes, Shapes]] | None) -> str:
    if not calls:
        return "never called"
    return f"{calls[0][0]} -> {calls[0][1]}"
