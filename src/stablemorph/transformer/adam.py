"""Carrying Adam/AdamW state from a parent over to the model grown from it.

This reads only the growths' ``param_map`` (:class:`~stablemorph.record.ParamOrigin` per
child parameter) and parameter names, nothing transformer-specific beyond the
``blocks.<i>.`` naming used to find an analogue, so it can move to a generic
``stablemorph.optim`` module as it is.

Rules, per child parameter (``m``: first moment, ``v``: second moment, amsgrad's ``max`` like
``v``):

- unchanged (``index is None``): ``m``, ``v`` and ``step`` copied from the source;
- indexed: entries with a parent counterpart copy its ``m`` and ``v``; new entries get
  ``m = 0`` and ``v = mean(v)`` of the source, so that they start with small steps that grow
  as ``m`` fills in (zero ``v`` with the parent's step count would make their first step
  ``(1 - beta1) / sqrt(1 - beta2)``, about 3x a full Adam step);
- fresh: ``m = 0``, ``v = mean(v)`` and ``step`` of its *analogue*: the parent parameter of
  the same name, else the same parameter of the nearest parent block; no analogue in the
  optimiser: no state (Adam starts it from scratch).

``scale`` is deliberately not applied to the moments. It is a *value* scale; the gradient of
a scaled copy scales differently (a reader split ``1/k`` keeps its gradient, a copied writer
read by ``1/k`` shares gets ``1/k`` of it), and Adam's step is invariant to scaling ``m`` and
``sqrt(v)`` together, so copying them keeps each entry's first step equal to its parent's.

Parameter groups: a child parameter joins the group of its source (or analogue), with that
group's hyper-parameters; one whose analogue the optimiser does not hold is left out, as its
analogue was.
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import Tensor, nn

from stablemorph.record import ParamOrigin, history

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def compose_param_maps(
    outer: dict[str, ParamOrigin], inner: dict[str, ParamOrigin]
) -> dict[str, ParamOrigin]:
    """``outer`` (child <- middle) after ``inner`` (middle <- parent): child <- parent.
    Entries indexed along two different dims cannot be expressed and become fresh."""
    out: dict[str, ParamOrigin] = {}
    for name, o in outer.items():
        i = inner.get(o.source) if o.source is not None else None
        if i is None or i.source is None:
            out[name] = ParamOrigin(None)
        elif o.index is None:
            out[name] = i
        elif i.index is None:
            out[name] = ParamOrigin(i.source, o.dim, o.index, o.scale)
        elif i.dim == o.dim:
            valid = o.index >= 0
            index = torch.where(valid, i.index[o.index.clamp(min=0)], -1)
            o_scale = torch.ones(len(o.index), dtype=torch.float64) if o.scale is None else o.scale
            i_scale = (torch.ones(len(i.index), dtype=torch.float64) if i.scale is None
                       else i.scale)
            scale = o_scale.double() * i_scale.double()[o.index.clamp(min=0)]
            out[name] = ParamOrigin(i.source, o.dim, index, scale)
        else:
            out[name] = ParamOrigin(None)
    return out


def growth_param_map(parent: nn.Module, child: nn.Module) -> dict[str, ParamOrigin]:
    """The composed ``param_map`` of every growth between ``parent`` and ``child``."""
    before, after = history(parent), history(child)
    grown = len(after) > len(before) and all(
        a is b for a, b in zip(before, after[: len(before)], strict=True)
    )
    if not grown:
        raise ValueError(
            f"{type(child).__name__} was not grown from this {type(parent).__name__}: its "
            f"growth history ({len(after)} records) does not extend the parent's ({len(before)})"
        )
    records = after[len(before):]
    result = records[0].report.param_map
    for record in records[1:]:
        result = compose_param_maps(record.report.param_map, result)
    return result


def analogue_name(name: str, origin: ParamOrigin, parent_names: set[str]) -> str | None:
    """The parent parameter that ``name`` stands in for (see module docstring)."""
    if origin.source is not None:
        return origin.source
    if name in parent_names:
        return name
    match = _BLOCK.match(name)
    if match is None:
        return None
    rest, b = name[match.end():], int(match.group(1))
    candidates = [int(m.group(1)) for n in parent_names if (m := _BLOCK.match(n))
                  and n[m.end():] == rest]
    if not candidates:
        return None
    nearest = min(candidates, key=lambda c: (abs(c - b), c))
    return f"blocks.{nearest}.{rest}"


def transfer_adam(
    optimizer: torch.optim.Optimizer, parent: nn.Module, child: nn.Module
) -> torch.optim.Optimizer:
    """A new optimiser of the same class and hyper-parameters over ``child``'s parameters,
    with state carried over from ``optimizer`` (which must hold ``parent``'s parameters).
    ``optimizer`` and ``parent`` are not modified."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise TypeError(f"transfer_adam handles Adam and AdamW, got {type(optimizer).__name__}")
    param_map = growth_param_map(parent, child)
    parent_params = dict(parent.named_parameters())
    name_of = {id(p): n for n, p in parent_params.items()}
    group_of: dict[str, int] = {}
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in name_of:
                raise ValueError(
                    f"transfer_adam: the optimiser holds a {tuple(p.shape)} parameter that is "
                    f"not one of the parent's"
                )
            group_of[name_of[id(p)]] = gi

    groups: list[list[Tensor]] = [[] for _ in optimizer.param_groups]
    states: dict[Tensor, dict[str, Tensor]] = {}
    for name, p in child.named_parameters():
        origin = param_map.get(name, ParamOrigin(None))
        analogue = analogue_name(name, origin, set(parent_params))
        if analogue is None or analogue not in group_of:
            continue
        groups[group_of[analogue]].append(p)
        src = optimizer.state.get(parent_params[analogue])
        if src:
            states[p] = _child_state(src, p, origin)

    new = type(optimizer)(
        [
            {**{k: v for k, v in g.items() if k != "params"}, "params": ps}
            for g, ps in zip(optimizer.param_groups, groups, strict=True)
            if ps
        ],
        **_constructor_defaults(optimizer),
    )
    for p, st in states.items():
        new.state[p] = st
    return new


def _constructor_defaults(optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's defaults that its constructor accepts (AdamW's defaults hold a
    ``decoupled_weight_decay`` flag its constructor does not take)."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    return {k: v for k, v in optimizer.defaults.items() if k in accepted}


def _child_state(src: dict[str, Tensor], p: Tensor, origin: ParamOrigin) -> dict[str, Tensor]:
    state = {"step": src["step"].clone()}
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key not in src:
            continue
        s = src[key]
        fill = 0.0 if key == "exp_avg" else float(s.double().mean())
        if origin.source is None:
            state[key] = torch.full_like(p, fill, memory_format=torch.preserve_format).detach()
        elif origin.index is None:
            state[key] = s.clone()
        else:
            valid = origin.index >= 0
            taken = s.index_select(origin.dim, origin.index.clamp(min=0).to(s.device))
            shape = [1] * s.dim()
            shape[origin.dim] = -1
            state[key] = torch.where(valid.view(shape).to(s.device), taken,
                                     torch.full_like(taken, fill))
    return state
