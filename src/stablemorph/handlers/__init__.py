"""Per-layer handlers: what widening knows about each layer type (see
:mod:`stablemorph.handlers.base`), and the registry users extend with
:func:`register_handler`.

Importing this package registers the built-in handlers: Linear, Conv1d/2d/3d (dense, grouped:
refused, depthwise), BatchNorm and its subclasses, LayerNorm, GroupNorm, RMSNorm (torch's and
Hugging Face Llama/Qwen2's), Embedding, PAct, activations, dropout, pooling, identity and
Hugging Face's ``Conv1D``. Functions in a traced forward (``F.layer_norm``, products,
permutes, ...) are handled by the graph analysis (:mod:`stablemorph.graph`).
"""

from stablemorph.handlers import elementwise, layers, norms  # noqa: F401 - registers built-ins
from stablemorph.handlers.base import Channelwise, Dense, Elementwise, Handler, WidenPlan
from stablemorph.handlers.registry import handler_for, is_leaf, lookup, register_handler

__all__ = [
    "Channelwise", "Dense", "Elementwise", "Handler", "WidenPlan", "handler_for", "is_leaf",
    "lookup", "register_handler",
]
