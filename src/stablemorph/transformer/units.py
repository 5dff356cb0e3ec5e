"""Adding head-structured hidden units (attention heads, and the heads and MLP units of a new
block) exactly, under each scheme; the MLP width of an existing block grows by
:func:`stablemorph.widen` instead (:mod:`~stablemorph.transformer.mlp_width`).

A set of units is read by ``incoming`` parameters (units along dim 0: weight rows and bias
entries) and written out by ``outgoing`` parameters (units along dim 1: weight columns).
A unit spans ``size`` consecutive entries: 1 for a neuron, ``head_dim`` for a head (its q, k, v
rows and its columns of the output projection).

Why each scheme is exact (every unit's output depends only on its own incoming entries, and
the block's output is the sum over units of ``outgoing columns @ unit output``):

- ``net2net``: a new unit copies the incoming entries of a random old unit, so it computes
  the same output; the old unit and its copies split its outgoing weights equally (``1/c``).
- ``netmorph``: new units have random incoming entries and zero outgoing columns.
- ``stable``: new units come in *cancelling groups* of 2 (one group of 3 when their number is
  odd): a group shares fresh random incoming entries, so its members compute identical
  outputs, and its outgoing columns are random with zero sum over the group, so the group adds
  exactly nothing. Every new entry is a non-zero random number. With a single new unit no
  group can be formed: it then splits a random old unit with unequal non-zero shares
  ``(a, 1 - a)``, ``a ~ U(0.25, 0.75)`` (incoming entries copied), as in LEMON.

``out_scale`` (``stable`` only): the rms of the new groups' outgoing columns relative to the
existing ones'. Under Adam every parameter with a non-zero gradient moves by about the
learning rate on the first step, whatever its gradient's size; in a cancelling group both the
outgoing and the incoming entries have gradients (the incoming ones in proportion to the
outgoing), so full-scale groups move the function far more per step than the parent's own
weights do. Measured on the tiny GPT grown x2 in depth and width and trained on with AdamW at
the parent's rate (``benchmarks/results/transformer.md``): the validation loss rose by 0.39
nats in the first 50 steps with ``out_scale=1``, by 0.05 with 0.1 (Net2Net: 0.03, NetMorph:
0.08), and a probe with 0.01 behaved as 0.1. :data:`DEFAULT_OUT_SCALE` is 0.1, far from the
near-zero threshold (1e-3 of the rms). Full scale, though, ended lower after 300 steps.

Adding units to an *empty* set (``n_old = 0``) builds a new, exactly-zero residual branch
(used by depth growth).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from stablemorph.record import ParamOrigin
from stablemorph.transformer.surgery import DEFAULT_OUT_SCALE, ChildParams, rms

__all__ = ["DEFAULT_OUT_SCALE", "Units", "add_units", "entry_index"]


@dataclass(frozen=True)
class Units:
    """Where a set of units lives, by child parameter name (see module docstring)."""

    incoming: tuple[str, ...]
    outgoing: tuple[str, ...]
    size: int


def entry_index(unit_index: Tensor, size: int) -> Tensor:
    """Unit indices ``(n,)`` -> entry indices ``(n * size,)``; ``-1`` (new) stays ``-1``."""
    entries = unit_index[:, None] * size + torch.arange(size)
    return torch.where(unit_index[:, None] < 0, -1, entries).reshape(-1)


def default_std(params: ChildParams, units: Units) -> dict[str, float]:
    """The rms of each existing tensor (falling back to the rms of the group's weights for
    all-zero biases): the scale of fresh random entries."""
    stds = {n: rms(params.values[n]) for n in units.incoming + units.outgoing}
    weight_rms = max((stds[n] for n in stds if n.endswith("weight")), default=0.0) or 0.02
    return {n: s if s > 0 else weight_rms for n, s in stds.items()}


def add_units(
    params: ChildParams,
    units: Units,
    n_new: int,
    scheme: str,
    gen: torch.Generator,
    std: dict[str, float] | None = None,
    out_scale: float = DEFAULT_OUT_SCALE,
) -> None:
    """Grow ``units`` from their current count to ``n_new`` in ``params`` (in place).

    ``std`` sets the scale of fresh entries per parameter (default :func:`default_std`), and
    ``out_scale`` multiplies it for stable's outgoing columns. Each parameter keeps the
    analogue it has in ``params``.
    """
    n_old = params.values[units.incoming[0]].shape[0] // units.size
    delta = n_new - n_old
    if delta <= 0:
        raise ValueError(f"internal: units must grow, got {n_old} -> {n_new}")
    std = default_std(params, units) if std is None else std
    old = torch.arange(n_old)

    if scheme == "net2net":
        if n_old == 0:
            raise ValueError("net2net cannot copy units from an empty set")
        src = torch.randint(0, n_old, (delta,), generator=gen)
        idx = torch.cat([old, src])
        count = 1.0 + torch.bincount(src, minlength=n_old).double()
        out_scale = 1.0 / count[idx]
        incoming = {n: _take(params.values[n], 0, idx, units.size) for n in units.incoming}
        outgoing = {
            n: _take(params.values[n], 1, idx, units.size) * _expand(out_scale, units.size)
            for n in units.outgoing
        }
        in_origin, out_origin = (idx, None), (idx, out_scale)

    elif scheme == "netmorph" or delta >= 2:
        idx = torch.cat([old, torch.full((delta,), -1)])
        n_fresh = delta * units.size
        if scheme == "netmorph":
            # Random fan-in (zero biases, as a freshly initialised Linear), zero fan-out.
            fresh_in = {
                n: _normal(params.values[n], n_fresh, 0, std[n] if n.endswith("weight") else 0.0,
                           gen)
                for n in units.incoming
            }
            fresh_out = {n: _normal(params.values[n], n_fresh, 1, 0.0, gen)
                         for n in units.outgoing}
        else:
            groups = _group_ids(delta)
            n_groups = int(groups.max()) + 1
            fresh_in = {
                n: _shared(_normal(params.values[n], n_groups, 0, std[n], gen, units.size),
                           groups, 0, units.size)
                for n in units.incoming
            }
            fresh_out = {
                n: _zero_sum(_normal(params.values[n], n_fresh, 1, std[n] * out_scale, gen),
                             groups, units.size)
                for n in units.outgoing
            }
        incoming = {n: torch.cat([params.values[n], fresh_in[n]], 0) for n in units.incoming}
        outgoing = {n: torch.cat([params.values[n], fresh_out[n]], 1) for n in units.outgoing}
        in_origin, out_origin = (idx, None), (idx, None)

    else:  # stable with exactly one new unit: unequal split of a random old unit
        if n_old == 0:
            raise ValueError("stable growth of an empty set needs at least 2 new units")
        j = int(torch.randint(0, n_old, (1,), generator=gen))
        a = 0.25 + 0.5 * float(torch.rand((), generator=gen, dtype=torch.float64))
        idx = torch.cat([old, torch.tensor([j])])
        out_scale = torch.ones(n_new, dtype=torch.float64)
        out_scale[j], out_scale[n_old] = a, 1.0 - a
        incoming = {n: _take(params.values[n], 0, idx, units.size) for n in units.incoming}
        outgoing = {
            n: _take(params.values[n], 1, idx, units.size) * _expand(out_scale, units.size)
            for n in units.outgoing
        }
        in_origin, out_origin = (idx, None), (idx, out_scale)

    for names, values, (index, scale), dim in (
        (units.incoming, incoming, in_origin, 0),
        (units.outgoing, outgoing, out_origin, 1),
    ):
        entries = entry_index(index, units.size)
        entry_scale = None if scale is None else _expand(scale, units.size).reshape(-1)
        for n in names:
            source = params.origins[n].source if params.origins[n].index is None else None
            origin = (ParamOrigin(source, dim=dim, index=entries, scale=entry_scale)
                      if source is not None else ParamOrigin(None))
            params.set(n, values[n], origin, params.analogue[n])


def _take(t: Tensor, dim: int, unit_index: Tensor, size: int) -> Tensor:
    return t.index_select(dim, entry_index(unit_index, size))


def _expand(unit_values: Tensor, size: int) -> Tensor:
    """Per-unit values -> per-entry values, shaped to broadcast along dim 1 (columns)."""
    return unit_values.repeat_interleave(size)


def _normal(like: Tensor, n: int, dim: int, std: float, gen: torch.Generator,
            size: int = 1) -> Tensor:
    """A ``like``-shaped tensor with ``n * size`` entries along ``dim``, N(0, std^2)."""
    shape = list(like.shape)
    shape[dim] = n * size
    return torch.randn(shape, generator=gen, dtype=torch.float64) * std


def _group_ids(delta: int) -> Tensor:
    """Cancelling-group id of each of ``delta >= 2`` new units: pairs, the last one a triple
    when ``delta`` is odd."""
    ids = torch.arange(delta) // 2
    if delta % 2:
        ids[-1] = ids[-2]
    return ids


def _shared(per_group: Tensor, groups: Tensor, dim: int, size: int) -> Tensor:
    """Repeat each group's entries for each of its units."""
    return per_group.index_select(dim, entry_index(groups, size))


def _zero_sum(cols: Tensor, groups: Tensor, size: int) -> Tensor:
    """Make the outgoing columns of each group sum to zero (per entry within the unit), keeping
    their scale: subtract the group mean, rescale by ``sqrt(g / (g - 1))``."""
    out = cols.clone()
    rows = cols.shape[0]
    for g in groups.unique():
        members = (groups == g).nonzero().flatten()
        block = out.view(rows, -1, size)[:, members]  # (rows, g, size)
        k = len(members)
        centred = (block - block.mean(1, keepdim=True)) * (k / (k - 1)) ** 0.5
        out.view(rows, -1, size)[:, members] = centred
    return out
