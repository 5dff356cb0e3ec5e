"""``widen``: give a Conv/Linear layer more output units, and grow every module tied to them.

The channel group (:func:`stablemorph.graph.channel_group`) lists the layers whose outputs are
added to the target's (a ResNet stage's convs and projections), the channel-wise modules on
the way (BatchNorm, LayerNorm, per-channel PAct, depthwise convs) and the consumers (the
next dense Conv/Linear layers, through pooling, flatten and concatenation). A :class:`WidenPlan`
says, per new unit, what its incoming weights, channel-wise parameters and outgoing weights
are; the schemes (DESIGN.md section 2) differ only in the plan:

- ``"net2net"``: each new unit copies a random existing unit (weights, bias, BatchNorm
  affine parameters and running statistics); every outgoing column of a unit with ``c``
  copies is divided by ``c``.
- ``"netmorph"``: new units get zeros on the side with fewer parameters and random values
  on the other. Zero *incoming* weights keep the function only if every op on the way maps
  0 to 0 (not sigmoid, not LayerNorm); otherwise the outgoing side is zeroed.
- ``"stable"`` (dense, exact): variant ``"pairs"`` (default) adds units two by two with the
  same random incoming weights ``V`` and opposite random outgoing weights ``Z`` and ``-Z``
  (their contributions cancel exactly, their gradients differ in sign); with an odd count
  the last new unit is an unequal split copy (outgoing shares ``1 - a`` and ``a``). Variant
  ``"split"`` makes every new unit a copy with random unequal outgoing shares (LEMON-style).
  Fresh units borrow the BatchNorm/PAct parameters and statistics of a random existing
  channel, so nothing new is zero (unless the parent's copied values are).

A LayerNorm over the widened channels changes with any extra channel unless every unit is
replicated the same number of times (mean and variance are then unchanged): there the width
must be a multiple of the current one and all schemes replicate, differing in the outgoing
shares (net2net equal, netmorph ``1`` and ``0``, stable random).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from stablemorph.activations import PAct
from stablemorph.graph import BATCHNORM, CONV, ChannelGroup, Remap, channel_group, is_depthwise
from stablemorph.morphs.contract import (
    MorphError,
    Surgery,
    check_scheme,
    generator,
    get_layer,
    new_parameter,
    randn,
    run_morph,
    scale_of,
)
from stablemorph.record import ParamOrigin

VARIANTS = {"stable": ("pairs", "split"), "netmorph": ("auto",), "net2net": ("random",)}


@dataclass
class WidenPlan:
    """Values of ``new`` extra units on top of ``channels`` (all tensors on the CPU).

    Per new unit ``j``: ``source[j]`` the old unit it copies (incoming weights and
    channel-wise parameters; ``-1``: none), else ``fresh_in[j]`` the id of its random
    incoming vector (pairs share one; ``-1``: zero incoming) and ``template[j]`` the old unit
    whose channel-wise parameters it borrows (``-1``: fresh defaults). Outgoing: every unit
    ``u`` (old and new) contributes ``share[u]`` times its source's parent column, new unit
    ``j`` adds ``sign[j]`` times random outgoing vector ``fresh_out[j]`` (``-1``: none).
    """

    channels: int
    new: int
    source: Tensor
    template: Tensor
    fresh_in: Tensor
    share: Tensor
    fresh_out: Tensor
    sign: Tensor
    random_bias: bool
    notes: list[str] = field(default_factory=list)

    @staticmethod
    def empty(channels: int, new: int, random_bias: bool) -> WidenPlan:
        none = torch.full((new,), -1, dtype=torch.long)
        return WidenPlan(channels, new, none.clone(), none.clone(), none.clone(),
                         torch.ones(channels + new, dtype=torch.float64), none.clone(),
                         torch.ones(new, dtype=torch.float64), random_bias)


def _random_shares(source: Tensor, channels: int, gen: torch.Generator) -> Tensor:
    """Outgoing shares for units and their copies: random in (0.5, 1.5), normalised so that
    each old unit's shares (its own and its copies') sum to one."""
    n = source.numel()
    raw = 0.5 + torch.rand(channels + n, generator=gen, dtype=torch.float64)
    owner = torch.cat([torch.arange(channels), source])
    total = torch.zeros(channels, dtype=torch.float64).index_add_(0, owner, raw)
    return raw / total[owner]


def plan_widen(scheme: str, variant: str, channels: int, width: int, *, normalised: bool,
               zero_in: bool, gen: torch.Generator) -> WidenPlan:
    """The :class:`WidenPlan` of ``scheme`` for ``channels -> width``.

    ``normalised``: a LayerNorm sees the channels (replicate every unit); ``zero_in``: for
    NetMorph, zero incoming weights are both smaller and exact (else zero outgoing).
    """
    n = width - channels
    plan = WidenPlan.empty(channels, n, random_bias=scheme == "stable")
    if normalised:
        plan.source = torch.arange(channels).repeat(width // channels - 1)
        if scheme == "net2net":
            plan.share.fill_(channels / width)
        elif scheme == "netmorph":
            plan.share[channels:] = 0.0
        else:
            plan.share = _random_shares(plan.source, channels, gen)
        plan.notes.append("a LayerNorm normalises the widened channels: every unit replicated")
        return plan
    if scheme == "net2net":
        plan.source = torch.randint(channels, (n,), generator=gen)
        count = 1 + torch.bincount(plan.source, minlength=channels).double()
        plan.share = 1.0 / torch.cat([count, count[plan.source]])
    elif scheme == "netmorph":
        ids = torch.arange(n)
        if zero_in:
            plan.fresh_out, plan.share[channels:] = ids, 0.0
            plan.notes.append("new units: zero incoming weights, random outgoing")
        else:
            plan.fresh_in, plan.share[channels:] = ids, 0.0
            plan.notes.append("new units: random incoming weights, zero outgoing")
    elif variant == "split":
        plan.source = (torch.randperm(channels, generator=gen)[:n] if n <= channels
                       else torch.randint(channels, (n,), generator=gen))
        plan.share = _random_shares(plan.source, channels, gen)
        plan.notes.append("new units: copies with random unequal outgoing shares")
    else:
        pairs = n // 2
        ids = torch.arange(pairs).repeat_interleave(2)
        plan.fresh_in[: 2 * pairs] = ids
        plan.fresh_out[: 2 * pairs] = ids
        plan.sign[: 2 * pairs] = torch.tensor([1.0, -1.0]).repeat(pairs)
        plan.share[channels: channels + 2 * pairs] = 0.0
        plan.template[: 2 * pairs] = torch.randint(channels, (pairs,), generator=gen
                                                   ).repeat_interleave(2)
        plan.notes.append(f"new units: {pairs} pairs with incoming (V, V), outgoing (Z, -Z)")
        if n % 2:
            s = int(torch.randint(channels, (1,), generator=gen))
            a = 0.25 + 0.5 * float(torch.rand(1, generator=gen, dtype=torch.float64))
            plan.source[-1] = s
            plan.share[s], plan.share[-1] = 1.0 - a, a
            plan.notes.append(f"odd count: unit {s} split into shares {1 - a:.3f} / {a:.3f}")
    return plan


# ----------------------------------------------------------------------------------------------
# applying a plan


def _rows(t: Tensor, plan: WidenPlan, fresh: Tensor | None) -> Tensor:
    """``plan.new`` extra rows (dim 0) for ``t``: copies of their source, fresh rows, or 0."""
    out = t.new_zeros(plan.new, *t.shape[1:])
    copy = plan.source >= 0
    out[copy] = t[plan.source[copy].to(t.device)]
    if fresh is not None:
        take = ~copy & (plan.fresh_in >= 0)
        out[take] = fresh[plan.fresh_in[take].to(t.device)]
    return out


def _fresh_rows(t: Tensor, plan: WidenPlan, fan_in: int, gen: torch.Generator) -> Tensor | None:
    count = int(plan.fresh_in.max()) + 1 if plan.new else 0
    if count <= 0:
        return None
    return randn((count, *t.shape[1:]), scale_of(t, fan_in), gen, t)


def _widen_producer(name: str, m: nn.Module, plan: WidenPlan, gen: torch.Generator,
                    origins: dict[str, ParamOrigin]) -> None:
    c = plan.channels
    index = torch.cat([torch.arange(c), plan.source])
    fan_in = m.weight[0].numel()
    fresh = _fresh_rows(m.weight, plan, fan_in, gen)
    weight = torch.cat([m.weight.detach(), _rows(m.weight.detach(), plan, fresh)])
    m.weight = new_parameter(weight, m.weight)
    origins[f"{name}.weight"] = ParamOrigin(f"{name}.weight", dim=0, index=index)
    if m.bias is not None:
        b = m.bias.detach()
        fresh_b = _fresh_rows(b, plan, fan_in, gen) if plan.random_bias else None
        m.bias = new_parameter(torch.cat([b, _rows(b, plan, fresh_b)]), m.bias)
        origins[f"{name}.bias"] = ParamOrigin(f"{name}.bias", dim=0, index=index)
    if isinstance(m, nn.Linear):
        m.out_features = weight.shape[0]
    else:
        m.out_channels = weight.shape[0]


def _channel_index(remap: Remap, plan: WidenPlan) -> tuple[Tensor, Tensor]:
    """Per child position: the parent position whose channel-wise values it copies (``-1``:
    none), and the new-unit id (``-1`` for old positions)."""
    c = plan.channels
    index = remap.parent.clone()
    new = remap.unit >= c
    j = torch.where(new, remap.unit - c, torch.full_like(remap.unit, -1))
    src = torch.where(new, plan.source[j.clamp(min=0)], -1)
    tmpl = torch.where(new & (src < 0), plan.template[j.clamp(min=0)], -1)
    borrow = torch.where(src >= 0, src, tmpl)
    has = new & (borrow >= 0)
    index[has] = remap.table[borrow[has], remap.sub[has]]
    return index, j


def _gather(t: Tensor, index: Tensor, default: float) -> Tensor:
    idx = index.to(t.device)
    out = t[idx.clamp(min=0)].clone()
    out[idx < 0] = default
    return out


def _widen_channelwise(name: str, m: nn.Module, remap: Remap, plan: WidenPlan,
                       gen: torch.Generator, origins: dict[str, ParamOrigin]) -> None:
    index, j = _channel_index(remap, plan)
    size = index.numel()

    def param(attr: str, default: float) -> None:
        p = getattr(m, attr)
        if p is None:
            return
        setattr(m, attr, new_parameter(_gather(p.detach(), index, default), p))
        origins[f"{name}.{attr}"] = ParamOrigin(f"{name}.{attr}", dim=0, index=index)

    if isinstance(m, BATCHNORM):
        param("weight", 1.0)
        param("bias", 0.0)
        if m.running_mean is not None:
            m.running_mean = _gather(m.running_mean, index, 0.0)
            m.running_var = _gather(m.running_var, index, 1.0)
        m.num_features = size
    elif isinstance(m, nn.LayerNorm):
        param("weight", 1.0)
        param("bias", 0.0)
        m.normalized_shape = (size,)
    elif isinstance(m, PAct):
        param("a", 1.0)
        m.channels = size
    elif is_depthwise(m):
        # Units with neither source nor template (NetMorph) get a random filter per incoming
        # id; pair members share their id, hence their filter.
        fan_in = m.weight[0].numel()
        weight = _gather(m.weight.detach(), index, 0.0)
        fresh = index < 0
        ids = plan.fresh_in[j[fresh].clamp(min=0)]
        if bool(fresh.any()):
            bank = randn((int(ids.max()) + 1, *m.weight.shape[1:]), scale_of(m.weight, fan_in),
                         gen, m.weight)
            weight[fresh.to(weight.device)] = bank[ids.clamp(min=0).to(weight.device)]
        m.weight = new_parameter(weight, m.weight)
        origins[f"{name}.weight"] = ParamOrigin(f"{name}.weight", dim=0, index=index)
        if m.bias is not None:
            bias = _gather(m.bias.detach(), index, 0.0)
            if plan.random_bias and bool(fresh.any()):
                bank = randn((int(ids.max()) + 1,), scale_of(m.bias, fan_in), gen, m.bias)
                bias[fresh.to(bias.device)] = bank[ids.clamp(min=0).to(bias.device)]
            m.bias = new_parameter(bias, m.bias)
            origins[f"{name}.bias"] = ParamOrigin(f"{name}.bias", dim=0, index=index)
        m.in_channels = m.out_channels = m.groups = size
    else:  # graph.py only reports the kinds above
        raise MorphError(f"cannot widen the channel-wise module {name!r} ({type(m).__name__})")


def _widen_consumer(name: str, m: nn.Module, remap: Remap, plan: WidenPlan,
                    gen: torch.Generator, origins: dict[str, ParamOrigin]) -> None:
    c = plan.channels
    w = m.weight.detach()
    src = remap.parent.clone()
    coef = torch.ones(src.numel(), dtype=torch.float64)
    grouped = remap.unit >= 0
    coef[grouped] = plan.share[remap.unit[grouped]]
    new = remap.unit >= c
    j = (remap.unit - c).clamp(min=0)
    copy = new & (plan.source[j] >= 0)
    src[copy] = remap.table[plan.source[j[copy]], remap.sub[copy]]
    src[coef == 0] = -1
    coef[src < 0] = 0.0
    shape = (1, -1, *([1] * (w.dim() - 2)))
    weight = w.index_select(1, src.clamp(min=0).to(w.device)) * coef.to(w).reshape(shape)
    fresh = new & (plan.fresh_out[j] >= 0)
    if bool(fresh.any()):
        ids = plan.fresh_out[j[fresh]]
        n_sub = int(remap.sub.max()) + 1
        bank = randn((int(ids.max()) + 1, n_sub, w.shape[0], *w.shape[2:]),
                     scale_of(w, w[0].numel()), gen, w)
        cols = bank[ids.to(w.device), remap.sub[fresh].to(w.device)]  # (f, out, k...)
        signs = plan.sign[j[fresh]].to(w).reshape(-1, *([1] * (cols.dim() - 1)))
        weight[:, fresh.to(w.device)] = (signs * cols).transpose(0, 1)
    m.weight = new_parameter(weight, m.weight)
    origins[f"{name}.weight"] = ParamOrigin(f"{name}.weight", dim=1, index=src, scale=coef)
    if isinstance(m, nn.Linear):
        m.in_features = weight.shape[1]
    else:
        m.in_channels = weight.shape[1]


def _unit_params(group: ChannelGroup, modules: dict[str, nn.Module]) -> tuple[int, int]:
    """Parameters per unit on the incoming side and on the outgoing side."""
    incoming = sum(modules[p].weight[0].numel() for p in group.producers)
    outgoing = 0
    for use in group.uses:
        m = modules[use.module]
        if use.kind == "channelwise":
            incoming += sum(p.numel() for p in m.parameters()) // len(use.labels)
        else:
            subs = int(use.labels.sub.max()) + 1
            outgoing += m.weight.shape[0] * m.weight[0, 0].numel() * subs
    return incoming, outgoing


def apply_plan(child: nn.Module, group: ChannelGroup, plan: WidenPlan,
               gen: torch.Generator) -> dict[str, ParamOrigin]:
    """Edit ``child``'s modules in place by ``plan``; returns the changed parameters'
    origins."""
    modules = dict(child.named_modules())
    origins: dict[str, ParamOrigin] = {}
    width = plan.channels + plan.new
    remaps = group.remaps(width)
    for name in group.producers:
        _widen_producer(name, modules[name], plan, gen, origins)
    for use in group.uses:
        m, remap = modules[use.module], remaps[use.module]
        if use.kind == "consumer":
            _widen_consumer(use.module, m, remap, plan, gen, origins)
        else:
            _widen_channelwise(use.module, m, remap, plan, gen, origins)
    return origins


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
) -> nn.Module:
    """A copy of ``model`` in which layer ``target`` (a dense Conv1d/2d/3d or Linear) and
    every layer tied to its channels have ``width`` output units, computing the same function.

    Args:
        model: the parent; never modified.
        target: dotted module name of the layer to widen.
        width: the new number of output units/channels (> the current one; a multiple of it
            when a LayerNorm normalises them).
        scheme: ``"stable"`` (default), ``"netmorph"`` or ``"net2net"`` (module docstring).
        variant: ``"stable"``: ``"pairs"`` (default) or ``"split"``.
        seed: seeds every random choice (units copied, random weights).
        inputs / input_shape: the probe batch to verify on (see :mod:`.contract`).
        tol: largest accepted ``max_rel`` (default by dtype; float32: 1e-5).

    Returns:
        The child, with a :class:`~stablemorph.record.MorphRecord` attached.

    Raises:
        MorphError: unknown/unsupported layer, ``width`` not larger, a channel tie widening
            cannot follow, an untraceable model, or a failed verification.
    """
    check_scheme(scheme)
    variant = variant or VARIANTS[scheme][0]
    if variant not in VARIANTS[scheme]:
        raise MorphError(f"unknown variant {variant!r} for widen scheme {scheme!r}; "
                         f"choose one of {VARIANTS[scheme]}")
    layer = get_layer(model, target, (nn.Linear, *CONV), "widen")
    current = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if not isinstance(width, int) or width <= current:
        raise MorphError(
            f"widen {target!r}: width must be an int larger than the current {current}, "
            f"got {width!r}"
        )

    def surgery(child: nn.Module, probe: tuple[Tensor, ...]) -> Surgery:
        group = channel_group(child, target, probe)
        if group.normalised and width % current:
            raise MorphError(
                f"widen {target!r}: a LayerNorm normalises these channels, so every unit must "
                f"be replicated equally: width must be a multiple of {current}, got {width}"
            )
        modules = dict(child.named_modules())
        incoming, outgoing = _unit_params(group, modules)
        zero_in = group.zero_preserving and incoming < outgoing
        gen = generator(seed)
        plan = plan_widen(scheme, variant, current, width, normalised=group.normalised,
                          zero_in=zero_in, gen=gen)
        origins = apply_plan(child, group, plan, gen)
        notes = [f"channel group: producers {group.producers}",
                 f"{len(group.uses)} modules read the channels", *plan.notes]
        return Surgery(origins=origins, notes=notes)

    kwargs = {"width": width, "scheme": scheme, "variant": variant, "seed": seed}
    return run_morph("widen", model, target, scheme, kwargs, surgery, inputs, input_shape, tol)
