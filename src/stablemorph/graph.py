"""A ``torch.fx`` view of a model, used only to *analyse* it: find a layer by name, and find
every module tied to a layer's output channels (its channel group) for widening.

The model itself is never rewritten here; morphs edit a deep copy module by module.

**Channel labels.** Widening a layer adds output channels, and every module that reads those
channels, directly or through BatchNorm, activations, pooling, flatten, residual adds and
concatenations, has to grow with it. We find them by running the traced graph on *labels*
instead of numbers: each output channel of a Conv/Linear node is labelled ``(owner, unit,
sub)`` (the producing node, its channel index, and the position inside a channel after a
flatten), element-wise ops pass labels through, ``cat`` concatenates them, ``flatten`` expands
them. An ``add`` ties its operands channel by channel: a producer whose channels are added to
the group's joins the group, and the propagation is repeated until the group is closed. The
same propagation with the group's new width gives the child's channel layout at every module,
hence for every child channel the parent channel it comes from, or the new unit it carries.
"""

from __future__ import annotations

import difflib
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from stablemorph.activations import PAct
from stablemorph.verify import preserved_state

GROUP = -1  # owner id of the channels of the group being widened

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Element-wise modules and whether they map 0 to 0 (NetMorph's zero-incoming widening needs it).
_ELEMENTWISE_MODULES: dict[type[nn.Module], bool] = {
    nn.ReLU: True, nn.LeakyReLU: True, nn.GELU: True, nn.Tanh: True, nn.Sigmoid: False,
    nn.SiLU: True, nn.ELU: True, nn.ReLU6: True, nn.Hardtanh: True, nn.Hardswish: True,
    nn.Mish: True, nn.Softplus: False, nn.Hardsigmoid: False, nn.Identity: True,
    nn.Dropout: True, nn.Dropout1d: True, nn.Dropout2d: True, nn.Dropout3d: True,
}
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_ELEMENTWISE_FUNCTIONS: dict[object, bool] = {
    torch.relu: True, F.relu: True, torch.tanh: True, F.tanh: True, torch.sigmoid: False,
    F.sigmoid: False, F.gelu: True, F.silu: True, F.leaky_relu: True, F.elu: True,
    F.relu6: True, F.hardtanh: True, F.dropout: True, F.mish: True, operator.neg: True,
    torch.neg: True, F.max_pool1d: True, F.max_pool2d: True, F.max_pool3d: True,
    F.avg_pool1d: True, F.avg_pool2d: True, F.avg_pool3d: True, F.adaptive_avg_pool1d: True,
    F.adaptive_avg_pool2d: True, F.adaptive_avg_pool3d: True, F.adaptive_max_pool1d: True,
    F.adaptive_max_pool2d: True,
}
_ELEMENTWISE_METHODS = {
    "relu": True, "tanh": True, "sigmoid": False, "contiguous": True, "clone": True,
    "neg": True, "detach": True,
}
_ADDS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_SCALINGS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul,
             torch.div}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}
_CATS = {torch.cat, torch.concat}
_ACCESSORS = {"size", "dim", "numel"}


class GraphError(ValueError):
    """The model cannot be analysed, or a layer name / channel group is unsupported."""


class MorphTracer(fx.Tracer):
    """The default tracer, with :class:`PAct` kept as one leaf module."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, PAct) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; the GraphModule shares ``model``'s submodules.

    Raises:
        GraphError: torch.fx cannot trace the model (data-dependent control flow, ...); the
            message carries fx's reason.
    """
    try:
        graph = MorphTracer().trace(model)
    except Exception as err:  # fx raises many types (TraceError, TypeError, ...)
        raise GraphError(
            f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}. "
            f"Widening needs a traceable forward (no data-dependent control flow)."
        ) from err
    return fx.GraphModule(model, graph)


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


def is_depthwise(m: nn.Module) -> bool:
    """A conv that maps each input channel to exactly one output channel of its own."""
    return isinstance(m, CONV) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def is_dense(m: nn.Module) -> bool:
    """A Conv or Linear whose every output reads every input (groups == 1)."""
    return isinstance(m, nn.Linear) or (isinstance(m, CONV) and m.groups == 1)


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
    """One module that reads the group's channels: ``kind`` is ``"consumer"`` (a dense Conv
    or Linear reading them as inputs) or ``"channelwise"`` (BatchNorm, LayerNorm, per-channel
    PAct, depthwise conv: one parameter slice per channel). ``labels`` describe its input."""

    module: str
    kind: str
    labels: Labels


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

    def source_position(self, units: Tensor) -> Tensor:
        """Parent positions holding old group units ``units`` (one per child position) at
        each child position's sub-position."""
        return self.table[units, self.sub]


@dataclass
class _Pass:
    labels: dict[fx.Node, Labels | None] = field(default_factory=dict)
    ties: list[tuple[fx.Node, list[tuple[fx.Node, Labels | None]]]] = field(default_factory=list)
    uses: list[tuple[fx.Node, ChannelUse]] = field(default_factory=list)
    zero_preserving: bool = True


class _Propagation:
    """One run of the labels through the graph, for a given group and width."""

    def __init__(self, gm: fx.GraphModule, group: set[str], width: int | None) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.group = group
        self.width = width
        self.ids = {node: k for k, node in enumerate(gm.graph.nodes)}
        self.out = _Pass()

    def run(self) -> _Pass:
        for node in self.gm.graph.nodes:
            self.out.labels[node] = self._node(node)
        return self.out

    # -- helpers --------------------------------------------------------------------------

    def _get(self, arg: object) -> Labels | None:
        return self.out.labels.get(arg) if isinstance(arg, fx.Node) else None

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
        if isinstance(m, (nn.Linear, *CONV)):
            ndim = self._ndim(node)
            dim = ndim - 1 if isinstance(m, nn.Linear) else 1
            if is_depthwise(m) and x is not None:
                if x.has_group():
                    self._check_dim(node, x, 1, "depthwise conv")
                    self.out.uses.append((node, ChannelUse(name, "channelwise", x)))
                return x
            if x is not None and x.has_group():
                if not is_dense(m):
                    raise GraphError(
                        f"the widened channels feed {name!r}, a grouped conv (groups={m.groups}): "
                        f"widening into grouped convs other than depthwise is not supported"
                    )
                self._check_dim(node, x, dim, "layer")
                self.out.uses.append((node, ChannelUse(name, "consumer", x)))
            if name in self.group:
                return Labels.fresh(GROUP, self.width or _out_channels(m), dim)
            return Labels.fresh(self.ids[node], _out_channels(m), dim)
        if x is not None and isinstance(m, nn.Flatten):
            return self._flatten(node, x, m.start_dim, m.end_dim)
        if x is None or not x.has_group():
            return x if _passes_channels(m) else None
        if isinstance(m, BATCHNORM):
            self._check_dim(node, x, 1, "BatchNorm")
            self.out.uses.append((node, ChannelUse(name, "channelwise", x)))
            return x
        if isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1 or x.dim != self._ndim(node) - 1:
                raise GraphError(
                    f"LayerNorm {name!r} normalises over {tuple(m.normalized_shape)}; widening "
                    f"supports a LayerNorm over the widened (last) dim only"
                )
            self.out.uses.append((node, ChannelUse(name, "channelwise", x)))
            self.out.zero_preserving = False
            return x
        if isinstance(m, PAct):
            if m.channels is not None:
                self._check_dim(node, x, m.channel_dim % self._ndim(node), "PAct")
                self.out.uses.append((node, ChannelUse(name, "channelwise", x)))
            phi_zero = _ELEMENTWISE_MODULES.get(type(m.phi), False)
            self.out.zero_preserving &= phi_zero
            return x
        if type(m) in _ELEMENTWISE_MODULES:
            self.out.zero_preserving &= _ELEMENTWISE_MODULES[type(m)]
            return x
        if isinstance(m, _POOL_MODULES):
            return x
        raise self._unsupported(node, f"module {name!r} ({type(m).__name__})")

    def _function(self, node: fx.Node) -> Labels | None:
        target = node.target
        first = node.args[0] if node.args else None
        x = self._get(first)
        if target in _ADDS or (node.op == "call_method" and target in ("add", "sub", "add_",
                                                                       "sub_")):
            return self._add(node)
        if target in _CATS:
            return self._cat(node)
        if target is getattr or (node.op == "call_method" and target in _ACCESSORS):
            return None  # x.shape, x.size(0), ...: no tensor
        group = self._group_inputs(node)
        if not group:
            # Outside the group only the channel labels of plain pass-through ops matter.
            if x is not None and (target in _ELEMENTWISE_FUNCTIONS or target in _SCALINGS
                                  or target in _ELEMENTWISE_METHODS):
                return x
            return self._reshape_or_none(node, x)
        if node.op == "call_function" and target in _ELEMENTWISE_FUNCTIONS:
            self.out.zero_preserving &= _ELEMENTWISE_FUNCTIONS[target]
            return x
        if node.op == "call_method" and target in _ELEMENTWISE_METHODS:
            self.out.zero_preserving &= _ELEMENTWISE_METHODS[target]
            return x
        if target in _SCALINGS or (node.op == "call_method" and target in ("mul", "div")):
            if isinstance(first, fx.Node) and all(isinstance(a, int | float)
                                                  for a in node.args[1:]):
                return x
            if (len(node.args) == 2 and isinstance(node.args[1], fx.Node)
                    and isinstance(first, int | float) and target in (operator.mul, torch.mul)):
                return self._get(node.args[1])
            raise self._unsupported(node, "a product or quotient of tensors")
        if target is torch.flatten or (node.op == "call_method" and target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, x, start, end)
        if node.op == "call_method" and target in ("view", "reshape"):
            return self._view(node, x)
        if (node.op == "call_method" and target in _REDUCTIONS) or target in (torch.mean,
                                                                              torch.sum):
            return self._reduce(node, x)
        raise self._unsupported(node, f"{node.op} {getattr(target, '__name__', target)!r}")

    def _reshape_or_none(self, node: fx.Node, x: Labels | None) -> Labels | None:
        if x is None:
            return None
        target = node.target
        if target is torch.flatten or (node.op == "call_method" and target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, x, start, end)
        if node.op == "call_method" and target in ("view", "reshape"):
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
            return operands[0][1] if operands else None
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
        in_shape = self._shape(node.args[0])  # type: ignore[arg-type]
        out_shape = self._shape(node)
        if x is None:
            return None
        if in_shape is not None and out_shape is not None and len(out_shape) == 2 and \
                out_shape[0] == in_shape[0] and out_shape[1] == math.prod(in_shape[1:]):
            return self._flatten(node, x, 1, -1)
        raise self._unsupported(node, f"a reshape {in_shape} -> {out_shape} (only (N, -1) is)")

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


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _passes_channels(m: nn.Module) -> bool:
    return (type(m) in _ELEMENTWISE_MODULES or isinstance(m, (*BATCHNORM, PAct, nn.LayerNorm))
            or isinstance(m, _POOL_MODULES))


# ----------------------------------------------------------------------------------------------
# the channel group


@dataclass
class ChannelGroup:
    """Every module tied to the output channels of ``target`` (see module docstring).

    ``producers``: the dense Conv/Linear layers whose outputs are added together with the
    target's (the target first), all with ``channels`` outputs; ``uses``: the modules that
    read the group's channels; ``zero_preserving``: every op on the way maps 0 to 0 (so a
    new unit with zero inputs stays zero everywhere); ``normalised``: a LayerNorm normalises
    over the group's channels (then only whole-layer replication preserves the function).
    """

    target: str
    producers: list[str]
    channels: int
    uses: list[ChannelUse]
    zero_preserving: bool
    normalised: bool
    graph: fx.GraphModule

    def remaps(self, width: int) -> dict[str, Remap]:
        """For each module in ``uses``: where each of its child input channels comes from when
        the group is widened to ``width``."""
        child = _Propagation(self.graph, set(self.producers), width).run()
        child_labels = {use.module: use.labels for _, use in child.uses}
        out = {}
        for use in self.uses:
            out[use.module] = _remap(use.labels, child_labels[use.module], self.channels)
        return out


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
    """The channel group of the Conv/Linear layer ``target`` (see module docstring).

    Args:
        model: the model (not modified).
        target: dotted name of a dense ``nn.Conv1d/2d/3d`` or ``nn.Linear``.
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
        raise GraphError(f"{target!r} is {module_kind(m)}; widen a dense Conv1d/2d/3d or "
                         f"Linear layer")
    gm = trace(model)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    if not calls:
        raise GraphError(f"{target!r} is never called by {type(model).__name__}.forward")
    try:  # shapes only: BN running statistics must not move
        with preserved_state(gm), torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as err:
        raise GraphError(f"running the traced model on the probe failed: {err}") from err
    group = {target}
    while True:
        result = _Propagation(gm, group, None).run()
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
    widths = {p: _out_channels(modules[p]) for p in ordered}
    if len(set(widths.values())) != 1:
        raise GraphError(f"producers of one channel group differ in width: {widths}")
    normalised = any(isinstance(modules[u.module], nn.LayerNorm) for _, u in result.uses)
    return ChannelGroup(target, ordered, widths[target], [u for _, u in result.uses],
                        result.zero_preserving, normalised, gm)


def _joins(gm: fx.GraphModule, result: _Pass, group: set[str]) -> set[str]:
    """Producers that an add ties to the group's channels and that are not in it yet.

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
                    f"{node.name!r} adds the widened channels to {arg.name!r}, which comes from "
                    f"no Conv/Linear layer (e.g. the model input) and cannot be widened"
                )
        (_, ref), *rest = operands
        for arg, lab in rest:
            assert ref is not None and lab is not None
            if lab.dim != ref.dim or len(lab) != len(ref) or not bool(
                ((lab.unit == ref.unit) & (lab.sub == ref.sub)).all()
            ):
                raise GraphError(
                    f"{node.name!r} adds the widened channels to {arg.name!r} in a different "
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
    if isinstance(m, CONV) and m.groups > 1:
        return f"{type(m).__name__}(groups={m.groups})"
    return type(m).__name__


__all__: list[str] = [
    "GROUP", "ChannelGroup", "ChannelUse", "GraphError", "Labels", "MorphTracer", "Remap",
    "channel_group", "find_module", "is_dense", "is_depthwise", "module_kind", "set_module",
    "trace",
]
