"""What a layer handler is, the plan it executes, and the tensor operations every handler
shares.

Growth is the dual of pruning: where Torch-Pruning's pruning functions remove output or input
channels of one layer type, a :class:`Handler` *adds* units to one layer type, on its output
side (:meth:`Handler.grow_out`, the layer produces the widened units), on its input side
(:meth:`Handler.grow_in`, the layer reads them), or both at once for channel-wise layers
(:meth:`Handler.grow_channels`: norms, per-channel activations, depthwise convs, whose input
channel ``k`` is their output channel ``k``).

A handler knows nothing of schemes. It executes a :class:`WidenPlan` (which old unit each
new unit copies, which random vector it gets instead, the outgoing share of every unit) that
the scheme (:mod:`stablemorph.schemes`) chose, and a :class:`~stablemorph.graph.Remap` (for
every position of the layer's child input, the parent position or new unit it holds) that
the graph analysis computed.

Most layers are described by a table, not code: :class:`Dense` names the parameters holding
the output units and the input units (attribute path and dim) and the attributes holding the
sizes; :class:`Channelwise` names the per-channel parameters and buffers with the value a unit
with nothing to copy gets. Roles:

- ``"dense"``: output units independent of input units (Linear, Conv, Embedding, HF Conv1D,
  a user's fused-qkv attention);
- ``"channelwise"``: one parameter slice per channel, input aliases output (BatchNorm,
  LayerNorm, GroupNorm, RMSNorm, per-channel PAct, depthwise conv);
- ``"elementwise"``: no parameters per channel, channels pass through (activations,
  dropout, pooling, identity).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from stablemorph.record import ParamOrigin

if TYPE_CHECKING:
    from stablemorph.graph import Remap

Origins = dict[str, ParamOrigin]


@dataclass
class WidenPlan:
    """Values of ``new`` extra units on top of ``channels`` (all tensors on the CPU); the
    scheme decides it, handlers execute it.

    Per new unit ``j``: ``source[j]`` the old unit it copies (incoming weights and
    channel-wise parameters; ``-1``: none), else ``fresh_in[j]`` the id of its random
    incoming vector (pairs share one; ``-1``: zero incoming) and ``template[j]`` the old unit
    whose channel-wise parameters it borrows (``-1``: fresh defaults). Outgoing: every unit
    ``u`` (old and new) contributes ``share[u]`` times its source's parent column, new unit
    ``j`` adds ``sign[j]`` times random outgoing vector ``fresh_out[j]`` (``-1``: none).
    ``random_bias``: fresh units also get a random bias (else 0).
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


# ----------------------------------------------------------------------------------------------
# tensor operations shared by every handler


def get_path(m: nn.Module, path: str) -> object:
    """``m.a.b`` for ``path="a.b"``."""
    return functools.reduce(getattr, path.split("."), m)


def set_path(m: nn.Module, path: str, value: object) -> None:
    """Set ``m.a.b = value`` for ``path="a.b"``."""
    owner, _, attr = path.rpartition(".")
    setattr(get_path(m, owner) if owner else m, attr, value)


def _helpers() -> ModuleType:  # late: morphs.contract imports the graph, which imports us
    from stablemorph.morphs import contract

    return contract


def _set_param(m: nn.Module, path: str, value: Tensor, old: nn.Parameter) -> None:
    set_path(m, path, _helpers().new_parameter(value, old))


def _bank(count: int, shape: Sequence[int], like: Tensor, fan_in: int,
          gen: torch.Generator) -> Tensor:
    c = _helpers()
    return c.randn((count, *shape), c.scale_of(like, fan_in), gen, like)


def grow_rows(t: Tensor, plan: WidenPlan, fan_in: int, gen: torch.Generator,
              fresh: bool) -> Tensor:
    """``t`` (units on dim 0) with ``plan.new`` rows appended: copies of their source, a
    random row per fresh id (pair members share it) when ``fresh``, else 0."""
    out = t.new_zeros(plan.new, *t.shape[1:])
    copy = plan.source >= 0
    out[copy] = t[plan.source[copy].to(t.device)]
    take = ~copy & (plan.fresh_in >= 0)
    if fresh and bool(take.any()):
        bank = _bank(int(plan.fresh_in.max()) + 1, t.shape[1:], t, fan_in, gen)
        out[take] = bank[plan.fresh_in[take].to(t.device)]
    return torch.cat([t, out])


def grow_columns(w: Tensor, remap: Remap, plan: WidenPlan, gen: torch.Generator
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """``w`` (outputs on dim 0, the widened inputs on dim 1) with one column per child input
    position: the source column times its share, or ``sign * `` a fresh random column.

    Returns the new weight, the parent column of each child column (``-1``: fresh or zero)
    and its scale."""
    c = plan.channels
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
        bank = _bank(int(ids.max()) + 1, (n_sub, w.shape[0], *w.shape[2:]), w,
                     w[0].numel(), gen)
        cols = bank[ids.to(w.device), remap.sub[fresh].to(w.device)]  # (f, out, k...)
        signs = plan.sign[j[fresh]].to(w).reshape(-1, *([1] * (cols.dim() - 1)))
        weight[:, fresh.to(w.device)] = (signs * cols).transpose(0, 1)
    return weight, src, coef


def channel_index(remap: Remap, plan: WidenPlan) -> tuple[Tensor, Tensor]:
    """Per child position of a channel-wise layer: the parent position whose values it copies
    (``-1``: none) and its new-unit id (``-1`` for old positions)."""
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


def gather(t: Tensor, index: Tensor, default: float) -> Tensor:
    """``t[index]`` along dim 0, ``default`` where ``index < 0``."""
    idx = index.to(t.device)
    out = t[idx.clamp(min=0)].clone()
    out[idx < 0] = default
    return out


def grow_parameter(root: nn.Module, path: str, dim: int, default: float, remap: Remap,
                   plan: WidenPlan, origins: Origins) -> None:
    """Grow the bare per-channel parameter ``path`` of ``root`` (one value per channel on
    ``dim``, e.g. a layer scale): new channels copy their source's or template's value, else
    ``default``."""
    index, _ = channel_index(remap, plan)
    p = get_path(root, path)
    t = p.detach().movedim(dim, 0)  # type: ignore[attr-defined]
    grown = gather(t, index, default).movedim(0, dim)
    if isinstance(p, nn.Parameter):
        _set_param(root, path, grown, p)
        origins[path] = ParamOrigin(path, dim=dim, index=index)
    else:
        set_path(root, path, grown)


# ----------------------------------------------------------------------------------------------
# handlers


class Handler:
    """Knows one layer type's units and how to grow them (module docstring).

    Subclass it (or use the tables :class:`Dense`, :class:`Channelwise`,
    :class:`Elementwise`) and register it with :func:`stablemorph.register_handler`.
    Methods take the module and, for growth, its dotted ``name`` (origins are keyed
    ``f"{name}.{param}"``) and the ``origins`` dict to fill: one
    :class:`~stablemorph.record.ParamOrigin` per parameter changed.
    """

    def role(self, m: nn.Module) -> str:
        """``"dense"``, ``"channelwise"`` or ``"elementwise"``."""
        return "elementwise"

    def out_units(self, m: nn.Module) -> int | None:
        """Units the layer produces (``None``: it produces none of its own)."""
        return None

    def in_units(self, m: nn.Module) -> int | None:
        """Units the layer reads (``None``: its input has no units, e.g. token ids)."""
        return None

    def unit_dim(self, m: nn.Module, ndim: int) -> int:
        """The dim holding the units of the layer's input and output tensors (``ndim`` dims),
        as a non-negative index."""
        return 1 if ndim > 1 else 0

    def maps_zero(self, m: nn.Module) -> bool:
        """A unit whose input is 0 gives 0 (parameters of a fresh unit: their defaults)."""
        return True

    def norm_block(self, m: nn.Module) -> int | None:
        """How many consecutive units are normalised together: ``None`` (each alone),
        ``0`` (all of them: every unit must be replicated equally) or a group size."""
        return None

    def refusal(self, m: nn.Module, side: str) -> str | None:
        """Why side ``"in"`` or ``"out"`` of ``m`` cannot grow (``None``: it can)."""
        return None

    def params_per_unit(self, m: nn.Module, side: str) -> int:
        """Parameters one unit owns on ``side`` (NetMorph zeroes the smaller side)."""
        return 0

    def grow_out(self, name: str, m: nn.Module, plan: WidenPlan, gen: torch.Generator,
                 origins: Origins) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot grow the output of {name!r}")

    def grow_in(self, name: str, m: nn.Module, remap: Remap, plan: WidenPlan,
                gen: torch.Generator, origins: Origins) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot grow the input of {name!r}")

    def grow_channels(self, name: str, m: nn.Module, remap: Remap, plan: WidenPlan,
                      gen: torch.Generator, origins: Origins) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no channels in {name!r}")


Param = tuple[str, int]  # (attribute path, dim holding the units)


class Dense(Handler):
    """A layer with output units and (optionally) input units, described by a table.

    Args:
        out_params: ``(path, dim)`` of every parameter indexed by output unit, the weight
            first (e.g. ``[("weight", 0), ("bias", 0)]`` for ``nn.Linear``). Parameters with
            more than one dim get random rows for fresh units; one-dim ones (biases) only
            when the plan asks for a random bias.
        in_params: ``(path, dim)`` of every parameter indexed by input unit (``[("weight",
            1)]`` for ``nn.Linear``).
        out_size / in_size: attribute paths holding the unit counts, updated after growth
            (``["out_features"]``).
        dim: the dim of the layer's input and output tensors holding the units (``-1``:
            last, as for Linear; ``1``: channels-first, as for Conv).
    """

    def __init__(self, out_params: Sequence[Param] = (), in_params: Sequence[Param] = (),
                 out_size: Sequence[str] = (), in_size: Sequence[str] = (), dim: int = -1
                 ) -> None:
        self.out_params, self.in_params = list(out_params), list(in_params)
        self.out_size, self.in_size = list(out_size), list(in_size)
        self.dim = dim

    def role(self, m: nn.Module) -> str:
        return "dense"

    def _units(self, m: nn.Module, params: list[Param]) -> int | None:
        if not params:
            return None
        path, dim = params[0]
        return int(get_path(m, path).shape[dim])  # type: ignore[attr-defined]

    def out_units(self, m: nn.Module) -> int | None:
        return self._units(m, self.out_params)

    def in_units(self, m: nn.Module) -> int | None:
        return self._units(m, self.in_params)

    def unit_dim(self, m: nn.Module, ndim: int) -> int:
        return self.dim % ndim

    def params_per_unit(self, m: nn.Module, side: str) -> int:
        params = self.out_params if side == "out" else self.in_params
        units = self.out_units(m) if side == "out" else self.in_units(m)
        sizes = [get_path(m, p) for p, _ in params]
        return sum(t.numel() for t in sizes if t is not None) // max(units or 1, 1)

    def _resize(self, m: nn.Module, attrs: list[str], n: int) -> None:
        for attr in attrs:
            set_path(m, attr, n)

    def grow_out(self, name: str, m: nn.Module, plan: WidenPlan, gen: torch.Generator,
                 origins: Origins) -> None:
        index = torch.cat([torch.arange(plan.channels), plan.source])
        first, dim0 = self.out_params[0]
        fan_in = get_path(m, first).detach().movedim(dim0, 0)[0].numel()  # type: ignore
        for path, dim in self.out_params:
            p = get_path(m, path)
            if p is None:  # e.g. no bias
                continue
            t = p.detach().movedim(dim, 0)  # type: ignore[attr-defined]
            grown = grow_rows(t, plan, fan_in, gen, fresh=t.dim() > 1 or plan.random_bias)
            _set_param(m, path, grown.movedim(0, dim), p)  # type: ignore[arg-type]
            origins[f"{name}.{path}"] = ParamOrigin(f"{name}.{path}", dim=dim, index=index)
        self._resize(m, self.out_size, plan.channels + plan.new)

    def grow_in(self, name: str, m: nn.Module, remap: Remap, plan: WidenPlan,
                gen: torch.Generator, origins: Origins) -> None:
        size = remap.parent.numel()
        for path, dim in self.in_params:
            p = get_path(m, path)
            w = p.detach().movedim(dim, 1)  # type: ignore[attr-defined]
            weight, src, coef = grow_columns(w, remap, plan, gen)
            _set_param(m, path, weight.movedim(1, dim), p)  # type: ignore[arg-type]
            origins[f"{name}.{path}"] = ParamOrigin(f"{name}.{path}", dim=dim, index=src,
                                                   scale=coef)
        self._resize(m, self.in_size, size)


class Channelwise(Handler):
    """A layer with one slice per channel on dim 0 of each parameter and buffer, input
    channel ``k`` being output channel ``k``.

    Args:
        params / buffers: ``(path, default)``: the value a new channel gets when the plan
            gives it nothing to copy (``("weight", 1.0)``, ``("running_var", 1.0)``).
        size: attribute paths holding the channel count.
        dim: the dim of the input holding the channels (``1``: channels-first; ``-1``).
        block: :meth:`Handler.norm_block` (``0`` for a norm over every channel).
        zero: :meth:`Handler.maps_zero` with default parameters.
    """

    def __init__(self, params: Sequence[tuple[str, float]] = (),
                 buffers: Sequence[tuple[str, float]] = (), size: Sequence[str] = (),
                 dim: int = 1, block: int | None = None, zero: bool = True) -> None:
        self.params, self.buffers, self.size = list(params), list(buffers), list(size)
        self.dim, self.block, self.zero = dim, block, zero

    def role(self, m: nn.Module) -> str:
        return "channelwise"

    def unit_dim(self, m: nn.Module, ndim: int) -> int:
        return self.dim % ndim

    def maps_zero(self, m: nn.Module) -> bool:
        return self.zero

    def norm_block(self, m: nn.Module) -> int | None:
        return self.block

    def params_per_unit(self, m: nn.Module, side: str) -> int:
        return sum(1 for p, _ in self.params if get_path(m, p) is not None)

    def resize(self, m: nn.Module, n: int) -> None:
        for attr in self.size:
            old = get_path(m, attr)
            set_path(m, attr, (n,) if isinstance(old, tuple) else n)

    def grow_channels(self, name: str, m: nn.Module, remap: Remap, plan: WidenPlan,
                      gen: torch.Generator, origins: Origins) -> None:
        index, _ = channel_index(remap, plan)
        for path, default in self.params:
            p = get_path(m, path)
            if p is None:
                continue
            _set_param(m, path, gather(p.detach(), index, default), p)  # type: ignore
            origins[f"{name}.{path}"] = ParamOrigin(f"{name}.{path}", dim=0, index=index)
        for path, default in self.buffers:
            b = get_path(m, path)
            if b is not None:
                set_path(m, path, gather(b, index, default))  # type: ignore[arg-type]
        self.resize(m, index.numel())


class Elementwise(Handler):
    """No parameters per channel: channels pass through. ``zero``: ``f(0) == 0``."""

    def __init__(self, zero: bool = True) -> None:
        self.zero = zero

    def maps_zero(self, m: nn.Module) -> bool:
        return self.zero


__all__ = [
    "Channelwise", "Dense", "Elementwise", "Handler", "Param", "WidenPlan", "channel_index",
    "gather", "get_path", "grow_columns", "grow_parameter", "grow_rows", "set_path",
]
