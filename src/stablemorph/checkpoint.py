"""Save and load grown models: the module tree as JSON plus the tensors, no pickled code.

A checkpoint is one ``torch.save`` file holding only tensors, plain Python values and a JSON
string, read back with ``torch.load(weights_only=True)``, so opening a file never runs code
from it. It holds (format version 2):

- the **structure** (:mod:`stablemorph.structure`): for every module path its class, its
  plain attributes (``in_features``, ``kernel_size``, a ``GPTConfig``...), its train/eval
  flag, and every parameter's and buffer's shape, dtype and ``requires_grad``, ties included;
- optionally a **base recipe** that supplies what JSON cannot hold (a user class, a function
  attribute): the zoo's ``{"name", "kwargs"}`` recorded by
  :func:`stablemorph.zoo.build_model`, a user factory ``"package.module:function"`` with JSON
  keyword arguments, or a Hugging Face model class with its config (``Cls(config)``; never
  read from a hub). A model made only of ``torch.nn``, ``stablemorph`` and ``transformers``
  classes needs none;
- the tensors: ``state_dict`` (what ``model.state_dict()`` holds, so the file also serves tools
  that only want the weights) and the non-persistent buffers and tensor attributes;
- the morph history (op, target, kwargs, the report measured at morph time, the parameter
  map), optionally an optimiser's and a scheduler's ``state_dict`` and a JSON ``extra``;
- a SHA-256 digest of all of the above, so corruption that still unpickles is caught.

:func:`load` checks the file (format, digest, every tensor's shape and dtype against the
structure) before it builds anything; then it builds the base, if any, on the meta device
(no memory, however large the recipe's sizes), replaces every module the structure describes
differently, and assigns the file's tensors: no probe, no solver, no replay, so a model with
token inputs, several inputs, a grown transformer or a Hugging Face model loads as fast as its
bytes are read. Mixed dtypes, each module's train/eval flag and frozen parameters come back as
saved. Classes are taken only from ``torch.nn``, ``stablemorph`` and ``transformers``; a user
factory is imported and run only when the caller lists it in ``allow_factories`` (a file
naming ``"os:system"`` is refused, never run).

Every save loads, or :func:`save` refuses up front: it rebuilds the structure on the meta
device (running the base recipe, the factory included) and compares it with the model, naming
the module it could not rebuild; modules with forward or backward hooks (code) are refused.
Files are written atomically (a temporary file in the same directory, then ``os.replace``) with
the permissions a new file gets under the umask, or those of the file replaced.

Version-1 files (a base plus a replay of every morph through the solver) are read only with
``legacy_replay=True``: replay is as slow as the morphs and trusts the file's sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import math
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stablemorph.optim import constructor_kwargs
from stablemorph.record import HISTORY_ATTR, MorphRecord, MorphReport, ParamOrigin, history
from stablemorph.structure import (
    build,
    check_classes,
    describe,
    differences,
    expected_tensors,
    meta_values,
    refused_classes,
    tensors,
)
from stablemorph.structure_values import (
    StructureError,
    Unencodable,
    class_name,
    decode,
    encode,
    resolve_class,
)
from stablemorph.zoo import BASE_ATTR, build_model

FORMAT = "stablemorph-checkpoint"
VERSION = 2
LEGACY_VERSION = 1
_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_LEGACY_REPORT = ("scheme", "max_abs", "max_rel", "residual", "zero_fraction",
                  "near_zero_fraction", "changed", "seconds", "notes")


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read: the message says which file and why."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at the path given (also a ``FileNotFoundError``)."""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    ``model``: the rebuilt model (state loaded, on ``map_location``); ``optimizer_state`` /
    ``scheduler_state``: the saved ``state_dict``s (``None`` if none were saved);
    ``extra``: the caller's JSON dict; ``recipe``: the base recipe (``None`` where the
    structure alone rebuilt the model) and the morphs applied (op, target, kwargs, report);
    ``optimizer_class`` / ``optimizer_params`` / ``optimizer_defaults``: the saved optimiser's
    class name, parameter names per group and constructor defaults, which
    :meth:`make_optimizer` uses.
    """

    model: nn.Module
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    optimizer_class: str | None = None
    optimizer_params: list[list[str]] | None = None
    optimizer_defaults: dict[str, Any] | None = None

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The saved optimiser rebuilt over ``model``'s parameters (same class, groups,
        hyper-parameters and state). The class must be one of ``torch.optim``'s; for another
        one, build it over the same parameters in the same groups and call
        ``load_state_dict(checkpoint.optimizer_state)``."""
        if self.optimizer_state is None or self.optimizer_params is None:
            raise CheckpointError("this checkpoint was saved without an optimizer")
        cls = getattr(torch.optim, str(self.optimizer_class), None)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise CheckpointError(
                f"the checkpoint's optimizer class {self.optimizer_class!r} is not in "
                f"torch.optim: build it yourself and load checkpoint.optimizer_state"
            )
        named = dict(self.model.named_parameters())
        missing = [n for names in self.optimizer_params for n in names if n not in named]
        if missing:
            raise CheckpointError(f"the saved optimizer holds parameters {missing} that the "
                                  f"model does not have")
        groups = [{"params": [named[n] for n in names]} for names in self.optimizer_params]
        optimizer = cls(groups, **constructor_kwargs(cls, self.optimizer_defaults or {}))
        optimizer.load_state_dict(self.optimizer_state)
        return optimizer


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    extra: Mapping[str, Any] | None = None,
    base: str | None = None,
    base_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` (and optionally its optimiser and scheduler) to ``path`` atomically.

    Args:
        model: any model whose modules are ``torch.nn``, ``stablemorph`` or
            ``transformers`` classes, or come unchanged from its base (below); possibly
            morphed or edited by hand. A DDP or DataParallel wrapper is unwrapped, and so is
            a ``torch.compile``d model: its ``_orig_mod`` is saved, and :func:`load` returns
            that plain module (compile it again). Not modified. Forward and backward hooks
            are code and are refused: remove them before saving.
        path: the file to write (replaced atomically if it exists, keeping its permissions).
        optimizer: an optimiser over ``model``'s parameters, saved with their names.
        scheduler: its learning-rate scheduler (its ``state_dict``; lambdas are not saved:
            recreate the scheduler, then ``load_state_dict``).
        extra: JSON values to keep beside the model (step counter, config...).
        base: the import path ``"package.module:function"`` of a function that builds the
            model's *unmorphed* base, needed only when the model holds modules of other
            classes (or attributes JSON cannot hold): those must come unchanged from the
            base. Zoo models and Hugging Face models record their base themselves. The
            function must build on the meta device (``with torch.device("meta")``: no data-
            dependent steps, no weights read); it is run once here to check the file loads.
        base_kwargs: JSON keyword arguments for ``base``.

    Raises:
        CheckpointError: a module the file could not rebuild (its path and class named), no
            base where one is needed, values that are not JSON / plain tensors, an optimiser
            holding tensors that are not the model's parameters, an unwritable path. Nothing
            is written then.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"cannot save {path}: it is a directory")
    model = _unwrap(model)
    for name, p in model.named_parameters():
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise CheckpointError(f"cannot save {path}: parameter {name!r} is uninitialised (a "
                                  f"lazy module): run a forward pass first")
    hooked = [name or "<root>" for name, m in model.named_modules()
              if any(getattr(m, h) for h in _HOOKS)]
    if hooked:
        raise CheckpointError(
            f"cannot save {path}: modules {hooked[:3]} have forward or backward hooks, which "
            f"are code a checkpoint cannot hold (a hook may change what the model computes): "
            f"remove them (handle.remove()) before saving and register them again after loading"
        )
    recipe = _base_recipe(model, base, base_kwargs, path)
    spec = describe(model)
    _check_saveable(model, spec, recipe, path)
    state, other = tensors(model, spec)
    names = {id(p): n for n, p in model.named_parameters()}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "torch": torch.__version__,
        "base": recipe,
        "structure": spec,
        "morphs": [_record_json(r) for r in history(model)],
        "param_maps": [_param_map_json(r) for r in history(model)],
        "extra": dict(extra or {}),
        "optimizer": None,
    }
    payload: dict[str, Any] = {
        "state_dict": state,
        "other_tensors": other,
        "history_tensors": _history_tensors(history(model)),
    }
    if optimizer is not None:
        groups = []
        for gi, group in enumerate(optimizer.param_groups):
            missing = [tuple(p.shape) for p in group["params"] if id(p) not in names]
            if missing:
                raise CheckpointError(
                    f"cannot save {path}: optimizer param group {gi} holds tensors of shapes "
                    f"{missing} that are not parameters of the model"
                )
            groups.append([names[id(p)] for p in group["params"]])
        meta["optimizer"] = {"class": type(optimizer).__name__, "params": groups}
        payload["optimizer"] = optimizer.state_dict()
        payload["optimizer_defaults"] = dict(optimizer.defaults)
    if scheduler is not None:
        payload["scheduler"] = scheduler.state_dict()
    try:
        payload["meta"] = json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot save {path}: the recipe or extra is not JSON ({err})"
                              ) from None
    for key, value in payload.items():
        _check_plain(value, key, path)
    payload["digest"] = _digest(payload)
    _write_atomically(payload, path)


def load(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    allow_factories: Iterable[str] = (),
    legacy_replay: bool = False,
) -> nn.Module:
    """The model saved at ``path``, rebuilt from its structure with its state loaded.

    See :func:`load_checkpoint`; this returns only its ``model``.
    """
    return load_checkpoint(path, map_location=map_location, allow_factories=allow_factories,
                           legacy_replay=legacy_replay).model


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    allow_factories: Iterable[str] = (),
    legacy_replay: bool = False,
) -> Checkpoint:
    """Read ``path``, rebuild its model and return it with the saved optimiser/scheduler
    state.

    Args:
        path: a file written by :func:`save`.
        map_location: the device the model and the states are loaded onto.
        allow_factories: user factories (``"package.module:function"``, a list or set, not a
            bare string) this call may import and run to build the base; zoo, Hugging Face
            and structure-only bases need none.
        legacy_replay: read a version-1 file by replaying its morphs (solver included: as
            slow as the morphs, and the file's recipe sizes are trusted). Save the result
            again to convert it.

    Raises:
        CheckpointNotFoundError: no file at ``path`` (a ``FileNotFoundError`` too).
        CheckpointError: a directory, a truncated or corrupt file, not a stablemorph
            checkpoint, of another format version, a class outside the allow-list, a factory
            not allowed, tensors that do not match the structure. The message names
            ``path``; nothing is returned half-loaded, and nothing is allocated beyond what the
            file holds.
        TypeError: ``allow_factories`` is a bare string.
    """
    if isinstance(allow_factories, str | bytes):
        raise TypeError(
            f"allow_factories must be a list of 'package.module:function' strings, not the "
            f"bare string {allow_factories!r} (which would allow each of its characters): "
            f"pass [{allow_factories!r}]"
        )
    allowed = set(allow_factories)
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointNotFoundError(f"no checkpoint at {path}")
    payload = _read(path)
    meta = payload["meta"]
    if meta["version"] == LEGACY_VERSION:
        model = _load_legacy(payload, path, allowed, legacy_replay)
    else:
        model = _load_structure(payload, path, allowed, map_location)
    opt_meta = meta.get("optimizer") or {}
    return Checkpoint(
        model=model,
        optimizer_state=_to_device(payload.get("optimizer"), map_location),
        scheduler_state=payload.get("scheduler"),
        extra=meta["extra"],
        recipe={"base": meta["base"], "morphs": meta["morphs"]},
        optimizer_class=opt_meta.get("class"),
        optimizer_params=opt_meta.get("params"),
        optimizer_defaults=payload.get("optimizer_defaults"),
    )


# ----------------------------------------------------------------------------------------------
# the base a structure is laid over


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
                getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod   # torch.compile's wrapper: save the module it compiles
        else:
            return model


def _hf_model_class() -> type | None:
    module = sys.modules.get("transformers")
    return getattr(module, "PreTrainedModel", None) if module is not None else None


def _base_recipe(model: nn.Module, base: str | None, base_kwargs: Mapping[str, Any] | None,
                 path: Path) -> dict[str, Any] | None:
    if base is not None:
        if not isinstance(base, str) or not _FACTORY.match(base):
            raise CheckpointError(
                f"cannot save {path}: base must be an import path 'package.module:function', "
                f"got {base!r}"
            )
        return {"factory": base, "kwargs": dict(base_kwargs or {})}
    if base_kwargs is not None:
        raise CheckpointError(f"cannot save {path}: base_kwargs given without "
                              f"base='package.module:function'")
    recorded = getattr(model, BASE_ATTR, None)
    if isinstance(recorded, dict):
        return dict(recorded)
    hf = _hf_model_class()
    if hf is not None and isinstance(model, hf):
        try:
            config = encode(model.config)
        except Unencodable:
            raise CheckpointError(f"cannot save {path}: the config of {type(model).__name__} "
                                  f"cannot be written as JSON") from None
        return {"hf": class_name(type(model)), "config": config}
    return None


class _TooManyModules(Exception):
    pass


@contextlib.contextmanager
def _module_limit(limit: int) -> Iterator[None]:
    """Abort (``_TooManyModules``) a build that registers more than ``limit`` submodules: a
    tiny file whose recipe asks for a million layers is refused before it fills memory with
    Python objects (the meta device holds no tensor data, but every module is an object)."""
    count = 0

    def hook(_module: nn.Module, _name: str, _sub: nn.Module | None) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise _TooManyModules

    handle = torch.nn.modules.module.register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _build_base(recipe: dict[str, Any] | None, path: Path, allowed: set[str] | None,
                when: str, limit: int) -> nn.Module | None:
    """The recipe's base model on the meta device (no memory), refused if it registers more
    than ``limit`` modules; ``allowed=None`` trusts any factory (save time: the caller named
    it)."""
    if recipe is None:
        return None
    try:
        with _module_limit(limit):
            return _build_base_unguarded(recipe, path, allowed, when)
    except _TooManyModules:
        raise CheckpointError(f"{when}: its base recipe builds more than {limit} modules, far "
                              f"more than the model it saved holds") from None


def _limit(spec: Mapping[str, Any]) -> int:
    return 2 * len(spec["modules"]) + 64


def _build_base_unguarded(recipe: dict[str, Any], path: Path, allowed: set[str] | None,
                          when: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        if "factory" in recipe:
            model = _from_factory(recipe, path, allowed, when)
        elif "hf" in recipe:
            try:
                cls = resolve_class(recipe["hf"], _hf_model_class() or nn.Module)
                model = cls(decode(recipe["config"]))
            except _TooManyModules:
                raise
            except Exception as err:
                raise CheckpointError(f"{when}: cannot build its base {recipe['hf']!r} from "
                                      f"its config: {type(err).__name__}: {err}") from None
        else:
            try:
                model = build_model(recipe["name"], **recipe["kwargs"])
            except _TooManyModules:
                raise
            except Exception as err:
                raise CheckpointError(f"{when}: cannot build its base {recipe!r}: "
                                      f"{type(err).__name__}: {err}") from None
    return model


def _from_factory(recipe: dict[str, Any], path: Path, allowed: set[str] | None,
                  when: str) -> nn.Module:
    factory = recipe["factory"]
    if allowed is not None and factory not in allowed:
        raise CheckpointError(
            f"{path} builds its base with {factory!r}; loading would import and run it. If "
            f"you trust it, pass allow_factories=[{factory!r}]"
        )
    if not isinstance(factory, str) or not _FACTORY.match(factory):
        raise CheckpointError(f"{when}: malformed factory {factory!r}")
    module_name, _, attr = factory.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
        model = fn(**recipe["kwargs"])
    except _TooManyModules:
        raise
    except Exception as err:
        raise CheckpointError(f"{when}: building its base with {factory!r} (on the meta "
                              f"device) failed: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{when}: {factory!r} returned a {type(model).__name__}, not an "
                              f"nn.Module")
    return model


# ----------------------------------------------------------------------------------------------
# writing


def _check_saveable(model: nn.Module, spec: dict[str, Any], recipe: dict[str, Any] | None,
                    path: Path) -> None:
    """Refuse now what :func:`load` could not rebuild: rebuild the structure on the meta
    device over the base and compare."""
    when = f"cannot save {path}"
    base = _build_base(recipe, path, None, when, _limit(spec))
    refused = refused_classes(spec, base)
    if refused:
        hint = ("they must come unchanged from the base built by base='package.module:"
                "function'" if recipe is None or "factory" not in recipe
                else f"they are not built by its base {recipe['factory']!r} at those paths")
        raise CheckpointError(
            f"{when}: modules {', '.join(refused[:3])}{' ...' if len(refused) > 3 else ''} "
            f"are of classes outside torch.nn, stablemorph and transformers, which a file "
            f"cannot name safely; {hint}"
        )
    try:
        rebuilt = build(spec, meta_values(spec), base=base)
        lost = differences(spec, describe(rebuilt))
    except StructureError as err:
        raise CheckpointError(f"{when}: {err}") from None
    if lost:
        raise CheckpointError(f"{when}: the model cannot be rebuilt from what a file can hold "
                              f"({'; '.join(lost)})")


def _record_json(record: MorphRecord) -> dict[str, Any]:
    report = {f.name: getattr(record.report, f.name) for f in dataclasses.fields(record.report)
              if f.name not in ("op", "target", "param_map")}
    return {"op": record.op, "target": record.target, "kwargs": record.kwargs,
            "report": report}


def _param_map_json(record: MorphRecord) -> dict[str, dict[str, Any]]:
    """The record's parameter map as JSON, tensor fields left out (see
    :func:`_history_tensors`): JSON reads far faster than a pickle of many small dicts."""
    return {name: {f.name: getattr(origin, f.name) for f in dataclasses.fields(origin)
                   if not isinstance(getattr(origin, f.name), Tensor)}
            for name, origin in record.report.param_map.items()}


def _history_tensors(records: list[MorphRecord]) -> dict[str, Tensor]:
    """The tensor fields of every record's parameter map, keyed ``"i:name:field"``."""
    out = {}
    for i, record in enumerate(records):
        for name, origin in record.report.param_map.items():
            for f in dataclasses.fields(origin):
                value = getattr(origin, f.name)
                if isinstance(value, Tensor):
                    out[f"{i}:{name}:{f.name}"] = value.detach()
    return out


def _check_plain(value: Any, where: str, path: Path) -> None:
    """Refuse at save time what ``torch.load(weights_only=True)`` would refuse at load."""
    if value is None or isinstance(value, Tensor | bool | int | float | str):
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]", path)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise CheckpointError(f"cannot save {path}: {where} has a key {k!r} of type "
                                      f"{type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]", path)
        return
    raise CheckpointError(
        f"cannot save {path}: {where} is a {type(value).__name__}, not a tensor or plain "
        f"value, and would need pickled code to load"
    )


_WALK_LIMIT = 10_000_000


class _TooLarge(Exception):
    pass


def _walk(value: Any, budget: list[int] | None = None) -> Iterator[bytes | memoryview]:
    """A canonical byte stream of a plain value (types, keys, tensor dtypes, shapes, data).
    ``budget`` bounds the number of values visited (a pickle can nest one list in itself
    many times over: a few bytes that would take forever to walk)."""
    if budget is None:
        budget = [_WALK_LIMIT]
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLarge
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        yield f"T{t.dtype}{tuple(t.shape)}".encode()
        yield memoryview(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        yield f"D{len(value)}".encode()
        for k, v in value.items():
            yield repr(k).encode()
            yield from _walk(v, budget)
    elif isinstance(value, list | tuple):
        yield f"L{len(value)}".encode()
        for v in value:
            yield from _walk(v, budget)
    else:
        yield f"{type(value).__name__}:{value!r};".encode()


def _digest(payload: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    budget = [_WALK_LIMIT]
    for key in sorted(k for k in payload if k != "digest"):
        h.update(key.encode())
        for chunk in _walk(payload[key], budget):
            h.update(chunk)
    return h.hexdigest()


def _new_file_mode(path: Path) -> int:
    """The mode ``path`` keeps (if it exists) or a new file gets under the umask."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _write_atomically(payload: dict[str, Any], path: Path) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise CheckpointError(f"cannot save {path}: its directory {directory} does not exist")
    mode = _new_file_mode(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as err:
        raise CheckpointError(f"cannot save {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise CheckpointError(f"cannot save {path}: {err.strerror or err}") from None
        raise


# ----------------------------------------------------------------------------------------------
# reading


def _read(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged archive
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(
            f"{path} is not a readable stablemorph checkpoint (truncated, corrupt, or not "
            f"written by stablemorph.checkpoint.save): {type(err).__name__}: {first}"
        ) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("meta"), str):
        raise CheckpointError(f"{path} is not a stablemorph checkpoint (no recipe in it)")
    try:
        meta = json.loads(payload["meta"])
    except (json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: its recipe is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a stablemorph checkpoint (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") not in (VERSION, LEGACY_VERSION):
        raise CheckpointError(
            f"{path} has checkpoint format version {meta.get('version')!r}; this stablemorph "
            f"reads version {VERSION} (and {LEGACY_VERSION} with legacy_replay=True)"
        )
    try:
        digest = _digest(payload)
    except (_TooLarge, RecursionError):
        raise CheckpointError(f"{path} is not a stablemorph checkpoint (its contents nest too "
                              f"deep or too many times)") from None
    if payload.get("digest") != digest:
        raise CheckpointError(f"{path} is corrupt: its contents do not match their SHA-256 "
                              f"digest")
    if not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"{path} has no state dict")
    _check_meta(meta, path)
    payload["meta"] = meta
    return payload


def _check_meta(meta: dict[str, Any], path: Path) -> None:
    """The recipe's fields have the types the rest of the loader relies on."""
    base = meta.get("base")
    morphs = meta.get("morphs")
    problems = []
    legacy = meta["version"] == LEGACY_VERSION
    base_ok = isinstance(base, dict) and (
        (isinstance(base.get("kwargs"), dict)
         and (isinstance(base.get("name"), str) or isinstance(base.get("factory"), str)))
        or (not legacy and isinstance(base.get("hf"), str) and "config" in base))
    if not (base_ok or (base is None and not legacy)):
        problems.append(f"base {base!r:.200}")
    if not isinstance(morphs, list) or not all(
        isinstance(m, dict) and isinstance(m.get("op"), str) and isinstance(m.get("target"), str)
        and isinstance(m.get("kwargs"), dict) and isinstance(m.get("report"), dict)
        for m in morphs
    ):
        problems.append("morphs")
    kinds: tuple[tuple[str, type], ...] = (("extra", dict),)
    kinds += ((("dtype", str), ("training", bool), ("frozen", list)) if legacy
              else (("structure", dict),))
    for key, kind in kinds:
        if not isinstance(meta.get(key), kind):
            problems.append(key)
    if problems:
        raise CheckpointError(f"{path}: malformed recipe ({', '.join(problems)})")


def _load_structure(payload: dict[str, Any], path: Path, allowed: set[str],
                    map_location: str | torch.device) -> nn.Module:
    """Check every tensor against the structure, then build the model over its base."""
    meta = payload["meta"]
    spec = meta["structure"]
    other = payload.get("other_tensors")
    if not isinstance(other, dict):
        raise CheckpointError(f"{path}: malformed file (no other_tensors)")
    state = payload["state_dict"]
    stored = {**other, **state}
    try:
        expected = expected_tensors(spec)
        check_classes(spec, foreign=isinstance(meta["base"], dict) and "factory" in meta["base"])
    except StructureError as err:
        raise CheckpointError(f"{path}: {err}") from None
    if len(stored) != len(state) + len(other) or set(stored) != set(expected):
        extra_keys = sorted(set(stored) - set(expected))[:3]
        missing = sorted(set(expected) - set(stored))[:3]
        raise CheckpointError(f"{path}: its tensors do not match its structure (missing "
                              f"{missing}, unexpected {extra_keys})")
    for key, (shape, dtype) in expected.items():
        t = stored[key]
        if not isinstance(t, Tensor) or list(t.shape) != shape or t.dtype != dtype:
            got = (tuple(t.shape), t.dtype) if isinstance(t, Tensor) else type(t).__name__
            raise CheckpointError(f"{path}: tensor {key!r} is {got}, its structure says "
                                  f"{(tuple(shape), dtype)}")
    base = _build_base(meta["base"], path, allowed, str(path), _limit(spec))
    try:
        model = build(spec, lambda key: stored[key].to(map_location), base=base)
    except StructureError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except Exception as err:   # a device that is not there, a class's own __setstate__...
        raise CheckpointError(f"{path}: building the model failed: {type(err).__name__}: "
                              f"{err}") from None
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise CheckpointError(f"{path}: {name!r} was left without data")
    if isinstance(meta["base"], dict) and "hf" not in meta["base"]:
        object.__setattr__(model, BASE_ATTR, dict(meta["base"]))
    _restore_history(model, meta, payload.get("history_tensors"), path)
    return model


def _restore_history(model: nn.Module, meta: dict[str, Any], tensors_: Any,
                     path: Path) -> None:
    morphs, maps = meta["morphs"], meta.get("param_maps")
    if not (isinstance(maps, list) and len(maps) == len(morphs)
            and isinstance(tensors_, dict)):
        raise CheckpointError(f"{path}: malformed morph history")
    report_fields = {f.name for f in dataclasses.fields(MorphReport)}
    origin_fields = [f.name for f in dataclasses.fields(ParamOrigin)]
    records = []
    try:
        for i, (m, param_map) in enumerate(zip(morphs, maps, strict=True)):
            origins = {}
            for name, fields in param_map.items():
                given = {k: v for k, v in fields.items() if k in origin_fields}
                given.update({k: tensors_[f"{i}:{name}:{k}"] for k in origin_fields
                              if f"{i}:{name}:{k}" in tensors_})
                origins[str(name)] = ParamOrigin(**given)
            report = {k: v for k, v in m["report"].items() if k in report_fields}
            records.append(MorphRecord(m["op"], m["target"], m["kwargs"], MorphReport(
                **{**report, "op": m["op"], "target": m["target"], "param_map": origins})))
    except (TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: malformed morph history ({err})") from None
    object.__setattr__(model, HISTORY_ATTR, records)


def _to_device(state: Any, device: str | torch.device) -> Any:
    """``state`` with every tensor on ``device``."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_to_device(v, device) for v in state)
    return state


# ----------------------------------------------------------------------------------------------
# version 1: base + replay of every morph


def _load_legacy(payload: dict[str, Any], path: Path, allowed: set[str],
                 legacy_replay: bool) -> nn.Module:
    """A version-1 file: rebuild its base and replay its morphs (solver included)."""
    meta = payload["meta"]
    if not legacy_replay:
        raise CheckpointError(
            f"{path} is a version-1 checkpoint: it stores a replay of every morph, not the "
            f"structure, and loading it re-runs the solver (as slow as the morphs) on sizes "
            f"read from the file. If you trust it, load it with legacy_replay=True and save "
            f"it again to convert it"
        )
    try:
        dtype = getattr(torch, meta["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise TypeError(meta["dtype"])
    except (AttributeError, TypeError):
        raise CheckpointError(f"{path}: unknown parameter dtype {meta['dtype']!r}") from None
    # morphs only add parameters: a base larger than the saved state is a hostile recipe
    base_meta = _build_base(meta["base"], path, allowed, str(path),
                            4 * len(payload["state_dict"]) + 64)
    assert base_meta is not None
    held = sum(t.numel() for t in payload["state_dict"].values() if isinstance(t, Tensor))
    wanted = sum(p.numel() for p in base_meta.parameters())
    if wanted > held:
        raise CheckpointError(f"{path}: its base recipe builds {wanted} parameters, more than "
                              f"the {held} values the file holds")
    with torch.random.fork_rng(devices=[]):
        base = meta["base"]
        try:
            model = (_from_factory(base, path, allowed, str(path)) if "factory" in base
                     else build_model(base["name"], **base["kwargs"]))
            model.to(dtype=dtype)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{path}: cannot build its base {base!r}: {err}") from None
        if "factory" in base:
            object.__setattr__(model, BASE_ATTR, dict(base))
        model = _replay(model, meta["morphs"], path)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: the saved state does not fit the architecture its recipe rebuilds: {err}"
        ) from None
    frozen = set(meta["frozen"])
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return model.train(bool(meta["training"]))


def _replay(model: nn.Module, morphs: list[dict[str, Any]], path: Path) -> nn.Module:
    from stablemorph.morphs import apply  # the legacy path only

    records = []
    for i, m in enumerate(morphs):
        try:
            model = apply(m["op"], model, m["target"], **{**m["kwargs"], "tol": math.inf})
        except Exception as err:
            raise CheckpointError(
                f"{path}: replaying morph {i} ({m.get('op')!r} on {m.get('target')!r}) failed: "
                f"{type(err).__name__}: {err}"
            ) from None
        replayed = history(model)[-1]
        fields = {k: v for k, v in m["report"].items() if k in _LEGACY_REPORT}
        report = MorphReport(op=m["op"], target=m["target"],
                             param_map=replayed.report.param_map, **fields)
        records.append(MorphRecord(m["op"], m["target"], m["kwargs"], report))
    object.__setattr__(model, HISTORY_ATTR, records)
    return model
