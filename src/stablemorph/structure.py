"""A model's module tree as plain JSON, and the model rebuilt from it without running code.

:func:`describe` walks a model and records, for every module path (pre-order, as
``named_modules``): its class (``"module:QualName"``), its plain attributes (the values in its
``__dict__`` that are not parameters, buffers or submodules: ``in_features``,
``kernel_size``, a ``GPTConfig``, a Hugging Face config...), its ``training`` flag, and for
each parameter, buffer and tensor attribute its name, shape, dtype (and ``requires_grad`` /
``persistent``), with ties (one parameter at two paths, one module at two paths) kept as
references. Nothing of the tensors' values is in the spec; :func:`tensors` returns those.

:func:`build` makes the model from a spec and the tensors, the way unpickling would but with
only JSON to read: each module is created with ``cls.__new__(cls)`` plus
``nn.Module.__init__`` (its ``__init__`` is never called, so no size in the spec is ever
allocated), its attributes are set from the spec and its parameters and buffers are the given
tensors. A *base* model (built on the meta device from a recipe the caller trusts) may supply
module objects: where the base has a module of the same class at a path, that object is kept,
with its attributes the spec cannot record ("opaque": functions, devices, objects of other
classes), and every recorded attribute and every tensor set from the spec.

Classes and values are read as :mod:`stablemorph.structure_values` allows (``torch.nn``,
``stablemorph``, ``transformers``; JSON values), a ``torch.fx`` ``GraphModule`` as its graph
(:mod:`stablemorph.structure_graph`). Anything else in a module that must be rebuilt is
recorded as opaque, and :func:`stablemorph.checkpoint.save` refuses the model up front (it
rebuilds the spec on the meta device and compares), so a file never holds a model it cannot
load.

Hooks (``register_forward_hook`` and friends) are code: not recorded (the checkpoint refuses
models that have them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn

from stablemorph.structure_graph import (
    GRAPH_MACHINERY,
    GRAPH_MODULE,
    IDENT,
    build_graph_module,
    describe_graph,
)
from stablemorph.structure_values import (
    StructureError,
    Unencodable,
    allowed,
    class_name,
    decode,
    dtype_of,
    encode,
    resolve_class,
    shape_of,
)

SKIPPED_ATTRS = frozenset({"_stablemorph_history", "_stablemorph_base"})
"""Attributes the checkpoint records separately (morph history, base recipe)."""

_MACHINERY = frozenset(vars(nn.Module())) - {"training"}


# ----------------------------------------------------------------------------------------------
# model -> spec


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _tensor_entry(name: str, t: Tensor) -> dict[str, Any]:
    return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def describe(model: nn.Module) -> dict[str, Any]:
    """The spec of ``model`` (module docstring): ``{"modules": [entry, ...]}`` in
    ``named_modules`` order, every path listed (a module reached twice is an entry
    ``{"path", "same_as"}``).

    Each entry: ``path``, ``class``, ``training``, ``attrs`` (name -> JSON value; a value
    object met before is ``["ref", path, name]``), ``opaque`` (attribute names whose values
    cannot be recorded), ``children`` (names, in order; ``None`` slots kept), ``params`` /
    ``buffers`` / ``tensor_attrs`` (``name``, ``shape``, ``dtype``, ``requires_grad`` /
    ``persistent``; ``{"name", "none": true}`` for a ``None`` slot; ``{"name", "same_as":
    key}`` for a tensor met before at ``key``).
    """
    seen_modules: dict[int, str] = {}
    seen_tensors: dict[int, str] = {}
    seen_values: dict[int, list[str]] = {}
    entries: list[dict[str, Any]] = []
    for path, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen_modules:
            entries.append({"path": path, "same_as": seen_modules[id(module)]})
            continue
        seen_modules[id(module)] = path
        entry: dict[str, Any] = {"path": path, "class": class_name(type(module)),
                                 "training": bool(module.training), "attrs": {},
                                 "opaque": [], "children": list(module._modules)}
        machinery = _MACHINERY
        if isinstance(module, fx.GraphModule):
            machinery = GRAPH_MACHINERY
            try:
                entry.update({"class": GRAPH_MODULE, "graph": describe_graph(module)})
            except Unencodable as err:
                entry["opaque"].append(f"graph ({err})")
        params, buffers, tensor_attrs = [], [], []
        for name, p in module._parameters.items():
            if p is None:
                params.append({"name": name, "none": True})
            elif id(p) in seen_tensors:
                params.append({"name": name, "same_as": seen_tensors[id(p)]})
            else:
                seen_tensors[id(p)] = _key(path, name)
                params.append({**_tensor_entry(name, p), "requires_grad": p.requires_grad})
        for name, b in module._buffers.items():
            persistent = name not in module._non_persistent_buffers_set
            if b is None:
                buffers.append({"name": name, "none": True, "persistent": persistent})
            elif id(b) in seen_tensors:
                buffers.append({"name": name, "same_as": seen_tensors[id(b)],
                                "persistent": persistent})
            else:
                seen_tensors[id(b)] = _key(path, name)
                buffers.append({**_tensor_entry(name, b), "persistent": persistent})
        for name, value in vars(module).items():
            if name in machinery or name in SKIPPED_ATTRS:
                continue
            if isinstance(value, Tensor):
                if id(value) in seen_tensors:
                    tensor_attrs.append({"name": name, "same_as": seen_tensors[id(value)]})
                else:
                    seen_tensors[id(value)] = _key(path, f":{name}")
                    tensor_attrs.append(_tensor_entry(name, value))
                continue
            if name == "training":
                continue
            if not _is_scalar(value) and id(value) in seen_values:
                entry["attrs"][name] = ["ref", *seen_values[id(value)]]
                continue
            try:
                entry["attrs"][name] = encode(value)
            except Unencodable:
                entry["opaque"].append(name)
                continue
            if not _is_scalar(value):
                seen_values[id(value)] = [path, name]
        entry.update(params=params, buffers=buffers, tensor_attrs=tensor_attrs)
        entries.append(entry)
    return {"modules": entries}


def _is_scalar(value: Any) -> bool:
    return value is None or type(value) in (bool, int, float, str)


def _slots(spec: Mapping[str, Any]) -> Iterator[tuple[str, str, str, dict[str, Any], bool]]:
    """``(path, kind, key, tensor entry, via_alias)`` for every tensor slot of the spec's
    model (``kind``: params, buffers, tensor_attrs), modules reached twice included."""
    targets: dict[str, dict[str, Any]] = {}
    for entry in _entries(spec):
        path = entry["path"]
        target = targets.get(entry["same_as"]) if "same_as" in entry else entry
        if target is None:
            raise StructureError(f"module {path!r} refers to {entry['same_as']!r} before it")
        targets[path] = target
        for kind in ("params", "buffers", "tensor_attrs"):
            for t in target[kind]:
                if t.get("none"):
                    continue
                name = t["name"] if kind != "tensor_attrs" else f":{t['name']}"
                yield path, kind, _key(path, name), t, target is not entry


def _stored(kind: str, t: Mapping[str, Any], via_alias: bool) -> bool:
    """Whether a slot's tensor is in the file: every parameter and persistent buffer under
    each of its names (as ``state_dict`` holds them), other tensors once."""
    if kind == "params" or (kind == "buffers" and t.get("persistent", True)):
        return True
    return not via_alias and "same_as" not in t


def expected_tensors(spec: Mapping[str, Any]) -> dict[str, tuple[list[int], torch.dtype]]:
    """key -> (shape, dtype) of every tensor the file must hold for ``spec``: the state dict's
    keys (tied ones under each name) and the non-persistent buffers and tensor attributes
    (``"path.name"``, ``"path.:name"``) once.

    Raises:
        StructureError: a malformed spec (bad shape or dtype, a tie to an unknown tensor).
    """
    out: dict[str, tuple[list[int], torch.dtype]] = {}
    by_key: dict[str, tuple[list[int], torch.dtype]] = {}
    for _path, kind, key, t, via_alias in _slots(spec):
        if "same_as" in t:
            if t["same_as"] not in by_key:
                raise StructureError(f"{key!r} is tied to {t['same_as']!r}, which is not "
                                     f"defined before it")
            meta = by_key[t["same_as"]]
        elif via_alias:
            continue   # filled below from the module it aliases
        else:
            meta = (shape_of(t.get("shape")), dtype_of(t.get("dtype")))
        if key in by_key:
            raise StructureError(f"tensor {key!r} listed twice")
        by_key[key] = meta
        if _stored(kind, t, via_alias):
            out[key] = meta
    for path, kind, key, t, via_alias in _slots(spec):
        if via_alias and "same_as" not in t and _stored(kind, t, via_alias):
            target_key = _alias_source(spec, path, kind, t)
            out[key] = by_key[target_key]
    return out


def _alias_source(spec: Mapping[str, Any], path: str, kind: str, t: Mapping[str, Any]) -> str:
    """The key of the first-listed slot a slot reached through a module alias stands for."""
    paths = {e["path"]: e for e in spec["modules"]}
    while "same_as" in paths[path]:
        path = paths[path]["same_as"]
    name = t["name"] if kind != "tensor_attrs" else f":{t['name']}"
    return _key(path, name)


def tensors(model: nn.Module, spec: Mapping[str, Any]) -> tuple[dict[str, Tensor],
                                                                dict[str, Tensor]]:
    """``(state, other)``: the tensors a file holds for ``model`` described by ``spec``, keyed
    as :func:`expected_tensors` lists them (detached). ``state`` is what
    ``model.state_dict()`` holds (parameters and persistent buffers, tied ones under each
    name); ``other`` the non-persistent buffers and tensor attributes, which a model built on
    the meta device cannot recompute."""
    modules = dict(model.named_modules(remove_duplicate=False))
    state: dict[str, Tensor] = {}
    other: dict[str, Tensor] = {}
    for path, kind, key, t, via_alias in _slots(spec):
        if not _stored(kind, t, via_alias):
            continue
        module = modules[path]
        if kind == "params":
            state[key] = module._parameters[t["name"]].detach()
        elif kind == "buffers":
            where = state if t.get("persistent", True) else other
            where[key] = module._buffers[t["name"]].detach()
        else:
            other[key] = vars(module)[t["name"]].detach()
    return state, other


def _entries(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    modules = spec.get("modules") if isinstance(spec, Mapping) else None
    if not isinstance(modules, list) or not modules:
        raise StructureError("the spec lists no modules")
    for i, entry in enumerate(modules):
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)):
            raise StructureError(f"module entry {i} is malformed")
        if "same_as" in entry:
            if not isinstance(entry["same_as"], str):
                raise StructureError(f"module {entry['path']!r}: malformed same_as")
            continue
        ok = (isinstance(entry.get("class"), str) and isinstance(entry.get("training"), bool)
              and isinstance(entry.get("attrs"), dict) and isinstance(entry.get("opaque"), list)
              and isinstance(entry.get("children"), list)
              and all(isinstance(c, str) for c in entry["children"]))
        for kind in ("params", "buffers", "tensor_attrs"):
            ok = ok and isinstance(entry.get(kind), list) and all(
                isinstance(t, dict) and isinstance(t.get("name"), str) for t in entry[kind])
        if not ok:
            raise StructureError(f"module {entry['path']!r}: malformed entry")
    if modules[0]["path"] != "" or "same_as" in modules[0]:
        raise StructureError("the spec's first module is not the root")
    return modules


# ----------------------------------------------------------------------------------------------
# spec -> model


def build(
    spec: Mapping[str, Any],
    values: Callable[[str], Tensor],
    *,
    base: nn.Module | None = None,
) -> nn.Module:
    """The model ``spec`` describes, its tensors from ``values(key)`` (keys as
    :func:`expected_tensors` lists; parameters are wrapped in ``nn.Parameter`` with the
    spec's ``requires_grad``). Modules of ``base`` with the spec's class at the same path are
    reused (module docstring); ``base`` is consumed.

    Raises:
        StructureError: a class outside the allow-list, a module whose opaque attributes no
            base module provides, a malformed spec.
    """
    base_modules = dict(base.named_modules(remove_duplicate=False)) if base is not None else {}
    built: dict[str, nn.Module] = {}
    tensor_by_key: dict[str, Tensor] = {}
    resolved: dict[tuple[str, str], Any] = {}   # (path, attr) -> value object
    full: dict[tuple[str, str], Any] = {}       # (path, attr) -> full encoding
    for entry in _entries(spec):
        path = entry["path"]
        if "same_as" in entry:
            if entry["same_as"] not in built:
                raise StructureError(f"module {path!r} refers to {entry['same_as']!r} before it")
            module = built[entry["same_as"]]
        else:
            module = _build_one(entry, base_modules.get(path), values, tensor_by_key,
                                resolved, full)
        built[path] = module
        if path:
            parent, _, name = path.rpartition(".")
            owner = built.get(parent)
            if owner is None or name not in owner._modules:
                raise StructureError(f"module {path!r} is not a listed child of {parent!r}")
            owner._modules[name] = module
    return built[""]


def _build_one(
    entry: dict[str, Any],
    reuse: nn.Module | None,
    values: Callable[[str], Tensor],
    tensor_by_key: dict[str, Tensor],
    resolved: dict[tuple[str, str], Any],
    full: dict[tuple[str, str], Any],
) -> nn.Module:
    path = entry["path"]
    if "graph" in entry:
        if entry["class"] != GRAPH_MODULE or entry["opaque"]:
            raise StructureError(f"module {path!r}: malformed graph module entry")
        module: nn.Module = build_graph_module(entry["graph"], path)
    elif reuse is not None and class_name(type(reuse)) == entry["class"]:
        module = reuse   # the base's object (its class may be the user's own)
    else:
        cls = resolve_class(entry["class"])
        if entry["opaque"]:
            raise StructureError(
                f"module {path!r} ({entry['class']}) holds attributes {entry['opaque']} that "
                f"a checkpoint cannot record, and the base has no {cls.__name__} there to "
                f"take them from"
            )
        else:
            module = cls.__new__(cls)
            nn.Module.__init__(module)
    state = module.__dict__
    machinery = GRAPH_MACHINERY if "graph" in entry else _MACHINERY
    names = [*entry["attrs"], *entry["opaque"], *(t["name"] for t in entry["tensor_attrs"])]
    for name in names:
        if not (isinstance(name, str) and IDENT.match(name)) or name in machinery:
            raise StructureError(f"module {path!r}: bad attribute name {name!r:.40}")
    for name in [n for n in state if n not in machinery and n not in SKIPPED_ATTRS
                 and n != "training" and n not in names]:
        del state[name]   # a base module's attribute the saved module did not have
    for name in entry["opaque"]:
        if name not in state:
            raise StructureError(f"module {path!r}: the base's {type(module).__name__} has "
                                 f"no attribute {name!r} to keep")
    for name, data in entry["attrs"].items():
        if isinstance(data, list) and data[:1] == ["ref"]:
            ref = (data[1], data[2]) if len(data) == 3 else None
            if ref not in resolved:
                raise StructureError(f"module {path!r}: attribute {name!r} refers to an "
                                     f"unknown value {data[1:]!r}")
            value, encoding = resolved[ref], full[ref]   # one object, shared as saved
        else:
            encoding = data
            current = state.get(name, _MISSING)
            reuse_value = current is not _MISSING and _encodes_to(current, encoding)
            value = current if reuse_value else decode(encoding)
        state[name] = value
        resolved[(path, name)] = value
        full[(path, name)] = encoding
    state["training"] = entry["training"]
    state["_modules"] = {name: None for name in entry["children"]}
    state["_parameters"] = {}
    state["_buffers"] = {}
    state["_non_persistent_buffers_set"] = set()
    for kind, table in (("params", state["_parameters"]), ("buffers", state["_buffers"])):
        for t in entry[kind]:
            key = _key(path, t["name"])
            if t.get("none"):
                value = None
            elif "same_as" in t:
                value = _tensor_ref(tensor_by_key, t["same_as"], key)
                if (kind == "params") != isinstance(value, nn.Parameter):
                    raise StructureError(f"{key!r} is tied to {t['same_as']!r}, which is not a "
                                         f"{'parameter' if kind == 'params' else 'buffer'}")
            elif kind == "params":
                value = nn.Parameter(values(key), requires_grad=bool(t.get("requires_grad", True)))
            else:
                value = values(key)
            table[t["name"]] = value
            if kind == "buffers" and not t.get("persistent", True):
                state["_non_persistent_buffers_set"].add(t["name"])
            if value is not None:
                tensor_by_key[key] = value
    for t in entry["tensor_attrs"]:
        key = _key(path, f":{t['name']}")
        value = (_tensor_ref(tensor_by_key, t["same_as"], key) if "same_as" in t
                 else values(key))
        state[t["name"]] = value
        tensor_by_key[key] = value
    if "graph" not in entry and type(module).__setstate__ is not nn.Module.__setstate__:
        module.__setstate__(dict(state))   # a class's own fix-ups (e.g. RNN flat weights)
    return module


_MISSING = object()


def _tensor_ref(by_key: Mapping[str, Tensor], ref: Any, key: str) -> Tensor:
    if not isinstance(ref, str) or ref not in by_key:
        raise StructureError(f"{key!r} is tied to {ref!r}, which is not defined before it")
    return by_key[ref]


def _encodes_to(value: Any, encoding: Any) -> bool:
    try:
        return encode(value) == encoding
    except Unencodable:
        return False


# ----------------------------------------------------------------------------------------------
# save-time checks


def check_classes(spec: Mapping[str, Any], *, foreign: bool = False) -> None:
    """Resolve every class a spec names (allow-list only), before anything is built; with
    ``foreign``, classes outside the allow-list are left for :func:`build` to find in the
    base (a user factory's own classes).

    Raises:
        StructureError: a malformed spec, a class outside the allow-list or missing here.
    """
    for entry in _entries(spec):
        if "same_as" in entry or "graph" in entry:
            continue
        if foreign and not allowed(entry["class"]):
            continue
        try:
            resolve_class(entry["class"])
        except StructureError as err:
            raise StructureError(f"module {entry['path'] or '<root>'!r}: {err}") from None


def refused_classes(spec: Mapping[str, Any], base: nn.Module | None) -> list[str]:
    """``"path (class)"`` for each module whose class is outside the allow-list and that the
    base does not provide as the same class at the same path."""
    base_modules = dict(base.named_modules(remove_duplicate=False)) if base is not None else {}
    out = []
    for entry in _entries(spec):
        if "same_as" in entry or allowed(entry["class"]) or "graph" in entry:
            continue
        there = base_modules.get(entry["path"])
        if there is None or class_name(type(there)) != entry["class"]:
            graph = [o for o in entry["opaque"] if o.startswith("graph (")]
            what = f"a torch.fx graph with a {graph[0][7:-1]}" if graph else entry["class"]
            out.append(f"{entry['path'] or '<root>'!r} ({what})")
    return out


def differences(a: Mapping[str, Any], b: Mapping[str, Any], limit: int = 3) -> list[str]:
    """Where two specs differ, as ``"path: what"`` lines (at most ``limit``)."""
    out: list[str] = []
    ea = {e["path"]: e for e in a["modules"]}
    eb = {e["path"]: e for e in b["modules"]}
    for path in [*ea, *(p for p in eb if p not in ea)]:
        x, y = ea.get(path), eb.get(path)
        if x == y:
            continue
        if x is None or y is None:
            out.append(f"{path!r}: {'missing' if x is None else 'extra'} after the rebuild")
        else:
            keys = [k for k in {**x, **y} if x.get(k) != y.get(k)]
            detail = keys[0] if keys else "?"
            if detail == "attrs":
                names = [n for n in {**x["attrs"], **y["attrs"]}
                         if x["attrs"].get(n) != y["attrs"].get(n)]
                detail = f"attributes {names}"
            out.append(f"{path or '<root>'!r}: {detail} differ after the rebuild")
        if len(out) >= limit:
            break
    return out


def meta_values(spec: Mapping[str, Any]) -> Callable[[str], Tensor]:
    """A ``values`` for :func:`build` that gives meta tensors of the spec's shapes."""
    expected = expected_tensors(spec)

    def value(key: str) -> Tensor:
        shape, dtype = expected[key]
        return torch.empty(shape, dtype=dtype, device="meta")

    return value
