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


def zero_sum(cols: Tensor, count: int) -> Tensor:
    """``count`` blocks of columns (``cols``: ``(rows, count * size)``) made to sum to zero
    over the blocks: the last block is minus the sum of the others."""
    size = cols.shape[1] // count
    blocks = list(cols.split(size, dim=1))
    blocks[-1] = -sum(blocks[:-1])
    return torch.cat(blocks, 1)


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
    new_in = {k: [_unit(v, 0, i, size) for i in range(n_old)] for k, v in incoming.items()}
    out_old = {k: [_unit(v, 1, i, size) for i in range(n_old)] for k, v in outgoing.items()}
    new_rows: dict[int, dict[str, Tensor]] = {}
    new_cols: dict[int, dict[str, Tensor]] = {}
    share = [1.0] * n_old
    copies: dict[int, list[int]] = {}  # old unit -> new units copying it (with their shares)
    split: dict[int, float] = {}
    for cls in sorted(set(new_class)):
        free = [u for u, c in enumerate(new_class) if c == cls]
        olds = [u for u, c in enumerate(old_class) if c == cls]
        if scheme == "netmorph":
            for u in free:
                new_rows[u] = {k: normal(_shape(v, 0, size), std[k], gen) for k, v in
                               incoming.items()}
                new_cols[u] = {k: torch.zeros(_shape(v, 1, size), dtype=torch.float64)
                               for k, v in outgoing.items()}
        elif scheme == "net2net" or len(free) == 1:
            if not olds:
                raise UnitError("no existing unit to copy in this class")
            for u in free:
                j = olds[int(torch.randint(len(olds), (1,), generator=gen))]
                copies.setdefault(j, []).append(u)
                new_rows[u] = {k: v[0].clone() for k, v in _rows_of(new_in, j).items()}
                if scheme == "stable":
                    split[u] = 0.25 + 0.5 * float(torch.rand((), generator=gen,
                                                             dtype=torch.float64))
        else:  # stable, >= 2 free units: cancelling groups
            for group in cancelling_groups(len(free)):
                rows = {k: normal(_shape(v, 0, size), std[k], gen) for k, v in incoming.items()}
                cols = {k: zero_sum(normal((v.shape[0], size * len(group)),
                                           std[k] * out_scale, gen), len(group))
                        for k, v in outgoing.items()}
                for pos, g in enumerate(group):
                    u = free[g]
                    new_rows[u] = {k: r.clone() for k, r in rows.items()}
                    new_cols[u] = {k: c[:, pos * size:(pos + 1) * size] for k, c in cols.items()}
    for j, us in copies.items():
        if scheme == "net2net":
            s = 1.0 / (1 + len(us))
            share[j] = s
            for u in us:
                new_cols[u] = {k: v[j] * s for k, v in out_old.items()}
        else:  # a stable split: one new unit per class, so one copy of j
            (u,) = us
            a = split[u]
            share[j] = 1.0 - a
            new_cols[u] = {k: v[j] * a for k, v in out_old.items()}
    grown_in = {
        k: torch.cat([*new_in[k], *(new_rows[u][k] for u in range(n_new))], 0)
        if n_old + n_new else v for k, v in incoming.items()
    }
    grown_out = {
        k: torch.cat([*(c * share[j] for j, c in enumerate(out_old[k])),
                      *(new_cols[u][k] for u in range(n_new))], 1)
        if n_old + n_new else v for k, v in outgoing.items()
    }
    return grown_in, grown_out


def _unit(t: Tensor, dim: int, i: int, size: int) -> Tensor:
    return t.narrow(dim, i * size, size)


def _rows_of(rows: dict[str, list[Tensor]], j: int) -> dict[str, list[Tensor]]:
    return {k: [v[j]] for k, v in rows.items()}


def _shape(t: Tensor, dim: int, size: int) -> tuple[int, ...]:
    shape = list(t.shape)
    shape[dim] = size
    return tuple(shape)
