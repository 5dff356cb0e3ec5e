"""A ``torch.fx`` view of a model, used only to *analyse* it: find a layer by name, and find
every module tied to a layer's output channels (its channel group) for widening.

The model itself is never rewritten here; morphs edit a deep copy module by module. Tracing,
and what an fx failure means, live in :mod:`stablemorph.tracing`.

**Modules are asked, functions are handled here.** What a module does with units is its
handler's business (:mod:`stablemorph.handlers`: dense layers produce and read units,
channel-wise layers hold one slice per channel, element-wise layers pass them through); a
module with a handler is one node of the traced graph. Functions in a traced forward are
handled below: element-wise functions, adds, products, concatenations, flatten, views,
permutes, reductions over other dims, and the functional norms (``F.batch_norm``,
``F.layer_norm``, ``F.group_norm``, ``F.rms_norm``) whose parameters belong to a module with
a channel-wise handler (a BatchNorm subclass with a fused activation, ConvNeXt's
channels-first LayerNorm), and bare per-channel parameters that a forward multiplies or adds
(ConvNeXt's layer scale ``gamma * x``).

**Channel labels.** Widening a layer adds output channels, and every module that reads those
channels, directly or through norms, activations, pooling, flatten, permutes, residual adds,
gate products and concatenations, has to grow with it. We find them by running the traced
graph on *labels* instead of numbers: each output channel of a dense layer's node is labelled
``(owner, unit, sub)`` (the producing node, its channel index, and the position inside a
channel after a flatten), element-wise ops pass labels through, ``cat`` concatenates them,
``flatten`` expands them, ``permute`` moves them. An ``add`` or a product ties its operands
channel by channel: a producer whose channels are added to (or gate) the group's joins the
group, and the propagation is repeated until the group is closed. The same propagation with
the group's new width gives the child's channel layout at every module, hence for every
child channel the parent channel it comes from, or the new unit it carries.

**Zeros.** Each node also carries whether the group's channels are 0 there when new units get
zero incoming weights (NetMorph's cheaper side): true after the producers, kept by
element-wise functions with ``f(0) = 0``, by products with one zero factor, lost by sigmoid
or by adding a non-zero constant; ``zero_preserving`` holds when every consumer sees 0.
"""

from __future__ import annotations

import difflib
import inspect
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from stablemorph.tracing import (
    GraphError,
    MorphTracer,
    handlers_module,
    opaque_note,
    trace,
    trace_graph,
)
from stablemorph.verify import preserved_state

GROUP = -1  # owner id of the channels of the group being widened

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Functions and methods that act on each element (value: f(0) == 0).
_ELEMENTWISE_FUNCTIONS: dict[object, bool] = {
    torch.relu: True, F.relu: True, torch.tanh: True, F.tanh: True, torch.sigmoid: False,
    F.sigmoid: False, F.gelu: True, F.silu: True, F.leaky_relu: True, F.elu: True,
    F.relu6: True, F.hardtanh: True, F.dropout: True, F.mish: True, operator.neg: True,
    torch.neg: True, F.max_pool1d: True, F.max_pool2d: True, F.max_pool3d: True,
    F.avg_pool1d: True, F.avg_pool2d: True, F.avg_pool3d: True, F.adaptive_avg_pool1d: True,
    F.adaptive_avg_pool2d: True, F.adaptive_avg_pool3d: True, F.adaptive_max_pool1d: True,
    F.adaptive_max_pool2d: True, F.hardswish: True, F.softplus: False, torch.exp: False,
    F.hardsigmoid: False, torch.erf: True, torch.square: True, torch.abs: True,
}
_ELEMENTWISE_METHODS = {
    "relu": True, "tanh": True, "sigmoid": False, "contiguous": True, "clone": True,
    "neg": True, "detach": True, "to": True, "float": True, "type_as": True, "abs": True,
    "square": True, "exp": False,
}
_POWERS = {torch.pow, operator.pow}
_ADDS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_PRODUCTS = {operator.mul, operator.imul, torch.mul}
_QUOTIENTS = {operator.truediv, operator.itruediv, torch.div}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}
_CATS = {torch.cat, torch.concat}
_ACCESSORS = {"size", "dim", "numel"}
_VIEWS = {"view", "reshape", "squeeze", "unsqueeze"}
# functional norms: the (position, name) of the arguments that may hold a module's weight or
# statistics, and the dim their channels must be on (1: channels-first, -1: last)
_NORM_FUNCTIONS: dict[object, tuple[tuple[tuple[int, str], ...], int]] = {
    F.batch_norm: (((3, "weight"), (1, "running_mean"), (4, "bias"), (2, "running_var")), 1),
    F.layer_norm: (((2, "weight"), (3, "bias")), -1),
    F.group_norm: (((2, "weight"), (3, "bias")), 1),
    F.rms_norm: (((2, "weight"),), -1),
}


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` (dotted, as in ``named_modules``), or a GraphError that
    suggests close names."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise GraphError(f"{type(model).__name__} has no layer named {name!r}{hint}")


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` of ``model`` by ``module`` (same name, same place)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def role_of(m: nn.Module | None) -> str | None:
    """The role of ``m``'s handler (``"dense"``, ``"channelwise"``, ``"elementwise"``), or
    ``None`` when no handler knows its type."""
    h = handlers_module().handler_for(m) if m is not None else None
    return h.role(m) if h is not None else None


def is_depthwise(m: nn.Module) -> bool:
    """A conv that maps each input channel to exactly one output channel of its own."""
    return isinstance(m, CONV) and role_of(m) == "channelwise"


def is_dense(m: nn.Module | None) -> bool:
    """A layer with output units of its own that widening can grow (Conv/Linear with
    ``groups == 1``, Embedding, HF Conv1D, a user's registered layer)."""
    h = handlers_module().handler_for(m) if m is not None else None
    return (h is not None and h.role(m) == "dense" and h.out_units(m) is not None
            and h.refusal(m, "out") is None)


# ----------------------------------------------------------------------------------------------
# channel labels


@dataclass
class Labels:
    """Labels of the channels of one tensor: the channels lie on dim ``dim``; position ``k``
    holds channel ``unit[k]`` of node ``owner[k]`` (``GROUP`` for the group), at flattened
    sub-position ``sub[k]``."""

    dim: int
    owner: Tensor
    unit: Tensor
    sub: Tensor

    @staticmethod
    def fresh(owner: int, channels: int, dim: int) -> Labels:
        zeros = torch.zeros(channels, dtype=torch.long)
        return Labels(dim, zeros + owner, torch.arange(channels), zeros)

    def __len__(self) -> int:
        return self.owner.numel()

    @property
    def in_group(self) -> Tensor:
        return self.owner == GROUP

    def has_group(self) -> bool:
        return bool(self.in_group.any())

    def same_as(self, other: Labels) -> bool:
        return (self.dim == other.dim and len(self) == len(other)
                and bool((self.owner == other.owner).all() and (self.unit == other.unit).all()
                         and (self.sub == other.sub).all()))


@dataclass
class ChannelUse:
    """One module that reads the group's channels: ``kind`` is ``"consumer"`` (a dense layer
    reading them as inputs: its handler's ``grow_in``) or ``"channelwise"`` (norms,
    per-channel PAct, depthwise conv: one parameter slice per channel, its handler's
    ``grow_channels``) or ``"parameter"`` (a bare per-channel parameter that a traced forward
    multiplies or adds, e.g. ConvNeXt's layer scale ``gamma * x``: ``module`` is the
    parameter's name, ``labels.dim`` the parameter's channel dim, ``default`` the value of a
    new unit with nothing to copy). ``labels`` describe its input."""

    module: str
    kind: str
    labels: Labels
    default: float = 0.0  # "parameter" uses: the value of a new unit with nothing to copy


@dataclass
class Remap:
    """Where each channel of a module's child input comes from.

    ``parent[k]``: the parent position of child position ``k`` (``-1`` for a new unit);
    ``unit[k]``: the group unit at ``k`` (``-1`` for channels outside the group; ``>= C`` for
    a new unit); ``sub[k]``: its flattened sub-position; ``table[u, s]``: the parent position
    of old group unit ``u`` at sub-position ``s``.
    """

    parent: Tensor
    unit: Tensor
    sub: Tensor
    table: Tensor

    @staticmethod
    def appended(channels: int, new: int) -> Remap:
        """The layout of a layer reading the group directly: the ``channels`` old units in
        order, then the ``new`` ones (for driving handlers without the graph analysis)."""
        width = channels + new
        parent = torch.cat([torch.arange(channels), torch.full((new,), -1)])
        return Remap(parent, torch.arange(width), torch.zeros(width, dtype=torch.long),
                     torch.arange(channels).unsqueeze(1))

    def source_position(self, units: Tensor) -> Tensor:
        """Parent positions holding old group units ``units`` (one per child position) at
        each child position's sub-position."""
        return self.table[units, self.sub]


@dataclass
class _Pass:
    labels: dict[fx.Node, Labels | None] = field(default_factory=dict)
    ties: list[tuple[fx.Node, list[tuple[fx.Node, Labels | None]]]] = field(default_factory=list)
    uses: list[tuple[fx.Node, ChannelUse]] = field(default_factory=list)
    # per node: the group's channels are 0 there when new units get zero incoming weights
    zero: dict[fx.Node, bool] = field(default_factory=dict)
    zero_preserving: bool = True
    blocks: list[int] = field(default_factory=list)  # norm_block of every norm on the way


class _Propagation:
    """One run of the labels through the graph, for a given group and width."""

    def __init__(self, gm: fx.GraphModule, root: nn.Module, group: set[str],
                 width: int | None) -> None:
        self.gm = gm
        # the model's own modules: the GraphModule holds only those it calls (a module whose
        # parameters a traced forward reads with get_attr is an empty stand-in there)
        self.modules = dict(root.named_modules())
        self.group = group
        self.width = width
        self.ids = {node: k for k, node in enumerate(gm.graph.nodes)}
        self.out = _Pass()
        self.zero = True  # the current node's zero flag (see _Pass.zero)

    def run(self) -> _Pass:
        for node in self.gm.graph.nodes:
            first = node.args[0] if node.args else None
            self.zero = self._z(first)
            self.out.labels[node] = self._node(node)
            self.out.zero[node] = self.zero
        return self.out

    # -- helpers --------------------------------------------------------------------------

    def _get(self, arg: object) -> Labels | None:
        return self.out.labels.get(arg) if isinstance(arg, fx.Node) else None

    def _z(self, arg: object) -> bool:
        return self.out.zero.get(arg, True) if isinstance(arg, fx.Node) else True

    @staticmethod
    def _shape(node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def _ndim(self, node: fx.Node) -> int:
        shape = self._shape(node)
        if shape is None:
            raise GraphError(f"no shape recorded for node {node.name!r}")
        return len(shape)

    def _unsupported(self, node: fx.Node, what: str) -> GraphError:
        return GraphError(
            f"the widened channels reach {what} at node {node.name!r}, which widening does not "
            f"support"
        )

    def _group_inputs(self, node: fx.Node) -> bool:
        found = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(self._get(a)))
        return any(lab is not None and lab.has_group() for lab in found)

    def _check_dim(self, node: fx.Node, labels: Labels, want: int, what: str) -> None:
        if labels.dim != want:
            raise GraphError(
                f"the widened channels reach {what} {node.target!r} on dim {labels.dim}, but it "
                f"reads channels on dim {want}"
            )

    def _use(self, node: fx.Node, name: str, kind: str, x: Labels) -> None:
        self.out.uses.append((node, ChannelUse(name, kind, x)))
        if kind == "consumer":
            self.out.zero_preserving &= self.zero

    # -- node kinds -----------------------------------------------------------------------

    def _node(self, node: fx.Node) -> Labels | None:
        if node.op == "call_module":
            return self._module(node)
        if node.op in ("call_function", "call_method"):
            return self._function(node)
        if node.op == "output":
            if self._group_inputs(node):
                raise GraphError(
                    "the widened channels reach the model output: widening would change the "
                    "output shape"
                )
        return None

    def _module(self, node: fx.Node) -> Labels | None:
        m = self.modules[node.target]
        name = str(node.target)
        x = self._get(node.args[0]) if node.args else None
        if x is not None and isinstance(m, nn.Flatten):
            return self._flatten(node, x, m.start_dim, m.end_dim)
        h = handlers_module().handler_for(m)
        role = h.role(m) if h is not None else None
        grouped = x is not None and x.has_group()
        if h is None or (role != "dense" and not grouped):
            if grouped:
                raise self._unsupported(node, f"module {name!r} ({type(m).__name__}), which "
                                              f"has no handler (see sm.register_handler)"
                                              f"{opaque_note(self.gm, name)}")
            return x if role is not None else None
        if role == "dense":
            return self._dense(node, name, m, h, x)
        dim = h.unit_dim(m, self._ndim(node))
        if role == "channelwise":
            why = h.refusal(m, "in")
            if why is not None:
                raise GraphError(f"{name!r}: {why}")
            self._check_dim(node, x, dim, type(m).__name__)  # type: ignore[arg-type]
            self._use(node, name, "channelwise", x)  # type: ignore[arg-type]
            block = h.norm_block(m)
            if block is not None:
                self.out.blocks.append(block)
        self.zero = self.zero and h.maps_zero(m)
        return x

    def _dense(self, node: fx.Node, name: str, m: nn.Module, h: object,
               x: Labels | None) -> Labels:
        ndim = self._ndim(node)
        if x is not None and x.has_group():
            why = h.refusal(m, "in")  # type: ignore[attr-defined]
            if why is not None:
                raise GraphError(f"the widened channels feed {name!r}, {why}")
            if h.in_units(m) is None:  # type: ignore[attr-defined]
                raise self._unsupported(node, f"{name!r} ({type(m).__name__}), which reads no "
                                              f"units")
            self._check_dim(node, x, h.unit_dim(m, len(self._shape(node.args[0]))),  # type: ignore
                            "layer")
            self._use(node, name, "consumer", x)
        dim = h.unit_dim(m, ndim)  # type: ignore[attr-defined]
        self.zero = True
        if name in self.group:
            return Labels.fresh(GROUP, self.width or h.out_units(m), dim)  # type: ignore
        return Labels.fresh(self.ids[node], h.out_units(m), dim)  # type: ignore

    def _function(self, node: fx.Node) -> Labels | None:
        target = node.target
        first = node.args[0] if node.args else None
        x = self._get(first)
        method = node.op == "call_method"
        if target in _ADDS or (method and target in ("add", "sub", "add_", "sub_")):
            return self._add(node)
        if target in _PRODUCTS or (method and target in ("mul", "mul_")):
            return self._product(node)
        if target in _CATS:
            return self._cat(node)
        if target is getattr or (method and target in _ACCESSORS):
            return None  # x.shape, x.size(0), ...: no tensor
        if target in _NORM_FUNCTIONS:
            return self._norm_function(node, x)
        if target in ("permute", "transpose") or target in (torch.permute, torch.transpose):
            return self._permute(node, x)
        group = self._group_inputs(node)
        if not group:
            # Outside the group only the channel labels of plain pass-through ops matter.
            if x is not None and (target in _ELEMENTWISE_FUNCTIONS or target in _QUOTIENTS
                                  or target in _ELEMENTWISE_METHODS or target in _POWERS
                                  or (method and target in ("div", "pow"))):
                return x
            return self._reshape_or_none(node, x)
        if node.op == "call_function" and target in _ELEMENTWISE_FUNCTIONS:
            self.zero = self.zero and _ELEMENTWISE_FUNCTIONS[target]
            return x
        if method and target in _ELEMENTWISE_METHODS:
            self.zero = self.zero and _ELEMENTWISE_METHODS[target]
            return x
        if target in _POWERS or (method and target == "pow"):
            exponent = node.args[1] if len(node.args) > 1 else None
            if x is not None and isinstance(exponent, int | float):
                self.zero = self.zero and exponent > 0
                return x
            raise self._unsupported(node, "a power with a tensor exponent")
        if target in _QUOTIENTS or (method and target == "div"):
            if x is not None and not self._group_operand(node.args[1:]):
                return self._broadcast(node, x, node.args[1:])
            raise self._unsupported(node, "a division by the widened channels")
        if target is torch.flatten or (method and target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, x, start, end)
        if (method and target in _VIEWS) or target in (torch.reshape, torch.squeeze,
                                                        torch.unsqueeze):
            return self._view(node, x)
        if (method and target in _REDUCTIONS) or target in (torch.mean, torch.sum):
            return self._reduce(node, x)
        raise self._unsupported(node, f"{node.op} {getattr(target, '__name__', target)!r}")

    def _group_operand(self, args: Sequence[object]) -> bool:
        return any((lab := self._get(a)) is not None and lab.has_group() for a in args)

    def _broadcast(self, node: fx.Node, x: Labels, others: Sequence[object],
                   default: float | None = None, what: str = "a product or quotient"
                   ) -> Labels:
        """``x`` times or over tensors that carry no channels: each must be constant along
        ``x``'s channel dim (a scalar, a per-sample factor, a mask of size 1 there), or be a
        per-channel parameter (a ``"parameter"`` use when ``default`` is given)."""
        ndim = self._ndim(node)
        for other in others:
            shape = self._shape(other) if isinstance(other, fx.Node) else None
            if shape is None:
                continue
            k = x.dim - (ndim - len(shape))
            if 0 <= k < len(shape) and shape[k] != 1:
                if default is not None and self._parameter_use(other, x, k, default):
                    continue
                raise self._unsupported(node, f"{what} with {other.name!r} (shape {shape}), "
                                              f"which comes from no layer whose units "
                                              f"widening can grow")
        return x

    def _parameter_use(self, other: object, x: Labels, k: int, default: float) -> bool:
        """Record ``other`` as a ``"parameter"`` use if it is a model parameter holding one
        value per channel of ``x`` on its dim ``k`` (size 1 elsewhere)."""
        if not (isinstance(other, fx.Node) and other.op == "get_attr" and x.has_group()):
            return False
        shape = self._shape(other)  # the parent's: the child pass has more channels
        size = len(x) if self.width is None else shape[k] if shape else -1
        if shape is None or shape[k] != size or math.prod(shape) != size or \
                bool(x.sub.any()):
            return False
        self._use(other, str(other.target), "parameter", Labels(k, x.owner, x.unit, x.sub))
        self.out.uses[-1][1].default = default
        return True

    def _product(self, node: fx.Node) -> Labels | None:
        """A product ties its operands like an add (a gate's units grow with the gated ones:
        squeeze-excite, SwiGLU); a factor without channels must broadcast over them."""
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)
                    and self._shape(a) is not None]
        labelled = [(a, self._get(a)) for a in operands if self._get(a) is not None]
        bare = [a for a in operands if self._get(a) is None]
        if not any(lab.has_group() for _, lab in labelled):  # type: ignore[union-attr]
            return labelled[0][1] if labelled else None
        self.zero = any(self._z(a) for a, lab in labelled
                        if lab.has_group())  # type: ignore[union-attr]
        if len(labelled) == 2:
            (_, la), (_, lb) = labelled
            if not la.same_as(lb):  # type: ignore[union-attr]
                self.out.ties.append((node, labelled))
        out = next(lab for _, lab in labelled if lab.has_group())  # type: ignore[union-attr]
        return self._broadcast(node, out, bare, default=1.0)  # type: ignore[arg-type]

    def _norm_function(self, node: fx.Node, x: Labels | None) -> Labels | None:
        """``F.batch_norm`` / ``F.layer_norm`` / ``F.group_norm`` / ``F.rms_norm`` called
        inside a traced forward (a BatchNorm subclass with a fused activation, a
        channels-first LayerNorm): the module owning its weight is grown by its handler."""
        if x is None or not x.has_group():
            return x
        positions, dim = _NORM_FUNCTIONS[node.target]
        owner = None
        for k, key in positions:
            arg = node.args[k] if len(node.args) > k else node.kwargs.get(key)
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                owner = str(arg.target).rpartition(".")[0]
                break
        name = getattr(node.target, "__name__", str(node.target))
        if owner is None:
            raise self._unsupported(node, f"{name} without a module's parameters or statistics")
        m = self.modules.get(owner)
        h = handlers_module().handler_for(m) if m is not None else None
        if h is None or h.role(m) != "channelwise":
            raise self._unsupported(node, f"{name} with the parameters of {owner!r}, which has no "
                                          f"channel-wise handler")
        why = h.refusal(m, "in")
        if why is not None:
            raise GraphError(f"{owner!r}: {why}")
        self._check_dim(node, x, dim % self._ndim(node), name)
        self._use(node, owner, "channelwise", x)
        block = h.norm_block(m)
        if block is not None:
            self.out.blocks.append(block)
        self.zero = self.zero and h.maps_zero(m)
        return x

    def _permute(self, node: fx.Node, x: Labels | None) -> Labels | None:
        if x is None:
            return None
        ndim = self._ndim(node)
        args = [a for a in node.args[1:]]
        if node.target in ("transpose", torch.transpose):
            d0, d1 = (int(a) % ndim for a in args[:2])
            perm = list(range(ndim))
            perm[d0], perm[d1] = d1, d0
        else:
            dims = args[0] if len(args) == 1 and isinstance(args[0], list | tuple) else args
            dims = dims or node.kwargs.get("dims", ())
            perm = [int(d) % ndim for d in dims]
        return Labels(perm.index(x.dim), x.owner, x.unit, x.sub)

    def _reshape_or_none(self, node: fx.Node, x: Labels | None) -> Labels | None:
        if x is None:
            return None
        target = node.target
        if target is torch.flatten or (node.op == "call_method" and target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, x, start, end)
        if (node.op == "call_method" and target in _VIEWS) or target in (
                torch.reshape, torch.squeeze, torch.unsqueeze):
            try:
                return self._view(node, x)
            except GraphError:
                return None
        return None

    def _add(self, node: fx.Node) -> Labels | None:
        operands: list[tuple[fx.Node, Labels | None]] = [
            (a, self._get(a)) for a in node.args[:2] if isinstance(a, fx.Node)
            and self._shape(a) is not None
        ]
        if len(operands) < 2:  # tensor + scalar
            scalar = [a for a in node.args[:2] if not isinstance(a, fx.Node)]
            self.zero = bool(operands) and self._z(operands[0][0]) and scalar == [0]
            return operands[0][1] if operands else None
        self.zero = all(self._z(a) for a, _ in operands)
        group = [lab for _, lab in operands if lab is not None and lab.has_group()]
        bare = [a for a, lab in operands if lab is None]
        if group and bare and all(a.op == "get_attr" for a in bare):  # x + per-channel bias
            return self._broadcast(node, group[0], bare, default=0.0, what="a sum")
        self.out.ties.append((node, operands))
        # The result carries the group's labels where an operand does.
        labelled = [lab for _, lab in operands if lab is not None]
        for lab in labelled:
            if lab.has_group():
                return lab
        return labelled[0] if labelled else None

    def _cat(self, node: fx.Node) -> Labels | None:
        tensors = list(node.args[0]) if node.args else list(node.kwargs.get("tensors", []))
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        ndim = self._ndim(node)
        dim %= ndim
        labs = [self._get(t) for t in tensors]
        if not any(lab is not None for lab in labs):
            return None
        if any(lab is not None and lab.dim == dim for lab in labs):
            parts = []
            for t, lab in zip(tensors, labs, strict=True):
                if lab is None or lab.dim != dim:
                    if lab is not None and lab.has_group():
                        raise self._unsupported(node, "a concatenation along a non-channel dim")
                    size = self._shape(t)[dim]  # type: ignore[index]
                    lab = Labels.fresh(self.ids[t], size, dim)
                parts.append(lab)
            return Labels(dim, torch.cat([p.owner for p in parts]),
                          torch.cat([p.unit for p in parts]), torch.cat([p.sub for p in parts]))
        first = labs[0]
        if first is not None and all(lab is not None and first.same_as(lab) for lab in labs):
            return first
        if any(lab is not None and lab.has_group() for lab in labs):
            raise self._unsupported(node, "a concatenation along a non-channel dim")
        return None

    def _flatten(self, node: fx.Node, x: Labels | None, start: int, end: int) -> Labels | None:
        if x is None:
            return None
        in_shape = list(self._shape(node.args[0]))  # type: ignore[arg-type]
        ndim = len(in_shape)
        start, end = start % ndim, end % ndim
        if x.dim < start:
            return x
        if x.dim > end:
            return Labels(x.dim - (end - start), x.owner, x.unit, x.sub)
        in_shape[x.dim] = len(x)
        sizes = in_shape[start:end + 1]
        pos = x.dim - start
        grid = torch.arange(math.prod(sizes)).reshape(sizes)
        chan = grid.div(math.prod(sizes[pos + 1:]), rounding_mode="floor") % sizes[pos]
        others = math.prod(sizes) // sizes[pos]
        rest = torch.arange(others).reshape([s for k, s in enumerate(sizes) if k != pos])
        rest = rest.unsqueeze(pos).expand(sizes)
        chan, rest = chan.flatten(), rest.flatten()
        return Labels(start, x.owner[chan], x.unit[chan], x.sub[chan] * others + rest)

    def _view(self, node: fx.Node, x: Labels | None) -> Labels | None:
        """``view``/``reshape``/``squeeze``/``unsqueeze`` that flatten ``(N, C, ...)`` to
        ``(N, -1)`` or only add or drop dims of size 1."""
        in_shape = self._shape(node.args[0])  # type: ignore[arg-type]
        out_shape = self._shape(node)
        if x is None:
            return None
        if in_shape is not None and out_shape is not None:
            if len(out_shape) == 2 and out_shape[0] == in_shape[0] and \
                    out_shape[1] == math.prod(in_shape[1:]) and len(in_shape) > 2:
                return self._flatten(node, x, 1, -1)
            keep_in = [k for k, n in enumerate(in_shape) if n != 1]
            keep_out = [k for k, n in enumerate(out_shape) if n != 1]
            if [in_shape[k] for k in keep_in] == [out_shape[k] for k in keep_out] and \
                    x.dim in keep_in:
                return Labels(keep_out[keep_in.index(x.dim)], x.owner, x.unit, x.sub)
        raise self._unsupported(node, f"a reshape {in_shape} -> {out_shape} (only (N, -1) and "
                                      f"adding or dropping dims of size 1 are)")

    def _reduce(self, node: fx.Node, x: Labels | None) -> Labels | None:
        if x is None:
            return None
        ndim = len(self._shape(node.args[0]))  # type: ignore[arg-type]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if dims is None:
            raise self._unsupported(node, "a reduction over all dims")
        dims = {d % ndim for d in ([dims] if isinstance(dims, int) else dims)}
        if x.dim in dims:
            raise self._unsupported(node, "a reduction over the channels")
        return x if keep else Labels(x.dim - sum(d < x.dim for d in dims), x.owner, x.unit,
                                     x.sub)


# ----------------------------------------------------------------------------------------------
# the channel group


@dataclass
class ChannelGroup:
    """Every module tied to the output channels of ``target`` (see module docstring).

    ``producers``: the dense layers whose outputs are added to, or multiplied with, the
    target's (the target first; a gate grows with what it gates), all with ``channels``
    outputs; ``uses``: the modules that read the group's channels; ``zero_preserving``: a new
    unit with zero incoming weights stays 0 up to every consumer; ``block``: ``None`` when
    each channel is normalised alone (or not at all), ``0`` when a norm (LayerNorm, RMSNorm)
    sees all of them (every unit must be replicated equally), else the size of the groups
    new units must come in (GroupNorm).
    """

    target: str
    producers: list[str]
    channels: int
    uses: list[ChannelUse]
    zero_preserving: bool
    block: int | None
    graph: fx.GraphModule
    root: nn.Module

    @property
    def normalised(self) -> bool:
        """A norm over all the group's channels: only replication keeps the function."""
        return self.block == 0

    def remaps(self, width: int) -> dict[str, Remap]:
        """For each module in ``uses``: where each of its child input channels comes from when
        the group is widened to ``width``."""
        child = _Propagation(self.graph, self.root, set(self.producers), width).run()
        child_labels = {use.module: use.labels for _, use in child.uses}
        out = {}
        for use in self.uses:
            out[use.module] = _remap(use.labels, child_labels[use.module], self.channels)
        return out


def input_count(model: nn.Module, inputs: Sequence[Any]) -> int:
    """How many leading parameters of ``model.forward`` the probe ``inputs`` fills: its
    positional inputs, and up to the last of its keyword inputs (``inputs.kwargs`` of a
    :class:`~stablemorph.verify.Probe`; the parameters between keep their defaults)."""
    kwargs = getattr(inputs, "kwargs", None) or {}
    names = list(inspect.signature(inspect.unwrap(model.forward)).parameters)
    return max([len(inputs)] + [names.index(k) + 1 for k in kwargs if k in names])


def graph_inputs(gm: fx.GraphModule, inputs: Sequence[Any]) -> list[Any]:
    """The probe as the graph's positional inputs, one per placeholder: the positional inputs,
    then keyword inputs by name (a :class:`~stablemorph.verify.Probe`'s ``kwargs``), then the
    placeholders' defaults.

    Raises:
        GraphError: a keyword the forward does not take, or a parameter without a default
            that the probe does not give."""
    kwargs = dict(getattr(inputs, "kwargs", None) or {})
    values = list(inputs)
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in places[len(values):]:
        name = str(node.target).lstrip("*")
        if name in kwargs:
            values.append(kwargs.pop(name))
        elif node.args:
            values.append(node.args[0])
        else:
            raise GraphError(f"the probe gives no value for the forward's parameter {name!r}")
    if kwargs:
        raise GraphError(f"the probe's keyword inputs {sorted(kwargs)} are not parameters of "
                         f"the traced forward ({[str(n.target) for n in places]})")
    return values


def input_unit_dim(model: nn.Module, target: str, inputs: Sequence[Tensor]) -> int | None:
    """The dim holding the units (features, channels) of the first input that module
    ``target`` receives, as the nearest layer upstream lays them out (``-1``-style dims are
    returned non-negative); ``None`` when the model cannot be traced or no layer with a
    handler produces that input.

    A ``(batch, tokens, features)`` tensor after a Linear has its units on dim 2; a
    ``(batch, channels, length)`` tensor after a Conv1d on dim 1.
    """
    try:
        gm = trace(model, input_count(model, inputs), whole=(target,))
        with preserved_state(gm), torch.no_grad():
            ShapeProp(gm).propagate(*graph_inputs(gm, inputs))
        result = _Propagation(gm, model, set(), None).run()
    except Exception:  # untraceable or unanalysable: the caller falls back
        return None
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == target and node.args:
            labels = result.labels.get(node.args[0])  # type: ignore[arg-type]
            return labels.dim if labels is not None else None
    return None


def _keys(labels: Labels, n_sub: int) -> list[int]:
    return (labels.owner * (1 << 40) + labels.unit * n_sub + labels.sub).tolist()


def _remap(parent: Labels, child: Labels, channels: int) -> Remap:
    """Match child positions to parent positions by label (owner, unit, sub)."""
    n_sub = int(torch.cat([parent.sub, child.sub]).max()) + 1
    key_p = _keys(parent, n_sub)
    where = {k: i for i, k in enumerate(key_p)}
    key_c = _keys(child, n_sub)
    new = child.in_group & (child.unit >= channels)
    parent_pos = torch.tensor([-1 if n else where[k] for k, n in zip(key_c, new.tolist(),
                                                                      strict=True)],
                              dtype=torch.long)
    table = torch.full((channels, n_sub), -1, dtype=torch.long)
    g = parent.in_group.nonzero().flatten()
    table[parent.unit[g], parent.sub[g]] = g
    unit = torch.where(child.in_group, child.unit, torch.full_like(child.unit, -1))
    return Remap(parent_pos, unit, child.sub, table)


def channel_group(model: nn.Module, target: str, inputs: Sequence[Tensor]) -> ChannelGroup:
    """The channel group of the dense layer ``target`` (see module docstring).

    Args:
        model: the model (not modified).
        target: dotted name of a layer whose handler has the ``"dense"`` role
            (``nn.Linear``, ``nn.Conv1d/2d/3d`` with ``groups=1``, ``nn.Embedding``, HF
            ``Conv1D``, a registered layer).
        inputs: a probe batch, used once to record every intermediate shape (BatchNorm
            statistics are left as they were).

    Raises:
        GraphError: unknown or unsupported target, untraceable model, or a tie the widening
            cannot follow (the message names the node and the reason).
    """
    m = find_module(model, target)
    if is_depthwise(m):
        raise GraphError(
            f"{target!r} is a depthwise conv: its width follows its input's; widen the layer "
            f"that produces its input instead"
        )
    if not is_dense(m):
        raise GraphError(f"{target!r} is {module_kind(m)}; widen a dense Conv1d/2d/3d, "
                         f"Linear, Embedding or a layer registered with sm.register_handler")
    gm = trace(model, input_count(model, inputs))
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    if not calls:
        inside = opaque_note(gm, target)
        if inside:
            raise GraphError(
                f"{target!r} cannot be analysed{inside}. Widen inside a traceable sub-module "
                f"(e.g. one block's MLP, passing that sub-module to widen), or grow a whole "
                f"Hugging Face model with sm.grow"
            )
        raise GraphError(f"{target!r} is never called by {type(model).__name__}.forward")
    try:  # shapes only: BN running statistics must not move
        with preserved_state(gm), torch.no_grad():
            ShapeProp(gm).propagate(*graph_inputs(gm, inputs))
    except GraphError:
        raise
    except Exception as err:
        root = err
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__  # type: ignore[assignment]
        raise GraphError(
            f"running {type(model).__name__} on the probe failed ({type(root).__name__}: "
            f"{str(root).splitlines()[0][:200] if str(root) else ''}): does its forward need "
            f"other inputs than the probe's?"
        ) from err
    group = {target}
    while True:
        result = _Propagation(gm, model, group, None).run()
        joins = _joins(gm, result, group)
        if not joins:
            break
        group |= joins
    _check_single_calls(gm, result, group)
    for _, use in result.uses:
        keys = _keys(use.labels, int(use.labels.sub.max()) + 1)
        if len(set(keys)) != len(keys):
            raise GraphError(f"the same channels reach {use.module!r} more than once (e.g. "
                             f"torch.cat([h, h])); widening cannot tell the copies apart")
    ordered = [str(n.target) for n in gm.graph.nodes
               if n.op == "call_module" and n.target in group]
    ordered = [target] + [p for p in dict.fromkeys(ordered) if p != target]
    modules = dict(gm.named_modules())
    widths = {p: handlers_module().handler_for(modules[p]).out_units(modules[p]) for p in ordered}
    if len(set(widths.values())) != 1:
        raise GraphError(f"producers of one channel group differ in width: {widths}")
    uses = [u for _, u in result.uses]
    _check_tied(model, [*ordered, *(u.module for u in uses)])
    block = 0 if 0 in result.blocks else (math.lcm(*result.blocks) if result.blocks else None)
    return ChannelGroup(target, ordered, widths[target], uses, result.zero_preserving, block,
                        gm, model)


def _check_tied(model: nn.Module, grown: list[str]) -> None:
    """Refuse to grow a parameter that is shared (tied) with another place: growing one
    side would silently untie them, and the two sides grow on different dims."""
    places: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        places.setdefault(id(p), []).append(name)
    grown_set = set(grown)
    for names in places.values():
        if len(names) < 2:
            continue
        mine = [n for n in names if n in grown_set or n.rpartition(".")[0] in grown_set]
        if mine:
            raise GraphError(
                f"{' and '.join(repr(n) for n in names)} are one tied parameter; widening would "
                f"grow {mine[0]!r} and untie them. Untie them first (e.g. clone one of them "
                f"into its own nn.Parameter), or grow the model with a growth that keeps ties "
                f"(sm.grow for Hugging Face models)"
            )


def _joins(gm: fx.GraphModule, result: _Pass, group: set[str]) -> set[str]:
    """Producers that an add or product ties to the group's channels and that are not in it
    yet.

    Operands of an add must agree position by position; where one carries a group unit and
    the other a channel of another producer, that producer joins the group (the next
    propagation then re-checks the tie with it inside)."""
    nodes = list(gm.graph.nodes)
    modules = dict(gm.named_modules())
    joins: set[str] = set()
    for node, operands in result.ties:
        if not any(lab is not None and lab.has_group() for _, lab in operands):
            continue
        for arg, lab in operands:
            if lab is None:
                raise GraphError(
                    f"{node.name!r} ties the widened channels to {arg.name!r}, which comes from "
                    f"no Conv/Linear layer (e.g. the model input) and cannot be widened"
                    + (opaque_note(gm, str(arg.target)) if arg.op == "call_module" else "")
                )
        (_, ref), *rest = operands
        for arg, lab in rest:
            assert ref is not None and lab is not None
            if lab.dim != ref.dim or len(lab) != len(ref) or not bool(
                ((lab.unit == ref.unit) & (lab.sub == ref.sub)).all()
            ):
                raise GraphError(
                    f"{node.name!r} ties the widened channels to {arg.name!r} in a different "
                    f"channel layout; widening cannot follow this tie"
                )
            mixed = ref.in_group != lab.in_group
            owners = set(torch.cat([ref.owner[mixed], lab.owner[mixed]]).tolist()) - {GROUP}
            for owner in owners:
                producer = nodes[owner]
                module = modules.get(producer.target) if producer.op == "call_module" else None
                if module is None or not is_dense(module):
                    what = module_kind(module) if module is not None else producer.op
                    raise GraphError(
                        f"{node.name!r} ties the widened channels to {producer.name!r} ({what}), "
                        f"which cannot be widened"
                    )
                joins.add(str(producer.target))
    return joins - group


def _check_single_calls(gm: fx.GraphModule, result: _Pass, group: set[str]) -> None:
    seen: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            seen[n.target] = seen.get(n.target, 0) + 1
    for name in [*group, *(u.module for _, u in result.uses)]:
        if seen.get(name, 0) > 1:
            raise GraphError(
                f"{name!r} is called {seen[name]} times in forward (shared weights): widening a "
                f"module used more than once is not supported"
            )


def module_kind(m: nn.Module) -> str:
    """A short description for error messages: the class, with groups for grouped convs."""
    if isinstance(m, CONV) and m.groups > 1:  # type: ignore[operator]
        return f"{type(m).__name__}(groups={m.groups})"
    return type(m).__name__


__all__: list[str] = [
    "GROUP", "ChannelGroup", "ChannelUse", "GraphError", "Labels", "MorphTracer", "Remap",
    "channel_group", "find_module", "input_unit_dim", "is_dense", "is_depthwise",
    "module_kind", "role_of", "set_module", "trace", "trace_graph",
]
