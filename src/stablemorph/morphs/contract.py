"""What every morph promises (DESIGN.md section 4), implemented once.

:func:`run_morph` takes a morph's *surgery* (a function that edits a deep copy of the model
and says which parameters it made or changed) and wraps it in the contract:

- the caller's model is never modified: surgery runs on a deep copy, and on any error the
  copy is dropped;
- precondition checks with clear messages: DDP/DataParallel wrappers, unknown layer names
  (with close-name suggestions), non-finite weights, an unknown scheme;
- a probe batch (the caller's ``inputs``, or random data of ``input_shape``, or a shape
  inferred from the model) on which parent and child are compared in eval *and* train mode;
  beyond the tolerance (float32: ``max_rel <= 1e-5``) a :class:`MorphError` names the layer;
- the child gets a :class:`~stablemorph.record.MorphRecord` (replayable ``op``, ``target``,
  JSON-able ``kwargs``; the report with deviations, zero fractions, seconds and a
  ``param_map`` entry for *every* child parameter).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from stablemorph.equation import sparsity
from stablemorph.graph import GraphError, find_module
from stablemorph.record import MorphRecord, MorphReport, ParamOrigin, append_record, history
from stablemorph.solvers import DecompositionError
from stablemorph.verify import default_tolerance, verify

SCHEMES = ("stable", "netmorph", "net2net")


class MorphError(ValueError):
    """A morph was refused or failed its own check; the message names the layer and the
    reason. The caller's model is unchanged."""


@dataclass
class Surgery:
    """What a morph's surgery did to the child.

    ``origins``: child parameter name -> origin, for every new or changed parameter (all
    others must be the parent's parameter of the same name, unchanged); ``residual``: the
    morphism equation's relative residual where one was solved; ``changed``: the new or
    changed parameters whose zeros are counted (default: every name in ``origins``; a
    surgery that renames unchanged parameters lists only the others).
    """

    origins: dict[str, ParamOrigin] = field(default_factory=dict)
    residual: float | None = None
    notes: list[str] = field(default_factory=list)
    changed: list[str] | None = None


SurgeryFn = Callable[[nn.Module, tuple[Tensor, ...]], Surgery]


# ----------------------------------------------------------------------------------------------
# preconditions


def refuse_wrapped(model: nn.Module) -> None:
    """Refuse DDP/DataParallel wrappers (first thing every morph does)."""
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        raise MorphError(
            f"cannot morph a {type(model).__name__}-wrapped model: its replicas and gradient "
            f"buckets would keep the old parameters. Use stablemorph.ddp.morph_ddp, or morph "
            f"model.module and wrap the child again"
        )


def check_model(model: nn.Module) -> None:
    """Refuse wrapped models and models with non-finite parameters or buffers."""
    refuse_wrapped(model)
    for kind, items in (("parameter", model.named_parameters()),
                        ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                layer = name.rpartition(".")[0] or name
                raise MorphError(
                    f"layer {layer!r}: {kind} {name!r} has non-finite values (NaN or inf); "
                    f"a morph of it cannot preserve the function"
                )


def check_scheme(scheme: str, allowed: Sequence[str] = SCHEMES) -> None:
    if scheme not in allowed:
        raise MorphError(f"unknown scheme {scheme!r}; choose one of {tuple(allowed)}")


def get_layer(model: nn.Module, target: str, kinds: tuple[type, ...], op: str) -> nn.Module:
    """The submodule ``target``, checked to be one of ``kinds`` (after refusing wrappers)."""
    refuse_wrapped(model)
    try:
        layer = find_module(model, target)
    except GraphError as err:
        raise MorphError(str(err)) from None
    if not isinstance(layer, kinds):
        names = ", ".join(k.__name__ for k in kinds)
        raise MorphError(
            f"{op}: layer {target!r} is a {type(layer).__name__}; supported: {names}"
        )
    return layer


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# the probe batch


def _infer_shape(model: nn.Module) -> list[int] | None:
    """An input shape from ``model.input_shape``, the last morph's record, or a first layer
    that is Linear (batch 8)."""
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        return [int(s) for s in shape]
    for record in reversed(history(model)):
        shape = record.kwargs.get("input_shape")
        if shape is not None:
            return list(shape)
    first = next((m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d
                                                          | nn.Conv3d)), None)
    if isinstance(first, nn.Linear):
        return [8, first.in_features]
    return None


def probe_batch(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor] | None,
    input_shape: Sequence[int] | None,
    seed: int,
    target: str,
) -> tuple[tuple[Tensor, ...], list[int] | None]:
    """The probe inputs and the (JSON-able) input shape to record.

    ``inputs`` wins; else random normal data of ``input_shape`` (batch dim included) in the
    model's dtype and device; else a shape inferred by :func:`_infer_shape`.
    """
    if inputs is not None:
        batch = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        shape = list(batch[0].shape) if len(batch) == 1 else None
        return batch, shape
    if input_shape is None:
        input_shape = _infer_shape(model)
        if input_shape is None:
            raise MorphError(
                f"layer {target!r}: no probe batch to verify the morph on: pass inputs=<a "
                f"batch> or input_shape=(N, C, H, W) (batch dim included), or set "
                f"model.input_shape; it cannot be inferred for {type(model).__name__}"
            )
    shape = [int(s) for s in input_shape]
    gen = torch.Generator().manual_seed(seed + 7919)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (x.to(model_device(model), model_dtype(model)),), shape


# ----------------------------------------------------------------------------------------------
# the driver


def run_morph(
    op: str,
    model: nn.Module,
    target: str,
    scheme: str,
    kwargs: dict[str, Any],
    surgery: SurgeryFn,
    inputs: Tensor | Sequence[Tensor] | None,
    input_shape: Sequence[int] | None,
    tol: float | None,
) -> nn.Module:
    """Run ``surgery`` on a deep copy of ``model`` under the contract (module docstring).

    ``kwargs`` are the morph's resolved options (JSON-able; ``seed`` included); the probe's
    input shape is added as ``input_shape`` so that a replay can rebuild a probe.
    """
    start = time.perf_counter()
    check_model(model)
    seed = int(kwargs.get("seed", 0))
    probe, shape = probe_batch(model, inputs, input_shape, seed, target)
    child = copy.deepcopy(model)
    try:
        done = surgery(child, probe)
    except (GraphError, DecompositionError) as err:
        raise MorphError(f"{op} {target!r}: {err}") from err

    parent_params = dict(model.named_parameters())
    param_map: dict[str, ParamOrigin] = {}
    for name, p in child.named_parameters():
        if name in done.origins:
            param_map[name] = done.origins[name]
        elif name in parent_params and parent_params[name].shape == p.shape:
            param_map[name] = ParamOrigin(source=name)
        else:  # a surgery bug, not a user error
            raise RuntimeError(f"{op}: child parameter {name!r} has no recorded origin")
    changed = list(done.origins) if done.changed is None else list(done.changed)

    try:
        check = verify(model, child, probe)
    except Exception as err:
        raise MorphError(
            f"{op} {target!r}: running the child on the probe batch failed "
            f"({type(err).__name__}: {err}); does forward read the replaced layer's "
            f"attributes directly?"
        ) from err
    limit = default_tolerance(model_dtype(model)) if tol is None else tol
    if not check.ok(limit):
        modes = ", ".join(f"{m}: max_rel={r:.2e}" for m, (_, r) in check.per_mode.items())
        raise MorphError(
            f"{op} {target!r} (scheme {scheme!r}) does not preserve the function: {modes} "
            f"> tolerance {limit:.1e}" + (f" (residual {done.residual:.2e})"
                                          if done.residual is not None else "")
        )
    named = dict(child.named_parameters())
    zeros, near = sparsity(*(named[n] for n in changed)) if changed else (0.0, 0.0)
    notes = [*done.notes, f"{zeros:.1%} exact zeros, {near:.1%} near zeros in the "
                          f"{len(changed)} new or changed parameters"]
    report = MorphReport(
        op=op, target=target, scheme=scheme, max_abs=check.max_abs, max_rel=check.max_rel,
        residual=done.residual, zero_fraction=zeros, near_zero_fraction=near, changed=changed,
        param_map=param_map, seconds=time.perf_counter() - start, notes=notes,
    )
    record_kwargs = {**kwargs, "input_shape": shape}
    json.dumps(record_kwargs)  # the replay recipe must stay JSON
    append_record(child, MorphRecord(op, target, record_kwargs, report))
    return child


# ----------------------------------------------------------------------------------------------
# helpers for surgeries


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scale_of(t: Tensor, fan_in: int) -> float:
    """The standard deviation of a trained tensor, or He's when it has none (all equal)."""
    std = float(t.detach().double().std()) if t.numel() > 1 else 0.0
    return std if std > 0 and math.isfinite(std) else math.sqrt(2.0 / max(fan_in, 1))


def randn(shape: Sequence[int], std: float, gen: torch.Generator, like: Tensor) -> Tensor:
    """Normal random values in ``like``'s dtype and device, drawn reproducibly on the CPU."""
    x = torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * std
    return x.to(like.device, like.dtype)


def new_parameter(value: Tensor, like: nn.Parameter | None) -> nn.Parameter:
    """A parameter holding ``value`` with ``like``'s requires_grad (True without one)."""
    return nn.Parameter(value.detach().clone(),
                        requires_grad=like.requires_grad if like is not None else True)


def adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give a freshly built replacement ``old``'s train/eval mode, device, dtype and (from
    its first parameter) requires_grad."""
    ref = next(iter(old.parameters()), None)
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype)
        for p in new.parameters():
            p.requires_grad_(ref.requires_grad)
    new.train(old.training)
    return new
