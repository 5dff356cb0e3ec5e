"""Carry an optimiser (and its learning-rate scheduler) over a morph.

:func:`transfer_optimizer` reads only the ``param_map`` of the child's latest
:class:`~stablemorph.record.MorphRecord` (one :class:`~stablemorph.record.ParamOrigin` per child
parameter), so it works the same for every morph type and scheme. It returns a *new* optimiser
of the same class, hyper-parameters and param groups over the child's parameters; the caller's
optimiser, its state and the parent are not modified (every state tensor is copied).

State of a child parameter, by origin:

- **unchanged** (``index is None``): the source's state, copied as is (``step`` included).
- **indexed** (``child.select(dim, k) = parent.select(dim, index[k]) * scale[k]``): every state
  tensor of the parameter's shape is indexed the same way. A *first-moment* tensor (SGD's
  ``momentum_buffer``, Adam's ``exp_avg``) is a displacement of the weights, so it is scaled
  like them (``* scale``); a *second-moment* tensor (``exp_avg_sq``, ``max_exp_avg_sq``,
  RMSprop's ``square_avg``) by ``scale ** 2``; Adamax's ``exp_inf`` by ``|scale|``. Why the
  weights' map: a Net2Net copy with outgoing share ``s`` then moves, under momentum alone,
  exactly as the parent's unit moved, so the child's momentum step changes the function
  exactly as the parent's did (tested); for Adam, ``exp_avg / sqrt(exp_avg_sq)`` is the
  parent's, so each entry's next step has the parent's size. Scalars (``step``) are kept.
- **new units** of an indexed parameter (``index[k] < 0``): first moments 0; second moments
  (and ``exp_inf``) the *mean* of the source's, not 0. The step count is one tensor per
  parameter and stays the parent's ``t``; Adam's bias correction then divides by
  ``1 - beta ** t`` (about 1 for a trained model), so zero moments would make a new entry's
  first update ``lr (1 - b1) / sqrt(1 - b2)``, about ``3.2 lr``: three times a full Adam step
  (``0.98 lr`` at ``t = 100``, ``2.5 lr`` at ``t = 1000``). With the mean second moment it
  starts below the typical step and grows as ``exp_avg`` fills in.
- **fresh** (``source is None``: decomposed factors, new layers, a re-made kernel): no state.
  The optimiser starts it from scratch at its first step (Adam's ``step = 0``), so Adam's
  bias correction is exact for it.

Param groups (one rule for every morph): a child parameter with a source joins its source's
group, and is left out when the optimiser did not hold its source (frozen or excluded).
A fresh parameter stands in for the *nearest* parent parameter: the one sharing the most
leading components of its dotted name, ties broken by the same last component (``bias``
before ``weight`` for a bias), then the same number of dimensions (so a per-channel slope
goes with biases, matching the usual "no weight decay on 1-D tensors" split), then parent
order; it joins that parameter's group, or is left out where the optimiser did not hold it.
A fresh parameter sharing no leading name component with any parent parameter joins group
0. Fresh parameters with ``requires_grad=False`` are left out. Groups keep their order (an
emptied group stays, so per-group scheduler lists still line up).

Schedulers: :func:`transfer_scheduler` returns a copy of a scheduler driving the new
optimiser (same ``last_epoch``, base rates and lambdas); the original keeps driving the old
optimiser. Optimiser hooks (``register_step_pre_hook`` ...) are not carried over.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from collections.abc import Callable, Mapping
from functools import wraps
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from stablemorph.record import MorphRecord, ParamOrigin, history

# State keys of the stock optimisers that hold one value per parameter entry, by how they
# map: "first" like the weights, "square" like their square, "magnitude" like |weights|.
STATE_KINDS: dict[str, str] = {
    "momentum_buffer": "first",
    "exp_avg": "first",
    "grad_avg": "first",
    "exp_avg_sq": "square",
    "max_exp_avg_sq": "square",
    "square_avg": "square",
    "exp_inf": "magnitude",
}
_SCALE_POWER = {"first": 1, "square": 2, "magnitude": 1}


def transfer_optimizer(
    optimizer: torch.optim.Optimizer, parent: nn.Module, child: nn.Module
) -> torch.optim.Optimizer:
    """A new optimiser over ``child``'s parameters carrying ``optimizer``'s state (module
    docstring for the rules).

    Args:
        optimizer: an optimiser over (some of) ``parent``'s parameters, e.g. SGD with
            momentum, Adam, AdamW, RMSprop. Not modified.
        parent: the model the morph was applied to. Not modified.
        child: the model the morph returned; its latest history record describes the morph.

    Returns:
        An optimiser of ``type(optimizer)`` with the same defaults and one param group per
        original group (same hyper-parameters, ``lr`` and ``initial_lr`` included).

    Raises:
        ValueError: ``child`` is not ``parent`` plus one morph; the optimiser holds a tensor
            that is not one of ``parent``'s parameters; a state tensor whose shape does not
            match its parameter, or whose key is unknown (the optimiser is not supported).
    """
    record = _last_morph(parent, child)
    parent_params = dict(parent.named_parameters())
    name_of = {id(p): n for n, p in parent_params.items()}
    group_of: dict[str, int] = {}
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in name_of:
                raise ValueError(
                    f"transfer_optimizer: the optimiser holds a {tuple(p.shape)} tensor that is "
                    f"not a parameter of the parent {type(parent).__name__}"
                )
            group_of[name_of[id(p)]] = gi

    param_map = record.report.param_map
    groups: list[list[tuple[str, nn.Parameter]]] = [[] for _ in optimizer.param_groups]
    states: dict[nn.Parameter, dict[str, Any]] = {}
    for name, p in child.named_parameters():
        if name not in param_map:
            raise ValueError(
                f"transfer_optimizer: the {record.op} record of {record.target!r} has no "
                f"origin for child parameter {name!r}"
            )
        origin = param_map[name]
        if origin.is_fresh:
            if not p.requires_grad:
                continue
            stand_in = _nearest(name, p, parent_params)
            if stand_in is None:
                groups[0].append((name, p))
            elif stand_in in group_of:
                groups[group_of[stand_in]].append((name, p))
            continue
        source = origin.source
        if source not in parent_params:
            raise ValueError(
                f"transfer_optimizer: child parameter {name!r} comes from {source!r}, which "
                f"is not a parameter of the parent"
            )
        if source not in group_of:
            continue
        _check_shapes(name, p, source, parent_params[source], origin)
        groups[group_of[source]].append((name, p))
        old_state = optimizer.state.get(parent_params[source])
        if old_state:
            states[p] = _map_state(old_state, origin, parent_params[source], name,
                                   type(optimizer).__name__)

    named = any("param_names" in g for g in optimizer.param_groups)
    new_groups = []
    for group, members in zip(optimizer.param_groups, groups, strict=True):
        hyper = {k: copy.deepcopy(v) for k, v in group.items()
                 if k not in ("params", "param_names")}
        params = members if named else [p for _, p in members]
        new_groups.append({**hyper, "params": params})
    cls = type(optimizer)
    new = cls(new_groups, **constructor_kwargs(cls, optimizer.defaults))
    for p, state in states.items():
        new.state[p] = state
    return new


def transfer_scheduler(scheduler: LRScheduler, optimizer: torch.optim.Optimizer) -> LRScheduler:
    """A copy of ``scheduler`` (same class, ``last_epoch``, base rates, lambdas, nested
    schedulers) driving ``optimizer``, typically the result of :func:`transfer_optimizer`.

    ``scheduler`` keeps driving its own optimiser and is not modified. The new optimiser must
    have as many param groups as the old one (:func:`transfer_optimizer` keeps them).
    """
    old = scheduler.optimizer
    if len(old.param_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"transfer_scheduler: the scheduler drives {len(old.param_groups)} param groups, "
            f"the new optimiser has {len(optimizer.param_groups)}"
        )
    # Every reference to the old optimiser (nested schedulers included) becomes the new one.
    new = copy.deepcopy(scheduler, memo={id(old): optimizer})
    _track_step_calls(optimizer)
    return new


def _last_morph(parent: nn.Module, child: nn.Module) -> MorphRecord:
    """The record of the one morph that made ``child`` from ``parent``."""
    before, after = history(parent), history(child)
    same = len(after) == len(before) + 1 and all(
        (a.op, a.target, a.kwargs) == (b.op, b.target, b.kwargs)
        for a, b in zip(before, after, strict=False)
    )
    if not same:
        raise ValueError(
            f"transfer_optimizer: the child is not the parent plus one morph (the parent has "
            f"{len(before)} morph records, the child {len(after)}); transfer after each morph"
        )
    return after[-1]


def _nearest(name: str, p: Tensor, parent_params: dict[str, nn.Parameter]) -> str | None:
    """The parent parameter a fresh child parameter stands in for (module docstring), or
    ``None`` when none shares a leading name component."""
    parts = name.split(".")

    def score(item: tuple[int, tuple[str, nn.Parameter]]) -> tuple[int, bool, bool, int]:
        order, (other, q) = item
        o_parts = other.split(".")
        shared = 0
        for a, b in zip(parts[:-1], o_parts[:-1], strict=False):
            if a != b:
                break
            shared += 1
        return shared, parts[-1] == o_parts[-1], p.dim() == q.dim(), -order

    if not parent_params:
        return None
    best = max(enumerate(parent_params.items()), key=score)
    return best[1][0] if score(best)[0] > 0 else None


def _check_shapes(name: str, p: Tensor, source: str, q: Tensor, origin: ParamOrigin) -> None:
    expected = list(q.shape)
    if origin.index is not None:
        expected[origin.dim] = origin.index.numel()
    if list(p.shape) != expected:
        raise ValueError(
            f"transfer_optimizer: child parameter {name!r} {tuple(p.shape)} does not match its "
            f"origin {source!r} {tuple(q.shape)} (expected {tuple(expected)})"
        )


def _map_state(state: dict[str, Any], origin: ParamOrigin, source: Tensor, name: str,
               optimizer: str) -> dict[str, Any]:
    """The child's state for one parameter from its source's ``state``; new tensors only."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            out[key] = copy.deepcopy(value)
            continue
        if value.shape != source.shape or value.dim() == 0:
            out[key] = value.clone()  # scalars such as Adam's step
            continue
        if key not in STATE_KINDS:
            raise ValueError(
                f"transfer_optimizer: {optimizer} keeps a per-entry state {key!r} for "
                f"{name!r} whose mapping is unknown; supported keys: {sorted(STATE_KINDS)}"
            )
        if origin.index is None:
            out[key] = value.clone()
        else:
            out[key] = _index_state(value, origin, STATE_KINDS[key])
    return out


def _index_state(value: Tensor, origin: ParamOrigin, kind: str) -> Tensor:
    """``value`` indexed along ``origin.dim`` by ``origin.index``, scaled by ``scale **
    power`` (``|scale|`` for magnitudes); new units (index < 0): 0 for first moments, the
    mean for the others."""
    index = origin.index.to(value.device)
    taken = value.index_select(origin.dim, index.clamp(min=0))
    shape = [1] * value.dim()
    shape[origin.dim] = -1
    if origin.scale is not None:
        scale = origin.scale.to(device=value.device, dtype=torch.float64)
        scale = scale.abs() if kind == "magnitude" else scale ** _SCALE_POWER[kind]
        taken = taken * scale.to(value.dtype).view(shape)
    fill = 0.0 if kind == "first" else float(value.double().mean())
    new = (index < 0).view(shape)
    return torch.where(new, torch.full_like(taken, fill), taken)


def constructor_kwargs(cls: type[torch.optim.Optimizer], defaults: Mapping[str, Any]
                       ) -> dict[str, Any]:
    """The entries of an optimiser's ``defaults`` that ``cls``'s constructor accepts (AdamW
    keeps a ``decoupled_weight_decay`` default its constructor does not take)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in defaults.items() if k in accepted}


def _track_step_calls(optimizer: torch.optim.Optimizer) -> None:
    """Mark ``optimizer.step`` calls the way a scheduler's constructor does, so the scheduler
    can check it is stepped after the optimiser (PyTorch's ``_opt_called`` convention)."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    func: Callable[..., Any] = optimizer.step.__func__  # type: ignore[attr-defined]
    ref = weakref.ref(optimizer)  # a bound method here would make a reference cycle

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return func(opt, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]
