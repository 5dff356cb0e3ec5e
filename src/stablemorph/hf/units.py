"""Adding hidden units (MLP neurons, attention heads) to one block, exactly, under each scheme.

Tensors are in Linear layout, float64: a unit owns ``size`` consecutive *rows* of each
incoming tensor (``q``/``up``/``gate`` weights and biases) and ``size`` consecutive *columns*
of each outgoing tensor (``o``/``down`` weights). Units fall into *classes*: two units of a
class compute the same output whenever their incoming rows are equal (every MLP neuron is in
one class; a query head's class is the set of key/value slots holding the same keys and
values). The block's output is the sum over units of ``outgoing columns @ unit output``, so:

- ``net2net``: a new unit copies the incoming rows of a random old unit of its class; the old
  unit and its copies share its outgoing columns equally (``1/c`` each);
- ``netmorph``: random incoming rows, zero outgoing columns;
- ``stable`` (dense): the new units of a class form *cancelling groups* of 2 (one of 3 when
  their number is odd) sharing random incoming rows, whose outgoing columns are random with
  zero sum over the group (``(Z, -Z)``; ``(Z1, Z2, -Z1 - Z2)``): identical outputs, opposite
  writes, nothing added, no zero. A class with a single new unit splits a random old unit of
  the class instead, with unequal non-zero shares ``(a, 1 - a)``, ``a ~ U(0.25, 0.75)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class UnitError(ValueError):
    """A unit growth that cannot be exact under the scheme asked for (message says why)."""


def rms(t: Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0


def normal(shape: Sequence[int], std: float, gen: torch.Generator) -> Tensor:
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * std


def cancelling_groups(n: int) -> list[list[int]]:
    """``n >= 2`` positions in groups of 2, the last one of 3 when ``n`` is odd."""
    if n < 2:
        raise UnitError(f"internal: {n} units cannot form a cancelling group")
    groups = [[i, i + 1] for i in range(0, n - (3 if n % 2 else 0), 2)]
    if n % 2:
        groups.append([n - 3, n - 2, n - 1])
    return groups


def add_units(
    incoming: dict[str, Tensor],
    outgoing: dict[str, Tensor],
    size: int,
    old_class: Sequence[int],
    new_class: Sequence[int],
    scheme: str,
    gen: torch.Generator,
    std: dict[str, float],
    out_scale: float,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Append ``len(new_class)`` units after the ``len(old_class)`` old ones.

    ``incoming``: name -> ``(n_old * size, fan_in)`` or ``(n_old * size,)``; ``outgoing``:
    name -> ``(fan_out, n_old * size)``. ``std``: scale of fresh entries per name (the
    outgoing ones are multiplied by ``out_scale`` under ``stable``). Returns the grown
    tensors; the old units' incoming rows are unchanged, their outgoing columns are scaled
    by their share (``net2net``, ``stable`` splits).
    """
    n_old, n_new = len(old_class), len(new_class)
    ins = {k: v.reshape(n_old, size, *v.shape[1:]) for k, v in incoming.items()}
    outs = {k: v.reshape(v.shape[0], n_old, size) for k, v in outgoing.items()}
    new_in = {k: torch.zeros(n_new, size, *v.shape[2:], dtype=torch.float64)
              for k, v in ins.items()}
    new_out = {k: torch.zeros(v.shape[0], n_new, size, dtype=torch.float64)
               for k, v in outs.items()}
    share = torch.ones(n_old, dtype=torch.float64)
    copy_of = torch.full((n_new,), -1)  # the old unit a new unit copies
    copy_share = torch.zeros(n_new, dtype=torch.float64)
    classes = torch.tensor(list(new_class), dtype=torch.long)
    old_cls = torch.tensor(list(old_class), dtype=torch.long)
    for cls in sorted(set(new_class)):
        free = (classes == cls).nonzero().flatten()
        olds = (old_cls == cls).nonzero().flatten()
        if scheme == "netmorph":
            for k, v in new_in.items():
                v[free] = normal((len(free), *v.shape[1:]), std[k], gen)
        elif scheme == "net2net" or len(free) == 1:
            if not len(olds):
                raise UnitError("no existing unit to copy in this class")
            copy_of[free] = olds[torch.randint(len(olds), (len(free),), generator=gen)]
            if scheme == "stable":  # one new unit: an unequal split
                copy_share[free] = 0.25 + 0.5 * torch.rand(1, generator=gen,
                                                          dtype=torch.float64)
        else:  # stable, >= 2 free units: cancelling groups sharing incoming rows
            groups = cancelling_groups(len(free))
            member = torch.zeros(len(free), dtype=torch.long)
            for g, group in enumerate(groups):
                member[group] = g
            for k, v in new_in.items():
                rows = normal((len(groups), *v.shape[1:]), std[k], gen)
                v[free] = rows[member]
            last = torch.tensor([group[-1] for group in groups])
            for k, v in new_out.items():
                cols = normal((v.shape[0], len(free), size), std[k] * out_scale, gen)
                cols[:, last] = 0.0
                sums = torch.zeros(v.shape[0], len(groups), size, dtype=torch.float64)
                sums.index_add_(1, member, cols)
                cols[:, last] = -sums
                v[:, free] = cols
    copied = (copy_of >= 0).nonzero().flatten()
    if len(copied):
        src = copy_of[copied]
        for k, v in new_in.items():
            v[copied] = ins[k][src]
        if scheme == "net2net":
            count = 1.0 + torch.bincount(src, minlength=n_old).double()
            share = 1.0 / count
            copy_share[copied] = share[src]
        else:  # stable splits: the old unit keeps 1 - a
            share = share.index_put((src,), 1.0 - copy_share[copied])
        for k, v in new_out.items():
            v[:, copied] = outs[k][:, src] * copy_share[copied][None, :, None]
    grown_in = {k: torch.cat([ins[k], new_in[k]], 0).reshape(-1, *incoming[k].shape[1:])
                for k in incoming}
    grown_out = {k: torch.cat([outs[k] * share[None, :, None], new_out[k]], 1)
                 .reshape(outgoing[k].shape[0], -1) for k in outgoing}
    return grown_in, grown_out
