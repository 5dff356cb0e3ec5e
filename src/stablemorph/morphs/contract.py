"""What every morph promises (DESIGN.md section 4), implemented once.

:func:`run_morph` takes a morph's *surgery* (a function that edits a deep copy of the model
and says which parameters it made or changed) and wraps it in the contract:

- the caller's model is never modified: surgery runs on a deep copy, and on any error the
  copy is dropped;
- precondition checks with clear messages: DDP/DataParallel wrappers, unknown layer names
  (with close-name suggestions), non-finite weights, an unknown scheme;
- a probe batch (the caller's ``inputs``: a tensor, positional inputs or a dict of keyword
  inputs; or random data of ``input_shape``, or a shape inferred from the model) on which
  the parent runs first (a probe that does not fit, holds NaN or is empty is refused as such,
  before any work) and then parent and child are compared in eval *and* train mode
  (:mod:`stablemorph.verify`); beyond the tolerance (float32: ``max_rel <= 1e-5``, or within
  ``NOISE_FACTOR`` times the parent's own float32-vs-float64 noise) a :class:`MorphError`
  names the layer; the child's module calls before the change are answered from the
  parent's run (:mod:`stablemorph.replay`), and a check that misses with such answers is
  run again in full before it is judged;
- the memory the morph needs is estimated up front (:mod:`.memory`) and a morph that cannot
  fit is refused before any work;
- the caller's hooks on replaced layers are carried to the child (:mod:`.hooks`) or refused;
- the caller's global RNG streams do not move (``torch.random.fork_rng``);
- a ``torch.compile``'d model is morphed through its module (layer names without the
  ``_orig_mod.`` prefix); the child is that module, uncompiled;
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
from stablemorph.morphs import hooks, memory
from stablemorph.record import (
    MorphRecord,
    MorphReport,
    ParamOrigin,
    append_record,
    history,
    mark_new_entries,
)
from stablemorph.schemes import step_rule_on
from stablemorph.solvers import DecompositionError
from stablemorph.verify import (
    NOISE_FACTOR,
    Probe,
    VerifyError,
    capture_inputs,
    compare,
    default_tolerance,
    preserved_state,
    reference,
    refuse_meta,
)

COMPILED_PREFIX = "_orig_mod."

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
    surgery that renames unchanged parameters lists only the others); ``measures``: child
    module name -> a measurement on the input that module receives in the verification's own
    eval-mode forward (no extra forward), returning report notes, run once the check passed.
    """

    origins: dict[str, ParamOrigin] = field(default_factory=dict)
    residual: float | None = None
    notes: list[str] = field(default_factory=list)
    changed: list[str] | None = None
    measures: dict[str, Callable[[Tensor], list[str]]] = field(default_factory=dict)


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


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper (``model`` itself otherwise)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) and type(model).__name__ == \
        "OptimizedModule" else model


def check_model(model: nn.Module) -> None:
    """Refuse wrapped models, meta-device models and models with non-finite parameters or
    buffers."""
    refuse_wrapped(model)
    try:
        refuse_meta(model)
    except VerifyError as err:
        raise MorphError(str(err)) from None
    for kind, items in (("parameter", model.named_parameters()),
                        ("buffer", model.named_buffers())):
        for name, t in items:
            # a finite sum proves every element finite (NaN and inf propagate) and costs a
            # tenth of the elementwise test, which runs only when the sum is not finite
            if t.is_floating_point() and not (bool(torch.isfinite(t.sum()))
                                              or bool(torch.isfinite(t).all())):
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
    inner = unwrap_compiled(model)
    if inner is not model and target.startswith(COMPILED_PREFIX):
        raise MorphError(
            f"{op}: the model is torch.compile'd: name its layers as in the original model, "
            f"without the private {COMPILED_PREFIX!r} prefix: {target[len(COMPILED_PREFIX):]!r}"
        )
    try:
        layer = find_module(inner, target)
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


def _hf_probe(model: nn.Module, seed: int) -> Probe | None:
    """A Hugging Face model's probe from its config (``main_input_name``: random token ids,
    batch 2, 8 tokens, with an attention mask; or random pixel values); ``None`` for any
    other model."""
    kind = {"input_ids": "tokens", "pixel_values": "pixels"}.get(
        getattr(model, "main_input_name", None))  # type: ignore[arg-type]
    if kind is None or getattr(model, "config", None) is None:
        return None
    from stablemorph.hf.probe import make_probe  # imports no transformers

    return Probe.of(make_probe(model, kind, None, seed))


def probe_batch(
    model: nn.Module,
    inputs: Any,
    input_shape: Sequence[int] | None,
    seed: int,
    target: str,
) -> tuple[Probe, list[int] | None]:
    """The probe inputs and the (JSON-able) input shape to record.

    ``inputs`` wins: a tensor, a sequence of positional inputs, or a dict of keyword inputs
    (``model(**inputs)``, e.g. a tokenizer's output); else random normal data of
    ``input_shape`` (batch dim included) in the model's dtype and device; else a Hugging
    Face model's own probe (:func:`_hf_probe`); else a shape inferred by
    :func:`_infer_shape`. The recorded shape is the single positional input's (``None`` for
    several or keyword inputs: a replay needs them passed again).
    """
    if inputs is not None:
        try:
            batch = Probe.of(inputs)
        except VerifyError as err:
            raise MorphError(f"layer {target!r}: {err}") from None
        shape = list(batch[0].shape) if len(batch) == 1 and not batch.kwargs and \
            isinstance(batch[0], Tensor) and batch[0].is_floating_point() else None
        return batch, shape
    if input_shape is None:
        own = _hf_probe(model, seed)
        if own is not None:
            return own, None
        input_shape = _infer_shape(model)
        if input_shape is None:
            raise MorphError(
                f"layer {target!r}: no probe batch to verify the morph on: pass inputs=<a "
                f"batch> or input_shape=(N, C, H, W) (batch dim included), or set "
                f"model.input_shape; it cannot be inferred for {type(model).__name__}"
            )
    shape = [int(s) for s in input_shape]
    if not shape or any(s < 1 for s in shape):
        raise MorphError(f"layer {target!r}: input_shape {shape} must be positive sizes, the "
                         f"batch dim included (an empty probe verifies nothing)")
    gen = torch.Generator().manual_seed(seed + 7919)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return Probe((x.to(model_device(model), model_dtype(model)),)), shape


# ----------------------------------------------------------------------------------------------
# the driver


def run_morph(
    op: str,
    model: nn.Module,
    target: str,
    scheme: str,
    kwargs: dict[str, Any],
    surgery: SurgeryFn,
    inputs: Any,
    input_shape: Sequence[int] | None,
    tol: float | None,
) -> nn.Module:
    """Run ``surgery`` on a deep copy of ``model`` under the contract (module docstring).

    ``kwargs`` are the morph's resolved options (JSON-able; ``seed`` included); the probe's
    input shape is added as ``input_shape`` so that a replay can rebuild a probe. ``tol``:
    the largest accepted ``max_rel``; ``None``: the dtype's :func:`default_tolerance` or a
    deviation within ``NOISE_FACTOR`` times the parent's float noise.
    """
    base = unwrap_compiled(model)
    cuda = sorted({p.device.index or 0 for p in base.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda):  # the caller's RNG streams do not move
        child = _run_morph(op, base, target, scheme, kwargs, surgery, inputs, input_shape,
                           tol)
    if base is not model:
        report = history(child)[-1].report
        report.notes.append("the parent was torch.compile'd: the child is the morphed "
                            "uncompiled module; call torch.compile(child) to compile it")
    return child


def _run_morph(op: str, model: nn.Module, target: str, scheme: str, kwargs: dict[str, Any],
               surgery: SurgeryFn, inputs: Any, input_shape: Sequence[int] | None,
               tol: float | None) -> nn.Module:
    start = time.perf_counter()
    check_model(model)
    seed = int(kwargs.get("seed", 0))
    probe, shape = probe_batch(model, inputs, input_shape, seed, target)
    try:
        parent_hooks = hooks.collect(model)
    except hooks.HookError as err:
        raise MorphError(f"{op} {target!r}: {err}") from None
    hooked = {h.layer for h in parent_hooks}
    layer = dict(model.named_modules()).get(target)  # None: a target that is no module
    seen: hooks.Calls = {}  # the hooked layers' input/output shapes in the parent
    ref_holder: list[Any] = []

    def run_reference(m: nn.Module) -> None:
        ref_holder.append(reference(m, probe, noise_floor=False))

    try:
        target_calls = hooks.io_shapes(model, {target}, run_reference)[target]
        if parent_hooks:
            seen = hooks.io_shapes(model, hooked, lambda m: _probe_eval(m, probe))
    except VerifyError as err:
        raise MorphError(f"{op} {target!r}: {err}") from err
    ref = ref_holder[0]
    outputs = target_calls[0][1] if target_calls else []
    try:
        mem_note = memory.check(model, op, target, layer, kwargs, outputs, model_dtype(model),
                                model_device(model))
    except MemoryError as err:
        raise MorphError(str(err)) from None

    child = copy.deepcopy(model)
    try:
        done = surgery(child, probe)
    except (GraphError, DecompositionError) as err:
        raise MorphError(f"{op} {target!r}: {err}") from err
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if not isinstance(err, torch.OutOfMemoryError | MemoryError) and \
                "allocate" not in str(err).lower():
            raise
        raise MorphError(f"{op} {target!r}: out of memory building the child "
                         f"({type(err).__name__}: {err}); {mem_note}") from err

    untied = _broken_ties(model, child)
    if untied:
        raise MorphError(
            f"{op} {target!r}: {untied} are one tied tensor in the parent, and this morph "
            f"replaces the layer holding part of it: the copies would train apart. Untie "
            f"them first (give each layer its own parameter) or morph another layer")
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
    if step_rule_on(scheme, kwargs.get("step_rule")):
        mark_new_entries(param_map)  # the stable scheme's step rule (stablemorph.step_rule)

    carried = ""
    if parent_hooks:
        try:
            places = hooks.carry(child, parent_hooks)
            now = hooks.io_shapes(child, set(places), lambda m: _probe_eval(m, probe))
            hooks.check_shapes(parent_hooks, places, seen, now)
        except hooks.HookError as err:
            raise MorphError(f"{op} {target!r}: {err}") from None
        carried = (f"{len(parent_hooks)} hook(s) carried to the child's layers "
                   f"{sorted(set(places))} (hooked in the parent: {sorted(hooked)})")
    try:
        with capture_inputs({n: child.get_submodule(n) for n in done.measures}) as inputs:
            check = compare(ref, child, model)
            limit = default_tolerance(model_dtype(model)) if tol is None else tol
            if check.replayed and not check.ok(limit, noise=False):
                inputs.clear()  # a miss is judged on a run without replay (stablemorph.replay)
                check = compare(ref, child)
    except VerifyError as err:
        raise MorphError(f"{op} {target!r} (scheme {scheme!r}): {err}") from err
    broken = [t for t in check.tensors if not math.isfinite(t.max_abs)]
    if broken:
        raise MorphError(
            f"{op} {target!r} (scheme {scheme!r}): the child's {broken[0].path} holds NaN or "
            f"inf in {broken[0].mode} mode where the parent's is finite"
            + (f" (residual {done.residual:.2e})" if done.residual is not None else "")
        )
    if tol is None and not check.ok(limit, noise=False):
        # Only a child outside the fixed tolerance needs the parent's float64 noise floor
        # (a float64 copy of the parent run in every mode: most of a fast morph's cost).
        try:
            check = compare(reference(model, probe), child)
        except VerifyError as err:
            raise MorphError(f"{op} {target!r} (scheme {scheme!r}): {err}") from err
    if not check.ok(limit, noise=tol is None):
        worst = [t for t in check.tensors if not t.ok(limit, noise=tol is None)]
        floor = "" if check.noise_abs is None or tol is not None else (
            f"; the parent's own float noise is max_abs={check.noise_abs:.2e} (accepted up to "
            f"{NOISE_FACTOR:g}x)")
        modes = ", ".join(f"{m}: max_rel={r:.2e}" for m, (_, r) in check.per_mode.items())
        raise MorphError(
            f"{op} {target!r} (scheme {scheme!r}) does not preserve the function: {modes} "
            f"> tolerance {limit:.1e}" + (f" (residual {done.residual:.2e})"
                                          if done.residual is not None else "")
            + (f" at {worst[0].path}" if worst else "") + floor
        )
    named = dict(child.named_parameters())
    zeros, near = sparsity(*(named[n] for n in changed)) if changed else (0.0, 0.0)
    measured = [note for name, measure in done.measures.items() if name in inputs
                for note in measure(inputs[name])]
    notes = [*done.notes, *measured, f"{zeros:.1%} exact zeros, {near:.1%} near zeros in the "
                          f"{len(changed)} new or changed parameters",
             f"verified: {check.describe()}", *check.notes, mem_note]
    if carried:
        notes.append(carried)
    report = MorphReport(
        op=op, target=target, scheme=scheme, max_abs=check.max_abs, max_rel=check.max_rel,
        residual=done.residual, zero_fraction=zeros, near_zero_fraction=near, changed=changed,
        param_map=param_map, seconds=time.perf_counter() - start, notes=notes,
    )
    record_kwargs = {**kwargs, "input_shape": shape}
    json.dumps(record_kwargs)  # the replay recipe must stay JSON
    append_record(child, MorphRecord(op, target, record_kwargs, report))
    return child


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Names sharing one parameter object (weight tying), groups of two or more."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _broken_ties(parent: nn.Module, child: nn.Module) -> list[str] | None:
    """A parent tie group the child no longer holds as one tensor (by as many names), or
    ``None``. The child is a deep copy, so a kept tie is still one object there."""
    held = dict(child.named_parameters(remove_duplicate=False))
    for names in _tied_groups(parent):
        present = [held[n] for n in names if n in held]
        if not present:
            continue
        holders = sum(p is present[0] for p in held.values())
        if holders < len(names) or any(p is not present[0] for p in present):
            return names
    return None


def _probe_eval(model: nn.Module, probe: Probe) -> None:
    """One eval-mode forward of ``model`` on ``probe``, state restored, RNG untouched."""
    with preserved_state(model), torch.no_grad(), torch.random.fork_rng(
            devices=probe.cuda_devices()):
        model.eval()
        probe.run(model)


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
