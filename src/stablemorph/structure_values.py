"""What a checkpoint's structure may name and hold: classes from an allow-list, and values
as JSON (scalars as themselves, everything else a tagged list ``["tag", ...]``).

Classes only from :data:`ALLOWED_PACKAGES` (``torch.nn``, ``stablemorph``, ``transformers``);
values only as JSON scalars, tuples, lists, dicts, sets, ``torch.dtype``, ``torch.Size``,
stablemorph's own dataclasses (``GPTConfig``) and Hugging Face configs (``from_dict``, never a
hub). Reading a value never runs code other than those classes' constructors.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

ALLOWED_PACKAGES = ("torch.nn", "stablemorph", "transformers")
"""Packages whose classes a spec may name (the package itself or any module under it)."""

_CLASS = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values()
           if isinstance(d, torch.dtype)}


class StructureError(ValueError):
    """A spec is malformed, names a class outside the allow-list, or cannot be built."""


class Unencodable(Exception):
    """A value a spec cannot hold as JSON (internal: becomes an opaque attribute)."""


# ----------------------------------------------------------------------------------------------
# classes


def class_name(cls: type) -> str:
    """``"package.module:QualName"`` of ``cls``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def allowed(name: str) -> bool:
    """Whether a class name lies in :data:`ALLOWED_PACKAGES`."""
    module = name.partition(":")[0]
    return any(module == p or module.startswith(p + ".") for p in ALLOWED_PACKAGES)


def resolve_class(name: Any, base: type = nn.Module) -> type:
    """The class named ``"package.module:QualName"``, imported only from an allowed package
    and only if it is a subclass of ``base``.

    Raises:
        StructureError: a malformed name, a package outside the allow-list, no such class.
    """
    if not isinstance(name, str) or not _CLASS.match(name):
        raise StructureError(f"malformed class name {name!r}")
    if not allowed(name):
        raise StructureError(f"class {name!r} is outside the allowed packages "
                             f"{', '.join(ALLOWED_PACKAGES)}")
    module_name, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise StructureError(f"class {name!r} does not exist here ({err})") from None
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise StructureError(f"{name!r} is not a subclass of {base.__name__}")
    return obj


def _hf_config_class() -> type | None:
    module = sys.modules.get("transformers")   # only if the caller's code imported it
    return getattr(module, "PreTrainedConfig", None) or getattr(module, "PretrainedConfig",
                                                                 None)


# ----------------------------------------------------------------------------------------------
# values <-> JSON: scalars as themselves, everything else a tagged list ["tag", ...]


def encode(value: Any) -> Any:
    """``value`` as JSON (scalars as is, containers and objects as ``["tag", ...]``).

    Raises:
        Unencodable: a value of a type the spec cannot hold.
    """
    if value is None or type(value) in (bool, int, float, str):
        return value   # exact types only: an IntEnum would come back a plain int
    if isinstance(value, torch.dtype):
        return ["dtype", str(value).removeprefix("torch.")]
    if isinstance(value, torch.Size):
        return ["size", list(value)]
    if type(value) in (tuple, list):
        return ["tuple" if type(value) is tuple else "list", [encode(v) for v in value]]
    if type(value) in (set, frozenset):
        items = [encode(v) for v in value]
        try:
            items.sort(key=repr)
        except TypeError:
            raise Unencodable(type(value).__name__) from None
        return ["frozenset" if type(value) is frozenset else "set", items]
    if type(value) in (dict, OrderedDict):
        return ["dict" if type(value) is dict else "odict",
                [[encode(k), encode(v)] for k, v in value.items()]]
    cls = type(value)
    hf = _hf_config_class()
    if hf is not None and isinstance(value, hf) and allowed(class_name(cls)):
        return ["hfconfig", class_name(cls), encode(value.to_dict()),
                getattr(value, "_attn_implementation", None)]
    if dataclasses.is_dataclass(value) and class_name(cls).startswith("stablemorph."):
        fields = dataclasses.fields(value)
        if any(not f.init for f in fields):
            raise Unencodable(cls.__name__)
        return ["dataclass", class_name(cls),
                [[f.name, encode(getattr(value, f.name))] for f in fields]]
    raise Unencodable(cls.__name__)


def decode(data: Any) -> Any:
    """The value :func:`encode` wrote (classes only from the allow-list).

    Raises:
        StructureError: malformed data or a class outside the allow-list.
    """
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if not (isinstance(data, list) and data and isinstance(data[0], str)):
        raise StructureError(f"malformed value {data!r:.80}")
    tag, args = data[0], data[1:]
    try:
        if tag == "dtype":
            return _DTYPES[args[0]]
        if tag == "size":
            return torch.Size(shape_of(args[0]))
        if tag in ("tuple", "list", "set", "frozenset"):
            items = [decode(v) for v in args[0]]
            return {"tuple": tuple, "list": list, "set": set, "frozenset": frozenset}[tag](items)
        if tag in ("dict", "odict"):
            items = [(decode(k), decode(v)) for k, v in args[0]]
            return dict(items) if tag == "dict" else OrderedDict(items)
        if tag == "dataclass":
            if not str(args[0]).startswith("stablemorph."):   # no other package's code runs
                raise StructureError(f"dataclass {args[0]!r:.80} is not stablemorph's")
            cls = resolve_class(args[0], object)
            if not dataclasses.is_dataclass(cls):
                raise StructureError(f"{args[0]!r} is not a dataclass")
            return cls(**{str(k): decode(v) for k, v in args[1]})
        if tag == "hfconfig":
            hf = _hf_config_class() or resolve_class("transformers:PreTrainedConfig", object)
            cls = resolve_class(args[0], hf)
            config = cls.from_dict(decode(args[1]))
            if args[2] is not None:
                config._attn_implementation = str(args[2])
            return config
    except StructureError:
        raise
    except Exception as err:  # a bad field, a dataclass's own validation...
        raise StructureError(f"cannot decode {tag} value: {type(err).__name__}: {err}"
                             ) from None
    raise StructureError(f"unknown value tag {tag!r}")


def shape_of(shape: Any) -> list[int]:
    """``shape`` checked to be a list of non-negative ints."""
    if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
        raise StructureError(f"malformed shape {shape!r:.80}")
    return shape


def dtype_of(name: Any) -> torch.dtype:
    """The ``torch.dtype`` called ``name`` (``"float32"``)."""
    if not isinstance(name, str) or name not in _DTYPES:
        raise StructureError(f"unknown dtype {name!r:.40}")
    return _DTYPES[name]
