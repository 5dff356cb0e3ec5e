"""``widen``: give a layer more output units, and grow every module tied to them.

The channel group (:func:`stablemorph.graph.channel_group`) lists the layers whose outputs are
added to the target's (a ResNet stage's convs and projections) or multiply them (a
squeeze-excite gate, SwiGLU's ``up`` beside its ``gate``), the channel-wise modules on the way
(norms, per-channel PAct, depthwise convs) and the consumers (the next dense layers, through
pooling, flatten, permutes and concatenation). Each module grows through its handler
(:mod:`stablemorph.handlers`); what the new units are is one :class:`WidenPlan`, chosen by the
scheme (:mod:`stablemorph.schemes`, DESIGN.md section 2) and executed by the handlers:

- ``"net2net"`` (variant ``"random"``): each new unit copies a random existing unit (weights,
  bias, norm affine parameters and running statistics); every outgoing column of a unit with
  ``c`` copies is divided by ``c``.
- ``"netmorph"`` (variant ``"auto"``): new units get zeros on the side with fewer parameters
  and random values on the other. Zero *incoming* weights keep the function only if the new
  channels stay 0 up to every consumer (not through sigmoid, not through a norm over the
  channels); otherwise the outgoing side is zeroed.
- ``"stable"`` (dense, exact): variant ``"pairs"`` (default) adds units two by two with the
  same random incoming weights ``V`` and opposite random outgoing weights ``Z`` and ``-Z``
  (their contributions cancel exactly, their gradients differ in sign); with an odd count
  the last new unit is an unequal split copy (outgoing shares ``1 - a`` and ``a``). Variant
  ``"split"`` makes every new unit a copy with random unequal outgoing shares (LEMON-style).
  Fresh units borrow the norm/PAct parameters and statistics of a random existing channel,
  so nothing new is zero (unless the parent's copied values are).

The step rule (``step_rule``, on by default for ``"stable"`` only; :mod:`stablemorph.schemes`):
the widen measures on its probe batch how much the group's first SGD step moves the
consumers' outputs relative to the parent's (:mod:`stablemorph.morphs.new_units`; stable's
pairs double a doubled layer's step) and records ``1 / amplification`` as the group's SGD
learning-rate multiplier (``ParamOrigin.width_advice``), which
:func:`stablemorph.optim.transfer_optimizer` applies under non-adaptive optimisers; under
adaptive ones the new units start at their source's typical step (``adaptive_new``).

A LayerNorm or RMSNorm over the widened channels changes with any extra channel unless every
unit is replicated the same number of times (mean and variance are then unchanged): there
the width must be a multiple of the current one and all schemes replicate, differing in the
outgoing shares (net2net equal, netmorph ``1`` and ``0``, stable random). A GroupNorm's groups
are independent: new channels come as whole new groups (copies of old groups, or pairs inside
a group when its size is even), the width being the current one plus whole groups.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from stablemorph.graph import ChannelGroup, channel_group
from stablemorph.handlers import WidenPlan, handler_for
from stablemorph.handlers.base import grow_parameter
from stablemorph.morphs.contract import (
    MorphError,
    Surgery,
    check_scheme,
    generator,
    get_layer,
    run_morph,
)
from stablemorph.morphs.new_units import widen_energy
from stablemorph.record import ParamOrigin
from stablemorph.schemes import TABLE, get_scheme, step_rule_on

VARIANTS = {name: s.widen_variants for name, s in TABLE.items()}


def _random_shares(source: Tensor, channels: int, gen: torch.Generator) -> Tensor:
    """Outgoing shares for units and their copies: random in (0.5, 1.5), normalised so that
    each old unit's shares (its own and its copies') sum to one."""
    n = source.numel()
    raw = 0.5 + torch.rand(channels + n, generator=gen, dtype=torch.float64)
    owner = torch.cat([torch.arange(channels), source])
    total = torch.zeros(channels, dtype=torch.float64).index_add_(0, owner, raw)
    return raw / total[owner]


def _copy_shares(plan: WidenPlan, how: str, gen: torch.Generator) -> None:
    """Outgoing shares of units and their copies (``plan.source``): ``"equal"``,
    ``"original"`` (the copies get 0) or ``"random"`` (unequal, non-zero)."""
    c = plan.channels
    if how == "equal":
        count = 1 + torch.bincount(plan.source, minlength=c).double()
        plan.share = 1.0 / torch.cat([count, count[plan.source]])
    elif how == "original":
        plan.share[c:] = 0.0
    else:
        plan.share = _random_shares(plan.source, c, gen)


def _blocks(channels: int, n: int, block: int, gen: torch.Generator) -> Tensor:
    """Sources for ``n`` new units that copy whole blocks of ``block`` old units."""
    groups = torch.randint(channels // block, (n // block,), generator=gen)
    return (groups[:, None] * block + torch.arange(block)).flatten()


def _plan_random(plan: WidenPlan, block: int | None, zero_in: bool,
                 gen: torch.Generator) -> None:
    """Net2Net: every new unit copies a random old unit (whole groups under a GroupNorm)."""
    c, n = plan.channels, plan.new
    plan.source = (_blocks(c, n, block, gen) if block
                   else torch.randint(c, (n,), generator=gen))
    _copy_shares(plan, "equal", gen)


def _plan_auto(plan: WidenPlan, block: int | None, zero_in: bool,
               gen: torch.Generator) -> None:
    """NetMorph: zeros on the smaller side, random values on the other."""
    ids = torch.arange(plan.new)
    if zero_in:
        plan.fresh_out, plan.share[plan.channels:] = ids, 0.0
        plan.notes.append("new units: zero incoming weights, random outgoing")
    else:
        plan.fresh_in, plan.share[plan.channels:] = ids, 0.0
        plan.notes.append("new units: random incoming weights, zero outgoing")


def _plan_split(plan: WidenPlan, block: int | None, zero_in: bool,
                gen: torch.Generator) -> None:
    """Stable ``split``: every new unit copies an old unit, shares random and unequal."""
    c, n = plan.channels, plan.new
    if block:
        plan.source = _blocks(c, n, block, gen)
    else:
        plan.source = (torch.randperm(c, generator=gen)[:n] if n <= c
                       else torch.randint(c, (n,), generator=gen))
    _copy_shares(plan, "random", gen)
    plan.notes.append("new units: copies with random unequal outgoing shares")


def _plan_pairs(plan: WidenPlan, block: int | None, zero_in: bool,
                gen: torch.Generator) -> None:
    """Stable ``pairs``: (V, V) incoming, (Z, -Z) outgoing; an odd last unit is a split
    copy. Under a GroupNorm with odd group size pairs would straddle groups: split copies."""
    if block and block % 2:
        _plan_split(plan, block, zero_in, gen)
        return
    c, n = plan.channels, plan.new
    pairs = n // 2
    ids = torch.arange(pairs).repeat_interleave(2)
    plan.fresh_in[: 2 * pairs] = ids
    plan.fresh_out[: 2 * pairs] = ids
    plan.sign[: 2 * pairs] = torch.tensor([1.0, -1.0]).repeat(pairs)
    plan.share[c: c + 2 * pairs] = 0.0
    plan.template[: 2 * pairs] = torch.randint(c, (pairs,), generator=gen).repeat_interleave(2)
    plan.notes.append(f"new units: {pairs} pairs with incoming (V, V), outgoing (Z, -Z)")
    if n % 2:
        s = int(torch.randint(c, (1,), generator=gen))
        a = 0.25 + 0.5 * float(torch.rand(1, generator=gen, dtype=torch.float64))
        plan.source[-1] = s
        plan.share[s], plan.share[-1] = 1.0 - a, a
        plan.notes.append(f"odd count: unit {s} split into shares {1 - a:.3f} / {a:.3f}")


PlanFn = Callable[[WidenPlan, "int | None", bool, torch.Generator], None]
PLANS: dict[str, PlanFn] = {"random": _plan_random, "auto": _plan_auto,
                            "split": _plan_split, "pairs": _plan_pairs}


def plan_widen(scheme: str, variant: str, channels: int, width: int, *, normalised: bool,
               zero_in: bool, gen: torch.Generator, block: int | None = None) -> WidenPlan:
    """The :class:`~stablemorph.handlers.WidenPlan` of ``scheme`` for ``channels -> width``.

    ``normalised``: a norm sees all the channels (replicate every unit; ``width`` a multiple
    of ``channels``); ``block``: new units come in whole groups of that size (GroupNorm);
    ``zero_in``: for NetMorph, zero incoming weights are both smaller and exact (else zero
    outgoing).
    """
    s = get_scheme(scheme)
    plan = WidenPlan.empty(channels, width - channels, random_bias=s.dense)
    if normalised:
        plan.source = torch.arange(channels).repeat(width // channels - 1)
        _copy_shares(plan, s.replica_shares, gen)
        plan.notes.append("a norm sees all the widened channels: every unit replicated")
        return plan
    PLANS[variant](plan, block, zero_in, gen)
    return plan


# ----------------------------------------------------------------------------------------------
# applying a plan: every module through its handler


def _unit_params(group: ChannelGroup, modules: dict[str, nn.Module]) -> tuple[int, int]:
    """Parameters per unit on the incoming side and on the outgoing side."""
    incoming = sum(handler_for(modules[p]).params_per_unit(modules[p], "out")
                   for p in group.producers)
    outgoing = 0
    for use in group.uses:
        if use.kind == "parameter":
            incoming += 1
            continue
        m = modules[use.module]
        per_unit = handler_for(m).params_per_unit(m, "in")
        if use.kind == "channelwise":
            incoming += per_unit
        else:
            outgoing += per_unit * (int(use.labels.sub.max()) + 1)
    return incoming, outgoing


def apply_plan(child: nn.Module, group: ChannelGroup, plan: WidenPlan,
               gen: torch.Generator) -> dict[str, ParamOrigin]:
    """Edit ``child``'s modules in place by ``plan``, each through its handler; returns the
    changed parameters' origins."""
    modules = dict(child.named_modules())
    origins: dict[str, ParamOrigin] = {}
    remaps = group.remaps(plan.channels + plan.new)
    for name in group.producers:
        handler_for(modules[name]).grow_out(name, modules[name], plan, gen, origins)
    for use in group.uses:
        if use.kind == "parameter":
            grow_parameter(child, use.module, use.labels.dim, use.default,
                           remaps[use.module], plan, origins)
            continue
        m, remap = modules[use.module], remaps[use.module]
        h = handler_for(m)
        try:
            if use.kind == "consumer":
                h.grow_in(use.module, m, remap, plan, gen, origins)
            else:
                h.grow_channels(use.module, m, remap, plan, gen, origins)
        except (ValueError, NotImplementedError) as err:
            raise MorphError(f"cannot grow {use.module!r} ({type(m).__name__}): {err}") from err
    return origins


def step_rule_advice(parent: nn.Module, child: nn.Module, group: ChannelGroup,
                     origins: dict[str, ParamOrigin], probe: Any) -> list[str]:
    """The widen step rule: record on every changed parameter of the group the SGD
    learning-rate multiplier ``1 / amplification`` (:mod:`stablemorph.morphs.new_units`,
    measured on ``probe``) as ``width_advice``: the group's first SGD step then moves the
    consumers' outputs as much as the parent's did. Adaptive optimisers normalise each
    entry's step; there the new units start at their source's typical step instead
    (``adaptive_new``). Returns the report's notes; records nothing where the probe does not
    reach the group's consumers (the morph's verification reports why)."""
    consumers = [u.module for u in group.uses if u.kind == "consumer"]
    try:
        energy = widen_energy(parent, child, origins, consumers, probe)
    except Exception as err:  # the verification runs the same forward next and reports it
        return [f"step rule: not measured ({type(err).__name__}: {err})"]
    amp = energy.amplification()
    advice = 1.0 / max(amp, 1e-12)
    for origin in origins.values():
        if origin.index is not None and origin.source is not None:
            origin.width_advice = advice
    return [f"step rule: first SGD step {amp:.3g}x the parent's over the widened group "
            f"(new units: incoming {energy.new_in / max(energy.parent, 1e-30):.3g}, "
            f"outgoing {energy.new_out / max(energy.parent, 1e-30):.3g}); SGD lr multiplier "
            f"{advice:.3g}"]


def _check_width(target: str, current: int, width: int, group: ChannelGroup) -> None:
    """Norms over the channels allow only some widths: refuse others with the nearest."""
    if group.block == 0 and width % current:
        raise MorphError(
            f"widen {target!r}: a norm (LayerNorm/RMSNorm) normalises these channels, so every "
            f"unit must be replicated equally: width must be a multiple of {current}, got "
            f"{width} (nearest: {max(2, round(width / current)) * current})"
        )
    if group.block and (width - current) % group.block:
        step = group.block
        lo = current + max(1, (width - current) // step) * step
        nearest = lo if lo > width or width - lo <= lo + step - width else lo + step
        raise MorphError(
            f"widen {target!r}: a GroupNorm normalises these channels in groups of {step}: "
            f"new channels must form whole groups, so width must be {current} plus a "
            f"multiple of {step}, got {width} (nearest: {nearest})"
        )


def widen(
    model: nn.Module,
    target: str,
    width: int,
    *,
    scheme: str = "stable",
    variant: str | None = None,
    seed: int = 0,
    inputs: Tensor | Sequence[Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
    tol: float | None = None,
    step_rule: bool | None = None,
) -> nn.Module:
    """A copy of ``model`` in which layer ``target`` and every layer tied to its units have
    ``width`` output units, computing the same function.

    Args:
        model: the parent; never modified.
        target: dotted module name of the layer to widen: a dense Conv1d/2d/3d, Linear,
            Embedding, Hugging Face ``Conv1D``, or any layer registered with
            :func:`~stablemorph.register_handler` as ``"dense"``.
        width: the new number of output units/channels (> the current one; a multiple of it
            when a LayerNorm/RMSNorm normalises them; the current one plus whole groups
            under a GroupNorm).
        scheme: ``"stable"`` (default), ``"netmorph"`` or ``"net2net"`` (module docstring).
        variant: ``"stable"``: ``"pairs"`` (default) or ``"split"``.
        seed: seeds every random choice (units copied, random weights).
        inputs / input_shape: the probe batch to verify on (see :mod:`.contract`).
        tol: largest accepted ``max_rel`` (default by dtype; float32: 1e-5).
        step_rule: the step rule (:func:`step_rule_advice`; under an adaptive optimiser the
            new units start at their source's typical step, ``ParamOrigin.adaptive_new``);
            ``None``: the scheme's default (on for ``"stable"`` only). Only True, False or
            None.

    Returns:
        The child, with a :class:`~stablemorph.record.MorphRecord` attached.

    Raises:
        MorphError: unknown/unsupported layer, ``width`` not larger, a channel tie widening
            cannot follow, a tied parameter, an untraceable model (naming the module fx
            failed in and why), or a failed verification.
    """
    check_scheme(scheme)
    try:
        rule = step_rule_on(scheme, step_rule)
    except ValueError as err:
        raise MorphError(f"widen {target!r}: {err}") from None
    variant = variant or VARIANTS[scheme][0]
    if variant not in VARIANTS[scheme]:
        raise MorphError(f"unknown variant {variant!r} for widen scheme {scheme!r}; "
                         f"choose one of {VARIANTS[scheme]}")
    layer = get_layer(model, target, (nn.Module,), "widen")
    handler = handler_for(layer)
    if handler is None or handler.role(layer) != "dense" or handler.out_units(layer) is None:
        raise MorphError(f"widen: layer {target!r} is a {type(layer).__name__}; supported: "
                         f"Linear, Conv1d, Conv2d, Conv3d, Embedding, HF Conv1D and layers "
                         f"registered with sm.register_handler")
    current = int(handler.out_units(layer))  # type: ignore[arg-type]
    if not isinstance(width, int) or width <= current:
        raise MorphError(
            f"widen {target!r}: width must be an int larger than the current {current}, "
            f"got {width!r}"
        )

    def surgery(child: nn.Module, probe: tuple[Tensor, ...]) -> Surgery:
        group = channel_group(child, target, probe)
        _check_width(target, current, width, group)
        modules = dict(child.named_modules())
        incoming, outgoing = _unit_params(group, modules)
        zero_in = group.zero_preserving and incoming < outgoing
        gen = generator(seed)
        plan = plan_widen(scheme, variant, current, width, normalised=group.normalised,
                          zero_in=zero_in, gen=gen, block=group.block)
        origins = apply_plan(child, group, plan, gen)
        notes = [f"channel group: producers {group.producers}",
                 f"{len(group.uses)} modules read the channels", *plan.notes]
        if rule:
            notes += step_rule_advice(model, child, group, origins, probe)
        return Surgery(origins=origins, notes=notes)

    kwargs = {"width": width, "scheme": scheme, "variant": variant, "seed": seed,
              "step_rule": rule}
    return run_morph("widen", model, target, scheme, kwargs, surgery, inputs, input_shape, tol)
