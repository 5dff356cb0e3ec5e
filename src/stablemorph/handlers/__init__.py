"""Per-layer handlers: what widening knows about each layer type (see
:mod:`stablemorph.handlers.base`), and the registry users extend with
:func:`register_handler`.

Importing this package registers the built-in handlers: Linear, Conv1d/2d/3d (dense, grouped:
refused, depthwise), BatchNorm and its subclasses, InstanceNorm, LayerNorm, GroupNorm, RMSNorm
(torch's and Hugging Face Llama/Qwen2's), Embedding, PAct, PReLU, activations, dropout,
pooling, identity and Hugging Face's ``Conv1D``. Functions in a traced forward
(``F.layer_norm``, products, permutes, ...) are handled by the graph analysis
(:mod:`stablemorph.graph`).

**Driving handlers without the graph** (e.g. transformer growths that know their structure):
make a plan with :func:`stablemorph.morphs.widen.plan_widen` (``block=head_dim`` makes new
units come in whole heads: copies of whole heads, or pairs inside a new head), grow the
producers with ``handler_for(m).grow_out(name, m, plan, gen, origins)`` and the readers with
``handler_for(m).grow_in(name, m, Remap.appended(old, new), plan, gen, origins)``; the filled
``origins`` are the :class:`~stablemorph.record.ParamOrigin` entries a morph's ``Surgery``
returns. Attention heads are exact this way: a new head's ``q``/``k`` rows change only its own
softmax, and its ``v`` rows (pairs, or a copied head's) give outputs that ``proj``'s columns
cancel or split. The model's own counts (``n_head``) stay the caller's to update.
"""

from stablemorph.handlers import elementwise, layers, norms  # noqa: F401 - registers built-ins
from stablemorph.handlers.base import Channelwise, Dense, Elementwise, Handler, WidenPlan
from stablemorph.handlers.registry import handler_for, is_leaf, lookup, register_handler

__all__ = [
    "Channelwise", "Dense", "Elementwise", "Handler", "WidenPlan", "handler_for", "is_leaf",
    "lookup", "register_handler",
]
