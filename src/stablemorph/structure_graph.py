"""A ``torch.fx.GraphModule`` (what ``insert_subnet`` makes of a residual block) as JSON, and
back: one ``[name, op, target, args, kwargs]`` per node. A graph read from a file may call only
torch's built-in ops, ``torch.nn.functional``, ``operator`` and public tensor methods; names
and targets must be identifiers, so the code fx generates from it is the graph and nothing
else.
"""

from __future__ import annotations

import builtins
import keyword
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from stablemorph.structure_values import StructureError, Unencodable, decode, encode

GRAPH_MODULE = "torch.fx.graph_module:GraphModule"
"""The class name a spec gives a ``torch.fx.GraphModule`` (rebuilt from its graph)."""

IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DENIED_TORCH = frozenset({"from_file", "load", "save", "seed", "manual_seed", "initial_seed",
                           "compile", "use_deterministic_algorithms"})
_DENIED_OPERATOR = frozenset({"call", "attrgetter", "itemgetter", "methodcaller"})


def _function_table() -> dict[str, Callable[..., Any]]:
    """The functions a graph may call: torch's built-in ops, ``torch.nn.functional``, the
    ``operator`` module and ``getattr``; nothing that touches files or global state."""
    table: dict[str, Callable[..., Any]] = {"builtins:getattr": builtins.getattr}
    for name, fn in vars(operator).items():
        if callable(fn) and not name.startswith("_") and name not in _DENIED_OPERATOR:
            table[f"operator:{name}"] = fn
    for name, fn in vars(F).items():
        if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", "") == (
                "torch.nn.functional") and not isinstance(fn, type):
            table[f"torch.nn.functional:{name}"] = fn
    for name, fn in vars(torch).items():
        if (type(fn).__name__ == "builtin_function_or_method" and not name.startswith("_")
                and not name.startswith("set_") and name not in _DENIED_TORCH):
            table[f"torch:{name}"] = fn
    return table


_FUNCTIONS: dict[str, Callable[..., Any]] | None = None


def _functions() -> tuple[dict[str, Callable[..., Any]], dict[int, str]]:
    global _FUNCTIONS
    if _FUNCTIONS is None:
        _FUNCTIONS = _function_table()
    return _FUNCTIONS, {id(fn): name for name, fn in _FUNCTIONS.items()}


def _encode_arg(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return ["node", value.name]
    if isinstance(value, slice):
        return ["slice", _encode_arg(value.start), _encode_arg(value.stop),
                _encode_arg(value.step)]
    if value is Ellipsis:
        return ["ellipsis"]
    if isinstance(value, torch.device):
        return ["device", str(value)]
    if isinstance(value, torch.memory_format | torch.layout):
        return ["torch", str(value).removeprefix("torch.")]
    if isinstance(value, tuple | list) and not isinstance(value, torch.Size):
        return ["tuple" if isinstance(value, tuple) else "list", [_encode_arg(v) for v in value]]
    if isinstance(value, dict):
        return ["dict", [[encode(k), _encode_arg(v)] for k, v in value.items()]]
    return encode(value)


def _decode_arg(data: Any, nodes: Mapping[str, fx.Node]) -> Any:
    if isinstance(data, list) and data and isinstance(data[0], str):
        tag = data[0]
        if tag == "node":
            if data[1] not in nodes:
                raise StructureError(f"graph refers to node {data[1]!r} before it")
            return nodes[data[1]]
        if tag == "slice":
            return slice(*(_decode_arg(v, nodes) for v in data[1:4]))
        if tag == "ellipsis":
            return Ellipsis
        if tag == "device":
            try:
                return torch.device(str(data[1]))
            except RuntimeError as err:
                raise StructureError(f"bad device {data[1]!r:.40}: {err}") from None
        if tag == "torch":
            value = getattr(torch, str(data[1]), None)
            if not isinstance(value, torch.memory_format | torch.layout):
                raise StructureError(f"unknown torch constant {data[1]!r:.40}")
            return value
        if tag in ("tuple", "list"):
            items = [_decode_arg(v, nodes) for v in data[1]]
            return tuple(items) if tag == "tuple" else items
        if tag == "dict":
            return {decode(k): _decode_arg(v, nodes) for k, v in data[1]}
    return decode(data)


def describe_graph(gm: fx.GraphModule) -> dict[str, Any]:
    """``gm``'s graph as JSON: ``class_name`` and one ``[name, op, target, args, kwargs]``
    per node (types and node metadata are not kept).

    Raises:
        Unencodable: a call of a function outside the graph allow-list, an argument or a
            code generator (pytree in/out specs) a file cannot hold.
    """
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise Unencodable(f"graph code generator {type(gm.graph._codegen).__name__}")
    _, names = _functions()
    nodes = []
    for node in gm.graph.nodes:
        target: Any = node.target
        if node.op == "call_function":
            if id(target) not in names:
                raise Unencodable(f"graph call of {getattr(target, '__name__', target)!r}")
            target = names[id(target)]
        nodes.append([node.name, node.op, target, _encode_arg(node.args),
                      _encode_arg(node.kwargs)])
    return {"class_name": type(gm).__name__, "nodes": nodes}


def _dotted(target: Any) -> bool:
    return isinstance(target, str) and all(
        IDENT.match(p) and not keyword.iskeyword(p) for p in target.split("."))


def build_graph_module(data: Any, path: str) -> fx.GraphModule:
    """A ``GraphModule`` running the graph ``data`` describes, with empty placeholder
    submodules (the caller fills in children, parameters and buffers). Node names and
    targets must be identifiers; functions only from the graph allow-list; methods only
    public ``torch.Tensor`` methods; ``getattr`` only of public names.

    Raises:
        StructureError: anything else.
    """
    functions, _ = _functions()
    if not (isinstance(data, dict) and isinstance(data.get("nodes"), list)
            and isinstance(data.get("class_name"), str) and IDENT.match(data["class_name"])):
        raise StructureError(f"module {path!r}: malformed graph")
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    owners: dict[str, nn.Module] = {}
    for item in data["nodes"]:
        if not (isinstance(item, list) and len(item) == 5):
            raise StructureError(f"module {path!r}: malformed graph node")
        name, op, target, args, kwargs = item
        if not (isinstance(name, str) and IDENT.match(name) and not keyword.iskeyword(name)):
            raise StructureError(f"module {path!r}: bad graph node name {name!r:.40}")
        if op == "call_function":
            if target not in functions:
                raise StructureError(f"module {path!r}: the graph calls {target!r:.60}, which "
                                     f"is not an allowed function")
            target = functions[target]
        elif op == "call_method":
            if not (isinstance(target, str) and IDENT.match(target)
                    and not target.startswith("_") and hasattr(Tensor, target)):
                raise StructureError(f"module {path!r}: the graph calls method {target!r:.40}, "
                                     f"which is not a public tensor method")
        elif op == "placeholder":
            if not (isinstance(target, str) and _dotted(target.lstrip("*"))
                    and "." not in target):
                raise StructureError(f"module {path!r}: bad graph input {target!r:.40}")
        elif op in ("call_module", "get_attr"):
            if not _dotted(target):
                raise StructureError(f"module {path!r}: bad graph target {target!r:.40}")
            owners[target] = nn.Module()
        elif op != "output" or target != "output":
            raise StructureError(f"module {path!r}: unknown graph op {op!r:.40}")
        a, k = _decode_arg(args, nodes), _decode_arg(kwargs, nodes)
        if not (isinstance(a, tuple) and isinstance(k, dict)):
            raise StructureError(f"module {path!r}: malformed arguments of node {name!r}")
        if target is builtins.getattr and not (
                len(a) == 2 and isinstance(a[1], str) and IDENT.match(a[1])
                and not a[1].startswith("_")):
            raise StructureError(f"module {path!r}: node {name!r} reads a private attribute")
        node = graph.create_node(op, target, a, k, name=name)
        if node.name != name:
            raise StructureError(f"module {path!r}: graph node name {name!r} used twice")
        nodes[name] = node
    try:
        graph.lint()
        return fx.GraphModule(owners, graph, class_name=data["class_name"])
    except Exception as err:
        raise StructureError(f"module {path!r}: its graph does not build: "
                             f"{type(err).__name__}: {err}") from None


def _graph_machinery() -> frozenset[str]:
    graph = fx.Graph()
    graph.output(graph.placeholder("x"))
    return frozenset(vars(fx.GraphModule(nn.Module(), graph))) - {"training"}


GRAPH_MACHINERY = _graph_machinery()
"""The attributes a GraphModule's constructor makes (not recorded: rebuilt from the graph)."""
