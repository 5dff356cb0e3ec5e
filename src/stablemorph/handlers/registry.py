"""The handler registry: one :class:`~stablemorph.handlers.base.Handler` per layer type,
looked up along the module's class hierarchy (its MRO), so that a subclass of a registered
type (timm's ``BatchNormAct2d`` of ``nn.BatchNorm2d``) finds its base's handler.

Types from optional packages are registered by their qualified name
(``"transformers.pytorch_utils.Conv1D"``), so that registering them imports nothing.
"""

from __future__ import annotations

from torch import nn

from stablemorph.handlers.base import Handler

_REGISTRY: dict[type | str, Handler] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_handler(layer_type: type[nn.Module] | str, handler: Handler) -> None:
    """Teach widening a layer type: ``handler`` grows modules of ``layer_type`` and of its
    subclasses (unless they have their own).

    Args:
        layer_type: an ``nn.Module`` subclass, or its qualified name
            (``"package.module.Class"``) for a type whose package need not be imported.
        handler: a :class:`~stablemorph.handlers.base.Handler` (e.g. a
            :class:`~stablemorph.handlers.base.Dense` table). A module whose type (or
            nearest registered base, with the same ``forward``) has a handler is one node of
            the traced graph: its forward is not traced into.

    Raises:
        TypeError: ``layer_type`` is not a module type or a dotted name, or ``handler`` is
            not a Handler.
    """
    if isinstance(layer_type, str):
        if "." not in layer_type:
            raise TypeError(f"register_handler: {layer_type!r} is not a qualified class name "
                            f"('package.module.Class')")
    elif not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"register_handler: {layer_type!r} is not an nn.Module subclass")
    if not isinstance(handler, Handler):
        raise TypeError(f"register_handler: {handler!r} is not a stablemorph Handler")
    _REGISTRY[layer_type] = handler


def lookup(m: nn.Module) -> tuple[Handler, type] | None:
    """The handler of ``m`` and the class it was registered for (nearest in the MRO)."""
    for cls in type(m).__mro__:
        handler = _REGISTRY.get(cls) or _REGISTRY.get(_qualname(cls))
        if handler is not None:
            return handler, cls
    return None


def handler_for(m: nn.Module) -> Handler | None:
    """The handler of ``m`` (see :func:`lookup`), or ``None``."""
    found = lookup(m)
    return found[0] if found else None


def is_leaf(m: nn.Module) -> bool:
    """``m`` is analysed as one node: it has a handler and does not override the ``forward``
    of the class that handler was registered for (a subclass that adds an activation to a
    BatchNorm is traced into instead, and its ``F.batch_norm`` call found)."""
    found = lookup(m)
    return found is not None and type(m).forward is found[1].forward  # type: ignore[attr-defined]


__all__ = ["handler_for", "is_leaf", "lookup", "register_handler"]
