"""Carry an optimiser (and its learning-rate scheduler) over one morph or a chain of morphs.

:func:`transfer_optimizer` reads only the ``param_map`` of the morphs between the parent and
the child (one :class:`~stablemorph.record.ParamOrigin` per child parameter; several morphs
are composed with :func:`~stablemorph.record.compose_origins`), so it works the same for every
morph type, scheme and architecture (CNN morphs and transformer growths alike). It returns a
*new* optimiser of the same class, hyper-parameters and param groups over the child's
parameters; the caller's optimiser, its state and the parent are not modified (every state
tensor is copied).

State of a child parameter, by origin (one rule per (optimiser family, state entry):
:data:`STATE_KINDS` says how each per-entry state key maps, :data:`RULE` settles the two open
choices by measurement, ``benchmarks/results/optim_rule.md``):

- **unchanged** (``index is None``): the source's state, copied as is (``step`` and any
  per-entry state included, known or not).
- **indexed** (``child.select(dim, k) = parent.select(dim, index[k]) * scale[k]``): every state
  tensor of the parameter's shape is indexed the same way. A momentum buffer (SGD's, RMSprop's
  ``momentum_buffer``) is a velocity of the weights and is scaled like them (``* scale``): a
  Net2Net copy with outgoing share ``s`` then moves, under momentum alone, exactly as the
  parent's unit moved (tested). Gradient statistics (Adam's ``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq``, RMSprop's ``square_avg``, ``grad_avg``, Adamax's ``exp_inf``) are
  copied unscaled: the gradient of a split copy's outgoing weight is its parent's, not
  ``scale`` times it. Measured over 5 paired seeds (CNN on digits, the GPT on text): under
  AdamW copying gave the smaller post-growth loss rise (GPT 0.059 vs 0.069 nats, every seed);
  under SGD scaling was as good or slightly better. Scalars (``step``) are kept.
- **new units** of an indexed parameter (``index[k] < 0``): first moments 0; second moments
  (and ``exp_inf``) the *mean* of the source's, not 0. The step count is one tensor per
  parameter and stays the parent's ``t``; Adam's bias correction then divides by
  ``1 - beta ** t`` (about 1 for a trained model), so zero moments would make a new entry's
  first update ``lr (1 - b1) / sqrt(1 - b2)``, about ``3.2 lr``; with the mean second moment
  it starts below the typical step and grows as ``exp_avg`` fills in.
- **fresh** (``source is None``: decomposed factors, new layers, re-encoded readers): the
  state of its *stand-in* (the ``stand_in`` the morph recorded, else the nearest parent
  parameter by name, below), treated as for new units: first moments 0, second moments the
  stand-in's mean, ``step`` the stand-in's. Without state Adam's first step from ``step = 0``
  moves every fresh entry by the full rate at once; measured under AdamW, borrowing cut the
  GPT's post-growth rise from 0.24 to 0.06 nats (5 of 5 seeds). Under SGD a zero momentum
  buffer is the same as none. A stand-in with an unknown per-entry key gives no state.

- **factor pairs** (the step rule: a morph recorded ``factor`` on the pair's parameters,
  :mod:`stablemorph.step_rule`): the first and second moments are the parent layer's mapped
  through the factorisation (:func:`~stablemorph.step_rule.factor_state`: the first moment
  the factors would hold had the parent's gradients flowed through them), ``step`` the
  layer's; other keys as for fresh parameters.

Param groups (one rule for every morph): a child parameter with a source joins its source's
group, and is left out when the optimiser did not hold its source (frozen or excluded). A
fresh parameter joins the group of its stand-in: the recorded ``stand_in``, else the *nearest*
parent parameter: the one sharing the most leading components of its dotted name, ties broken
by the same last component (``bias`` before ``weight`` for a bias), then the same number of
dimensions (so a per-channel slope goes with biases, matching the usual "no weight decay on
1-D tensors" split), then parent order; it is left out where the optimiser did not hold its
stand-in, and joins group 0 when no parent parameter shares a leading name component. Fresh
parameters with ``requires_grad=False`` are left out. Groups keep their order, and an emptied
group stays, so per-group scheduler lists still line up.

Learning-rate multipliers: a child parameter whose origin has ``lr_scale != 1`` goes into an
extra group (appended after the original ones, one per (group, scale)), a copy of its group's
hyper-parameters with ``lr`` (and a scheduler's ``initial_lr``, ``max_lr``, ``min_lr``) times
the scale, and the key ``"lr_scale"`` (its group's, times the scale) so that a training loop
that sets every group's rate itself keeps the multiplier (``rate * group.get("lr_scale",
1.0)``); :func:`transfer_scheduler` then extends the scheduler's per-group lists the same
way (``base_lrs`` scaled, lambdas repeated). With the step rule the scale is ``lr_scale``
times the morph's recorded multiplier (``lr_advice``) for the optimiser's family
(:func:`~stablemorph.step_rule.is_adaptive`: ``"adaptive"``, else ``"sgd"``), and under an
adaptive optimiser times the typical step of the recorded parent parameter
(``lr_reference``, :func:`~stablemorph.step_rule.adaptive_step_ratio`) where it has Adam
state. The stable scheme's morphs also mark their other new entries
(``ParamOrigin.adaptive_new``): under an adaptive optimiser a fresh parameter without
recorded multipliers gets its stand-in's typical step as multiplier, and the new units of an
indexed parameter their second moments divided by its square (:class:`TransferRule`). Morphs
record nothing of the kind by default except with the stable scheme, so the baselines
transfer as published.

Optimisers whose state is not per parameter (:class:`torch.optim.LBFGS`: flat ``d``,
``prev_flat_grad`` and curvature pairs over all parameters) are refused up front.

Schedulers: :func:`transfer_scheduler` returns a copy of a scheduler driving the new
optimiser (same ``last_epoch``, base rates and lambdas); the original keeps driving the old
optimiser. Optimiser hooks (``register_step_pre_hook`` ...) are not carried over.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import wraps
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from stablemorph.record import MorphRecord, ParamOrigin, compose_origins, history
from stablemorph.step_rule import adaptive_step_ratio, factor_state, is_adaptive

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
# Param-group keys that are learning rates (scaled by ``lr_scale``), and scheduler attributes
# that hold one learning rate (scaled) or one rule (repeated) per param group.
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
_SCHED_LR_LISTS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs")
_SCHED_GROUP_LISTS = ("lr_lambdas", "base_momentums", "max_momentums")
_GROUP_MAP_ATTR = "_stablemorph_group_map"
# (group count of the first optimiser of a chain of transfers, per group its group there and
# the product of the multipliers), so that a scheduler of that first optimiser follows a chain
_ROOT_MAP_ATTR = "_stablemorph_root_group_map"


@dataclass(frozen=True)
class TransferRule:
    """The two choices the state mapping leaves open (module docstring).

    ``scaled``: the per-entry state keys of indexed parameters scaled like the weights
    (``scale``, ``scale ** 2``, ``|scale|`` by :data:`STATE_KINDS`); the others are copied as
    they are. ``fresh_state``: ``"none"`` (fresh parameters start without state) or
    ``"borrow"`` (zero first moments, the stand-in's mean second moments and step).

    What the step rule recorded (module docstring), applied by default: ``lr_advice`` the
    recorded learning-rate multipliers, ``adaptive_ratio`` (with ``lr_advice``) their
    scaling by the parent's typical adaptive step, ``factor_state`` the parent layer's state
    mapped onto recorded factor pairs, ``adaptive_new`` the new entries the morph marked
    (``ParamOrigin.adaptive_new``): under an adaptive optimiser a fresh parameter without
    recorded multipliers takes its stand-in's typical step ratio ``r``
    (:func:`~stablemorph.step_rule.adaptive_step_ratio`) as its multiplier, and the new units
    of an indexed parameter have their second moments divided by ``r ** 2`` (their steps
    times ``r`` while the borrowed moment dominates). ``width_advice`` the SGD multiplier a
    widen recorded for its channel group (``ParamOrigin.width_advice``; non-adaptive
    optimisers only).
    """

    scaled: frozenset[str]
    fresh_state: str
    lr_advice: bool = True
    adaptive_ratio: bool = True
    factor_state: bool = True
    adaptive_new: bool = True
    width_advice: bool = True

    def __post_init__(self) -> None:
        if self.fresh_state not in ("none", "borrow"):
            raise ValueError(f"TransferRule.fresh_state must be 'none' or 'borrow', got "
                             f"{self.fresh_state!r}")
        unknown = set(self.scaled) - set(STATE_KINDS)
        if unknown:
            raise ValueError(f"TransferRule.scaled: unknown state keys {sorted(unknown)}")


#: The rule, one per (optimiser family, state entry), settled by benchmarks/optim_rule.py
#: (benchmarks/results/optim_rule.md): momentum buffers (SGD, RMSprop) scale like the weights;
#: gradient statistics (Adam's and RMSprop's averages) are copied; fresh parameters borrow.
RULE = TransferRule(scaled=frozenset({"momentum_buffer"}), fresh_state="borrow")


def transfer_optimizer(
    optimizer: torch.optim.Optimizer,
    parent: nn.Module,
    child: nn.Module,
    *,
    rule: TransferRule | None = None,
) -> torch.optim.Optimizer:
    """A new optimiser over ``child``'s parameters carrying ``optimizer``'s state (module
    docstring for the rules).

    Args:
        optimizer: an optimiser over (some of) ``parent``'s parameters, e.g. SGD with
            momentum, Adam, AdamW, RMSprop. Not modified.
        parent: the model the morphs were applied to. Not modified.
        child: the model one or several morphs returned (its history extends the parent's).
        rule: the state-mapping choices (default :data:`RULE`; other values for experiments).

    Returns:
        An optimiser of ``type(optimizer)`` with the same defaults and one param group per
        original group (same hyper-parameters, ``lr`` and ``initial_lr`` included), plus one
        group per (group, ``lr_scale``) for parameters whose origin sets ``lr_scale != 1``.

    Raises:
        ValueError: ``child``'s history does not extend ``parent``'s; the optimiser holds a
            tensor that is not one of ``parent``'s parameters; an optimiser with flat state
            (LBFGS); a changed parameter's state tensor whose shape does not match it, or
            whose key is unknown (the optimiser is not supported).
    """
    rule = RULE if rule is None else rule
    kind = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            "transfer_optimizer: LBFGS keeps one flat state over all parameters (d, "
            "prev_flat_grad, old_dirs, old_stps) whose curvature pairs a morph invalidates; "
            "build a new torch.optim.LBFGS over the child's parameters (its history restarts)"
        )
    param_map = morphs_param_map(parent, child)
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

    members: list[tuple[int, float, str, nn.Parameter]] = []
    states: dict[nn.Parameter, dict[str, Any]] = {}
    for name, p in child.named_parameters():
        if name not in param_map:
            raise ValueError(
                f"transfer_optimizer: the morph records have no origin for child parameter "
                f"{name!r}"
            )
        origin = param_map[name]
        lr_scale = origin.lr_scale * _advised(origin, optimizer, parent_params, rule)
        if origin.is_fresh:
            if not p.requires_grad:
                continue
            stand_in = origin.stand_in if origin.stand_in in parent_params else _nearest(
                name, p, parent_params)
            if stand_in is None:
                members.append((0, lr_scale, name, p))
                continue
            ratio = _new_ratio(origin, optimizer, parent_params[stand_in], rule)
            lr_scale *= 1.0 if origin.lr_advice is not None or ratio is None else ratio
            if stand_in in group_of:
                members.append((group_of[stand_in], lr_scale, name, p))
                old_state = optimizer.state.get(parent_params[stand_in])
                if rule.fresh_state == "borrow" and old_state:
                    borrowed = _borrow_state(old_state, parent_params[stand_in], p)
                    if borrowed is not None:
                        states[p] = borrowed
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
        members.append((group_of[source], lr_scale, name, p))
        old_state = optimizer.state.get(parent_params[source])
        if old_state:
            states[p] = _map_state(old_state, origin, parent_params[source], name, kind,
                                   rule.scaled)
            ratio = _new_ratio(origin, optimizer, parent_params[source], rule)
            if ratio is not None and origin.index is not None:
                _damp_new_units(states[p], origin, ratio)
    if rule.factor_state:
        held = {id(p) for _, _, _, p in members}
        for p, mapped in _factor_states(optimizer, parent_params, child, param_map).items():
            if id(p) in held and (p in states or set(mapped) - {"step"}):
                states[p] = {**states.get(p, {}), **mapped}

    # One group per original group (kept even when empty), then one per (group, lr_scale).
    keys: list[tuple[int, float]] = [(gi, 1.0) for gi in range(len(optimizer.param_groups))]
    keys += list(dict.fromkeys((gi, s) for gi, s, _, _ in members if s != 1.0))
    named = any("param_names" in g for g in optimizer.param_groups)
    new_groups = []
    for gi, scale in keys:
        hyper = {k: copy.deepcopy(v) for k, v in optimizer.param_groups[gi].items()
                 if k not in ("params", "param_names")}
        for k in _LR_KEYS:
            if k in hyper and scale != 1.0:
                hyper[k] = hyper[k] * scale
        if scale != 1.0:  # for loops that set every group's rate themselves
            hyper["lr_scale"] = hyper.get("lr_scale", 1.0) * scale
        chosen = [(n, p) for g, s, n, p in members if (g, s) == (gi, scale)]
        new_groups.append({**hyper, "params": chosen if named else [p for _, p in chosen]})
    cls = type(optimizer)
    new = cls(new_groups, **constructor_kwargs(cls, optimizer.defaults))
    for p, state in states.items():
        new.state[p] = state
    setattr(new, _GROUP_MAP_ATTR, keys)
    setattr(new, _ROOT_MAP_ATTR, _root_map(optimizer, keys))
    return new


def _root_map(optimizer: torch.optim.Optimizer, keys: list[tuple[int, float]]
              ) -> tuple[int, list[tuple[int, float]]]:
    """``keys`` (per new group: ``optimizer``'s group, multiplier) composed with the map of
    the transfer ``optimizer`` itself came from, back to the first optimiser of the chain;
    with that optimiser's group count."""
    root = getattr(optimizer, _ROOT_MAP_ATTR, None)
    if root is None:
        return len(optimizer.param_groups), list(keys)
    n_root, back = root
    return n_root, [(back[gi][0], back[gi][1] * s) for gi, s in keys]


def transfer_scheduler(scheduler: LRScheduler, optimizer: torch.optim.Optimizer) -> LRScheduler:
    """A copy of ``scheduler`` (same class, ``last_epoch``, base rates, lambdas, nested
    schedulers) driving ``optimizer``, typically the result of :func:`transfer_optimizer`.

    ``scheduler`` keeps driving its own optimiser and is not modified. The new optimiser must
    have as many param groups as the old one, or be the result of :func:`transfer_optimizer`
    (or of a chain of them, starting from the scheduler's optimiser) with extra ``lr_scale``
    groups: the scheduler's per-group lists then grow with them (``base_lrs`` and last rates
    scaled, lambdas repeated).
    """
    old = scheduler.optimizer
    # the scheduler's own per-group lists say how many groups it drove (its optimiser may
    # have been updated in place, :func:`adopt_groups`)
    n_old = len(getattr(scheduler, "base_lrs", old.param_groups))
    n_new = len(optimizer.param_groups)
    group_map = getattr(optimizer, _GROUP_MAP_ATTR, None)
    root = getattr(optimizer, _ROOT_MAP_ATTR, None)
    if group_map and root is not None and n_old == root[0] != 1 + max(g for g, _ in group_map):
        group_map = root[1]  # a scheduler of the first optimiser of a chain of transfers
    extend = (group_map is not None and len(group_map) == n_new
              and all(gi < n_old for gi, _ in group_map) and n_new != n_old)
    if n_old != n_new and not extend:
        raise ValueError(
            f"transfer_scheduler: the scheduler drives {n_old} param groups, "
            f"the new optimiser has {n_new}"
        )
    # Every reference to the old optimiser (nested schedulers included) becomes the new one.
    new = copy.deepcopy(scheduler, memo={id(old): optimizer})
    if extend:
        _extend_group_lists(new, group_map, n_old)
    _track_step_calls(optimizer)
    return new


def adopt_groups(optimizer: torch.optim.Optimizer, grown: torch.optim.Optimizer) -> None:
    """Make ``optimizer`` hold, in place, the param groups and state of ``grown`` (the
    result of :func:`transfer_optimizer` on it), so that :func:`transfer_scheduler` can then
    extend a scheduler still driving ``optimizer`` to the new groups."""
    optimizer.param_groups[:] = grown.param_groups
    optimizer.state.clear()
    optimizer.state.update(grown.state)
    setattr(optimizer, _GROUP_MAP_ATTR, group_sources(grown))


def group_sources(optimizer: torch.optim.Optimizer) -> list[tuple[int, float]] | None:
    """For an optimiser :func:`transfer_optimizer` returned: per param group, the index of
    the old optimiser's group it copies and the learning-rate multiplier it applies to it
    (``None`` for any other optimiser)."""
    found = getattr(optimizer, _GROUP_MAP_ATTR, None)
    return None if found is None else list(found)


def morphs_param_map(parent: nn.Module, child: nn.Module) -> dict[str, ParamOrigin]:
    """The param map of every morph between ``parent`` and ``child``, composed (child
    parameter name -> origin in ``parent``)."""
    records = _morphs_between(parent, child)
    result = records[0].report.param_map
    for record in records[1:]:
        result = compose_origins(record.report.param_map, result)
    return result


def _morphs_between(parent: nn.Module, child: nn.Module) -> list[MorphRecord]:
    """The records of the morphs that made ``child`` from ``parent`` (at least one)."""
    before, after = history(parent), history(child)
    extends = len(after) > len(before) and all(
        (a.op, a.target, a.kwargs) == (b.op, b.target, b.kwargs)
        for a, b in zip(before, after, strict=False)
    )
    if not extends:
        raise ValueError(
            f"transfer_optimizer: the child was not morphed from the parent (the parent has "
            f"{len(before)} morph records, the child {len(after)}, and the child's history "
            f"must extend the parent's)"
        )
    return after[len(before):]


def _extend_group_lists(scheduler: Any, group_map: list[tuple[int, float]], n_old: int) -> None:
    """Grow ``scheduler``'s per-group lists (and its nested schedulers') to ``group_map``."""
    for nested in getattr(scheduler, "_schedulers", []):
        _extend_group_lists(nested, group_map, n_old)
    for attr in (*_SCHED_LR_LISTS, *_SCHED_GROUP_LISTS):
        values = getattr(scheduler, attr, None)
        if not isinstance(values, list) or len(values) != n_old:
            continue
        scaled = attr in _SCHED_LR_LISTS
        setattr(scheduler, attr, [values[gi] * s if scaled else values[gi]
                                  for gi, s in group_map])


def _advised(origin: ParamOrigin, optimizer: torch.optim.Optimizer,
             parent_params: dict[str, nn.Parameter], rule: TransferRule) -> float:
    """The step rule's multiplier for a parameter of ``origin`` (module docstring): the
    factor pairs' (:func:`_factor_advice`) times, under a non-adaptive optimiser, the
    recorded ``width_advice`` (with ``rule.width_advice``)."""
    width = origin.width_advice
    if width is None or not rule.width_advice or is_adaptive(optimizer):
        width = 1.0
    return width * _factor_advice(origin, optimizer, parent_params, rule)


def _factor_advice(origin: ParamOrigin, optimizer: torch.optim.Optimizer,
                   parent_params: dict[str, nn.Parameter], rule: TransferRule) -> float:
    """The recorded ``lr_advice`` multiplier for the optimiser's family (1 without one or
    with ``rule.lr_advice`` off)."""
    if origin.lr_advice is None or not rule.lr_advice:
        return 1.0
    if not is_adaptive(optimizer):
        return origin.lr_advice["sgd"]
    scale = origin.lr_advice["adaptive"]
    reference = parent_params.get(origin.lr_reference) if origin.lr_reference else None
    ratio = (adaptive_step_ratio(optimizer, reference)
             if reference is not None and rule.adaptive_ratio else None)
    return scale if ratio is None else scale * ratio


def _new_ratio(origin: ParamOrigin, optimizer: torch.optim.Optimizer, stand_in: Tensor,
               rule: TransferRule) -> float | None:
    """The typical step ratio of ``stand_in`` for the new entries of a parameter of
    ``origin`` (``None``: not marked, ``rule.adaptive_new`` off, not adaptive, no Adam
    state)."""
    if not (origin.adaptive_new and rule.adaptive_new) or not is_adaptive(optimizer):
        return None
    return adaptive_step_ratio(optimizer, stand_in)


def _damp_new_units(state: dict[str, Any], origin: ParamOrigin, ratio: float) -> None:
    """Divide the new units' (``index < 0``) second moments in ``state`` by ``ratio ** 2``."""
    for key, value in state.items():
        if STATE_KINDS.get(key) != "square" or not isinstance(value, Tensor) or value.dim() == 0:
            continue
        shape = [1] * value.dim()
        shape[origin.dim] = -1
        new = (origin.index.to(value.device) < 0).view(shape)
        state[key] = torch.where(new, value / max(ratio, 1e-12) ** 2, value)


def _factor_states(optimizer: torch.optim.Optimizer, parent_params: dict[str, nn.Parameter],
                   child: nn.Module, param_map: dict[str, ParamOrigin]
                   ) -> dict[nn.Parameter, dict[str, Any]]:
    """The state of every recorded factor pair's parameters (module docstring), mapped from
    its parent layer's; pairs whose weights are not both still recorded as the pair, or
    whose layer has no optimiser state, are left out."""
    params = dict(child.named_parameters())
    pairs = {(o.factor["first"], o.factor["second"]): o.factor
             for o in param_map.values() if o.factor is not None}
    out: dict[nn.Parameter, dict[str, Any]] = {}
    for (first, second), pair in pairs.items():
        names = {k: f"{m}.{s}" for k, m, s in (("w1", first, "weight"), ("w2", second, "weight"),
                                               ("b1", first, "bias"), ("b2", second, "bias"))}
        if any(param_map.get(names[k]) is None or param_map[names[k]].factor != pair
               for k in ("w1", "w2")):
            continue
        weight = parent_params.get(f"{pair['layer']}.weight")
        weight_state = optimizer.state.get(weight) if weight is not None else None
        if not weight_state:
            continue
        bias = parent_params.get(f"{pair['layer']}.bias")
        bias_state = optimizer.state.get(bias, {}) if bias is not None else {}
        b1 = params.get(names["b1"])
        mapped = factor_state(params[names["w1"]], params[names["w2"]], b1, pair["stride"],
                              pair["groups"], weight_state, bias_state)
        for k, entries in mapped.items():
            p = params.get(names[k])
            if p is None or (param_map[names[k]].factor != pair):
                continue
            state = {key: v.to(device=p.device, dtype=p.dtype) for key, v in entries.items()}
            if "step" in weight_state:
                state["step"] = weight_state["step"].clone()
            out[p] = state
    return out


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
               optimizer: str, scaled: frozenset[str]) -> dict[str, Any]:
    """The child's state for one parameter from its source's ``state``; new tensors only.
    An unchanged parameter's state is copied whatever its keys; an indexed one's per-entry
    tensors must be of a known kind (:data:`STATE_KINDS`)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            out[key] = copy.deepcopy(value)
        elif origin.index is None or value.dim() == 0:
            out[key] = value.clone()  # unchanged parameter, or a scalar such as Adam's step
        elif value.shape != source.shape or key not in STATE_KINDS:
            raise ValueError(
                f"transfer_optimizer: {optimizer} keeps a per-entry state {key!r} "
                f"{tuple(value.shape)} for {name!r} whose mapping is unknown; supported "
                f"keys: {sorted(STATE_KINDS)}"
            )
        else:
            out[key] = _index_state(value, origin, STATE_KINDS[key], key in scaled)
    return out


def _borrow_state(state: dict[str, Any], stand_in: Tensor, p: Tensor) -> dict[str, Any] | None:
    """A fresh parameter's state borrowed from its stand-in's (first moments 0, the others
    the stand-in's mean, scalars copied); ``None`` when a per-entry key is unknown."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            out[key] = copy.deepcopy(value)
        elif value.dim() == 0:
            out[key] = value.clone()
        elif value.shape != stand_in.shape or key not in STATE_KINDS:
            return None
        else:
            fill = 0.0 if STATE_KINDS[key] == "first" else float(value.double().mean())
            out[key] = torch.full(p.shape, fill, dtype=value.dtype, device=p.device)
    return out


def _index_state(value: Tensor, origin: ParamOrigin, kind: str, scaled: bool) -> Tensor:
    """``value`` indexed along ``origin.dim`` by ``origin.index`` (scaled by ``scale **
    power``, ``|scale|`` for magnitudes, when ``scaled``); new units (index < 0): 0 for first
    moments, the mean for the others."""
    index = origin.index.to(value.device)
    taken = value.index_select(origin.dim, index.clamp(min=0))
    shape = [1] * value.dim()
    shape[origin.dim] = -1
    if origin.scale is not None and scaled:
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
