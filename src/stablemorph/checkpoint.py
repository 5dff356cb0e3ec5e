"""Save and load grown models: an architecture recipe plus a state dict, no pickled code.

A checkpoint is one ``torch.save`` file holding only tensors, plain Python values and a JSON
string, read back with ``torch.load(weights_only=True)``, so opening a file never runs code
from it. It holds:

- the **recipe**: the base architecture (the zoo's ``{"name", "kwargs"}`` that
  :func:`stablemorph.zoo.build_model` records on a model, or a user factory
  ``"package.module:function"`` with JSON keyword arguments), then every morph applied
  (``op``, ``target``, ``kwargs`` from :func:`stablemorph.record.history`, with the measured
  report);
- the model's ``state_dict``, parameter dtype, train/eval mode and frozen parameters;
- optionally an optimiser's and a scheduler's ``state_dict`` (with the names of the optimiser's
  parameters, so :meth:`Checkpoint.make_optimizer` can rebuild it) and a JSON ``extra`` dict;
- a SHA-256 digest of all of the above, so corruption that still unpickles is caught.

:func:`load` rebuilds the base (under a forked RNG: the caller's random state is untouched),
replays each morph with :func:`stablemorph.morphs.apply` (verification cannot fail there:
the replay runs on the base's random initial weights, which the saved state dict replaces),
then loads the state dict strictly. Everything happens on a fresh model that is returned only
when all steps succeeded; any failure (truncated or corrupt file, unknown format, a recipe
that does not rebuild the saved architecture) raises :class:`CheckpointError`.

A base built by a user factory runs that factory at load time, so :func:`load` imports and
calls it only when the caller lists it in ``allow_factories``: a checkpoint naming
``"os:system"`` is refused, never run. Files are written atomically (a temporary file in the
same directory, then ``os.replace``): a crash mid-save leaves the previous file intact.

A model changed by hand between morphs (a layer replaced outside stablemorph) is not
described by its recipe; its checkpoint fails to load with the mismatching parameter named.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stablemorph.morphs import apply
from stablemorph.optim import constructor_kwargs
from stablemorph.record import HISTORY_ATTR, MorphRecord, MorphReport, history
from stablemorph.zoo import BASE_ATTR, build_model

FORMAT = "stablemorph-checkpoint"
VERSION = 1
_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_REPORT_FIELDS = ("scheme", "max_abs", "max_rel", "residual", "zero_fraction",
                  "near_zero_fraction", "changed", "seconds", "notes")


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read: the message says which file and why."""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    ``model``: the rebuilt model (state loaded, on ``map_location``); ``optimizer_state`` /
    ``scheduler_state``: the saved ``state_dict``s (``None`` if none were saved);
    ``extra``: the caller's JSON dict; ``recipe``: the base and morphs it was rebuilt from;
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
        model: a zoo model or one built by ``base``, possibly morphed; a DDP or DataParallel
            wrapper is unwrapped. Not modified.
        path: the file to write (replaced atomically if it exists).
        optimizer: an optimiser over ``model``'s parameters, saved with their names.
        scheduler: its learning-rate scheduler (its ``state_dict``; lambdas are not saved:
            recreate the scheduler, then ``load_state_dict``).
        extra: JSON values to keep beside the model (step counter, config...).
        base: for a model not built by :func:`stablemorph.zoo.build_model`, the import path
            ``"package.module:function"`` of a function that builds its *unmorphed* base.
        base_kwargs: JSON keyword arguments for ``base``.

    Raises:
        CheckpointError: no recipe for the base, values that are not JSON / plain tensors,
            an optimiser holding tensors that are not the model's parameters.
    """
    model = _unwrap(model)
    path = Path(path)
    recipe_base = _base_recipe(model, base, base_kwargs)
    morphs = [_record_json(r) for r in history(model)]
    names = {id(p): n for n, p in model.named_parameters()}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "torch": torch.__version__,
        "base": recipe_base,
        "morphs": morphs,
        "dtype": str(_dtype(model)).removeprefix("torch."),
        "training": model.training,
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
        "extra": dict(extra or {}),
        "optimizer": None,
    }
    payload: dict[str, Any] = {"state_dict": dict(model.state_dict())}
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
) -> nn.Module:
    """The model saved at ``path``, rebuilt from its recipe with its state loaded.

    See :func:`load_checkpoint`; this returns only its ``model``.
    """
    return load_checkpoint(path, map_location=map_location,
                           allow_factories=allow_factories).model


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    allow_factories: Iterable[str] = (),
) -> Checkpoint:
    """Read ``path``, rebuild its model and return it with the saved optimiser/scheduler
    state.

    Args:
        path: a file written by :func:`save`.
        map_location: the device the model and the states are loaded onto.
        allow_factories: user factories (``"package.module:function"``) this call may import
            and run to build the base; zoo bases need none.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, corrupt, not a stablemorph checkpoint, of a
            newer format, names a factory not allowed, or its recipe does not rebuild a model
            its state dict fits. Nothing is returned half-loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = _read(path)
    meta = payload["meta"]
    model = _rebuild(meta, path, set(allow_factories))
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: the saved state does not fit the architecture its recipe rebuilds "
            f"(was the model changed outside stablemorph?): {err}"
        ) from None
    frozen = set(meta["frozen"])
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    model.train(bool(meta["training"]))
    model.to(map_location)
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
# writing


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return model.module
    return model


def _dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _base_recipe(model: nn.Module, base: str | None,
                 base_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if base is not None:
        if not isinstance(base, str) or not _FACTORY.match(base):
            raise CheckpointError(
                f"base must be an import path 'package.module:function', got {base!r}"
            )
        return {"factory": base, "kwargs": dict(base_kwargs or {})}
    if base_kwargs is not None:
        raise CheckpointError("base_kwargs given without base='package.module:function'")
    recorded = getattr(model, BASE_ATTR, None)
    if not isinstance(recorded, dict):
        raise CheckpointError(
            f"{type(model).__name__} was not built by stablemorph.zoo.build_model, so the "
            f"checkpoint cannot rebuild it: pass base='package.module:function' (a function "
            f"building the unmorphed model) and base_kwargs={{...}} (JSON)"
        )
    return dict(recorded)


def _record_json(record: MorphRecord) -> dict[str, Any]:
    report = {k: getattr(record.report, k) for k in _REPORT_FIELDS}
    return {"op": record.op, "target": record.target, "kwargs": record.kwargs,
            "report": report}


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


def _walk(value: Any) -> Iterator[bytes]:
    """A canonical byte stream of a plain value (types, keys, tensor dtypes, shapes, data)."""
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        yield f"T{t.dtype}{tuple(t.shape)}".encode()
        yield t.reshape(-1).view(torch.uint8).numpy().tobytes()
    elif isinstance(value, dict):
        yield f"D{len(value)}".encode()
        for k, v in value.items():
            yield repr(k).encode()
            yield from _walk(v)
    elif isinstance(value, list | tuple):
        yield f"L{len(value)}".encode()
        for v in value:
            yield from _walk(v)
    else:
        yield f"{type(value).__name__}:{value!r};".encode()


def _digest(payload: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for key in sorted(k for k in payload if k != "digest"):
        h.update(key.encode())
        for chunk in _walk(payload[key]):
            h.update(chunk)
    return h.hexdigest()


def _write_atomically(payload: dict[str, Any], path: Path) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# reading


def _read(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged archive
        raise CheckpointError(
            f"{path} is not a readable stablemorph checkpoint (truncated, corrupt, or not "
            f"written by stablemorph.checkpoint.save): {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("meta"), str):
        raise CheckpointError(f"{path} is not a stablemorph checkpoint (no recipe in it)")
    try:
        meta = json.loads(payload["meta"])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: its recipe is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a stablemorph checkpoint (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {meta.get('version')!r}; this stablemorph "
            f"reads version {VERSION}"
        )
    if payload.get("digest") != _digest(payload):
        raise CheckpointError(f"{path} is corrupt: its contents do not match their SHA-256 "
                              f"digest")
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} has no state dict")
    _check_meta(meta, path)
    payload["meta"] = meta
    return payload


def _check_meta(meta: dict[str, Any], path: Path) -> None:
    """The recipe's fields have the types the rest of the loader relies on."""
    base = meta.get("base")
    morphs = meta.get("morphs")
    problems = []
    if not (isinstance(base, dict) and isinstance(base.get("kwargs"), dict)
            and (isinstance(base.get("name"), str) or isinstance(base.get("factory"), str))):
        problems.append(f"base {base!r}")
    if not isinstance(morphs, list) or not all(
        isinstance(m, dict) and isinstance(m.get("op"), str) and isinstance(m.get("target"), str)
        and isinstance(m.get("kwargs"), dict) and isinstance(m.get("report"), dict)
        and set(m["report"]) <= set(_REPORT_FIELDS) for m in morphs
    ):
        problems.append("morphs")
    for key, kind in (("dtype", str), ("training", bool), ("frozen", list), ("extra", dict)):
        if not isinstance(meta.get(key), kind):
            problems.append(key)
    if problems:
        raise CheckpointError(f"{path}: malformed recipe ({', '.join(problems)})")


def _rebuild(meta: dict[str, Any], path: Path, allowed: set[str]) -> nn.Module:
    """A fresh model built from the recipe (base, dtype, morphs), on the CPU."""
    base = meta["base"]
    try:
        dtype = getattr(torch, meta["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise TypeError(meta["dtype"])
    except (AttributeError, TypeError):
        raise CheckpointError(f"{path}: unknown parameter dtype {meta['dtype']!r}") from None
    with torch.random.fork_rng(devices=[]):
        if "factory" in base:
            model = _from_factory(base, path, allowed)
        else:
            try:
                model = build_model(base["name"], **base["kwargs"])
            except (TypeError, ValueError, KeyError) as err:
                raise CheckpointError(f"{path}: cannot build its base {base!r}: {err}") from None
        model.to(dtype=dtype)
        model = _replay(model, meta["morphs"], path)
    return model


def _from_factory(base: dict[str, Any], path: Path, allowed: set[str]) -> nn.Module:
    factory = base["factory"]
    if factory not in allowed:
        raise CheckpointError(
            f"{path} builds its base with {factory!r}; loading would import and run it. If "
            f"you trust it, pass allow_factories=[{factory!r}]"
        )
    module_name, _, attr = factory.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
        model = fn(**base["kwargs"])
    except Exception as err:
        raise CheckpointError(f"{path}: building its base with {factory!r} failed: "
                              f"{type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{path}: {factory!r} returned a {type(model).__name__}, not an "
                              f"nn.Module")
    setattr(model, BASE_ATTR, dict(base))
    return model


def _replay(model: nn.Module, morphs: list[dict[str, Any]], path: Path) -> nn.Module:
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
        # The saved report holds what was measured at morph time; the replay ran on random
        # weights. Its param_map is structural and the same.
        report = MorphReport(op=m["op"], target=m["target"],
                             param_map=replayed.report.param_map, **m["report"])
        records.append(MorphRecord(m["op"], m["target"], m["kwargs"], report))
    object.__setattr__(model, HISTORY_ATTR, records)
    return model


def _to_device(state: Any, device: str | torch.device) -> Any:
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_to_device(v, device) for v in state)
    return state

