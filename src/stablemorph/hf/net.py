"""A family-neutral picture of a pre-norm transformer, and its MLP, head and depth growths.

Every supported Hugging Face family is read into a :class:`Net` (float64 tensors in Linear
layout, ``(out, in)``) and written back from it (:mod:`stablemorph.hf.families`). A block is a
dict of role -> tensor; roles present depend on the family:

``ln1.w ln1.b q.w q.b k.w k.b v.w v.b o.w o.b ln2.w ln2.b up.w up.b gate.w gate.b down.w
down.b`` (``gate`` only for gated MLPs such as SwiGLU; biases only where the family has them).

The block computes ``x + attn(norm1 x)`` then ``+ mlp(norm2 x)``. Query head ``i`` reads
key/value head ``i // (n_head / n_kv)`` (grouped-query attention; ``n_kv = n_head`` is plain
multi-head attention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from stablemorph.hf.units import UnitError, add_units, cancelling_groups, normal, rms

IN_MLP = ("up.w", "up.b", "gate.w", "gate.b")
IN_Q = ("q.w", "q.b")
KV = ("k.w", "k.b", "v.w", "v.b")


@dataclass
class Net:
    """A pre-norm decoder (or encoder) stack, read from a model.

    ``blocks``: one role dict per block; ``source``: the parent block each block came from
    (``None``: new). ``glob``: tensors outside the blocks (``embed``, ``pos``, ``lnf.w``,
    ``lnf.b``, ``head.w``, ...). ``writers``: (glob key, stream dim) of every global tensor
    that writes into the residual stream. ``norm``: ``"rms"`` or ``"ln"``.
    """

    blocks: list[dict[str, Tensor]]
    glob: dict[str, Tensor]
    writers: list[tuple[str, int]]
    d: int
    n_head: int
    n_kv: int
    head_dim: int
    d_mlp: int
    norm: str
    tied: bool
    source: list[int | None] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.source:
            self.source = list(range(len(self.blocks)))


def _stds(block: dict[str, Tensor]) -> dict[str, float]:
    """Scale of fresh entries per role: the tensor's rms, or its layer's weight rms for an
    all-zero bias (0.02 for an all-zero weight)."""
    out = {}
    for k, v in block.items():
        s = rms(v)
        if s == 0:
            s = rms(block.get(k[:-1] + "w", v)) or 0.02
        out[k] = s
    return out


def grow_mlp(net: Net, d_mlp: int, scheme: str, gen: torch.Generator, out_scale: float) -> None:
    """Grow every block's MLP to ``d_mlp`` units (in place)."""
    for blk in net.blocks:
        n_old = blk["down.w"].shape[1]
        mlp_units(blk, n_old, d_mlp - n_old, scheme, gen, out_scale, _stds(blk))
    net.d_mlp = d_mlp


def mlp_units(blk: dict[str, Tensor], n_old: int, n_new: int, scheme: str,
               gen: torch.Generator, out_scale: float, std: dict[str, float]) -> None:
    incoming = {k: blk[k] for k in IN_MLP if k in blk}
    grown_in, grown_out = add_units(incoming, {"down.w": blk["down.w"]}, 1, [0] * n_old,
                                    [0] * n_new, scheme, gen, std, out_scale)
    blk.update(grown_in)
    blk.update(grown_out)


def kv_copies(n_head: int, n_kv: int, h2: int, kv2: int) -> int:
    """How many child key/value slots each old key/value head needs (its query heads must
    fit in them), or 0 when the child's grouping cannot hold the parent's groups."""
    g, g2 = n_head // n_kv, h2 // kv2
    c = math.ceil(g / g2)
    return c if n_kv * c <= kv2 else 0


def grow_heads(net: Net, h2: int, kv2: int, scheme: str, gen: torch.Generator,
               out_scale: float) -> None:
    """Grow every block to ``h2`` query heads and ``kv2`` key/value heads (in place); the head
    width stays ``net.head_dim``."""
    for blk in net.blocks:
        head_units(blk, net.n_head, net.n_kv, h2, kv2, net.head_dim, scheme, gen, out_scale,
                    _stds(blk))
    net.n_head, net.n_kv = h2, kv2


def head_units(blk: dict[str, Tensor], h: int, kv: int, h2: int, kv2: int, hd: int,
                scheme: str, gen: torch.Generator, out_scale: float,
                std: dict[str, float]) -> None:
    """Key/value slots first: each old key/value head is copied into ``c`` slots holding its
    query heads (``c > 1`` only when the groups shrink); the other slots are new. A slot's
    class is the old head it copies, or its own (``stable`` pairs new slots that must cancel
    across slots: one query head per slot). Then the query heads: old ones in their slots,
    new ones in the free positions, added by :func:`add_units` per class."""
    g2 = h2 // kv2
    c = kv_copies(h, kv, h2, kv2) if h else 0
    slot_class: list[int] = []
    slot_rows: list[dict[str, Tensor]] = []
    kv_keys = [k for k in KV if k in blk]
    for j in range(kv):
        for _ in range(c):
            slot_class.append(j)
            slot_rows.append({k: blk[k][j * hd:(j + 1) * hd] for k in kv_keys})
    n_fresh = kv2 - len(slot_class)
    fresh_class: list[int] = []
    if scheme == "net2net":
        if n_fresh and not kv:
            raise UnitError("net2net has no key/value head to copy")
        fresh_class = [int(torch.randint(kv, (1,), generator=gen)) for _ in range(n_fresh)]
    elif scheme == "netmorph" or g2 >= 2:
        fresh_class = list(range(kv, kv + n_fresh))
    elif n_fresh == 1:  # stable, one query head per slot, one new slot: copy an old head
        if not kv:
            raise UnitError("a single new key/value head with one query head cannot cancel")
        fresh_class = [int(torch.randint(kv, (1,), generator=gen))]
    elif n_fresh:
        fresh_class = [0] * n_fresh
        for n, group in enumerate(cancelling_groups(n_fresh)):
            for i in group:
                fresh_class[i] = kv + n
    fresh_rows: dict[int, dict[str, Tensor]] = {}
    for cls in fresh_class:
        if cls < kv:
            slot_rows.append({k: blk[k][cls * hd:(cls + 1) * hd] for k in kv_keys})
        else:
            if cls not in fresh_rows:
                fresh_rows[cls] = {k: normal((hd, *blk[k].shape[1:]), std[k], gen)
                                   for k in kv_keys}
            slot_rows.append(fresh_rows[cls])
        slot_class.append(cls)
    for k in kv_keys:
        blk[k] = torch.cat([r[k] for r in slot_rows], 0) if slot_rows else blk[k][:0]

    # query heads: old head i (group i // g, rank r) sits at slot j * c + r // g2, position
    # r % g2 within it
    g = h // kv if kv else 0
    old_pos = [((i // g) * c + (i % g) // g2) * g2 + (i % g) % g2 for i in range(h)]
    free = sorted(set(range(h2)) - set(old_pos))
    incoming = {k: blk[k] for k in IN_Q if k in blk}
    grown_in, grown_out = add_units(incoming, {"o.w": blk["o.w"]}, hd,
                                    [slot_class[p // g2] for p in old_pos],
                                    [slot_class[p // g2] for p in free], scheme, gen, std,
                                    out_scale)
    order = torch.tensor(old_pos + free).argsort()  # unit order (old, then new) -> position
    for k, v in grown_in.items():
        blk[k] = _permute_units(v, 0, order, hd)
    blk["o.w"] = _permute_units(grown_out["o.w"], 1, order, hd)


def _permute_units(t: Tensor, dim: int, order: Tensor, size: int) -> Tensor:
    idx = (order[:, None] * size + torch.arange(size)).reshape(-1)
    return t.index_select(dim, idx)


def insertion_points(n_layer: int, n_new: int) -> list[int]:
    """Child block indices at which to insert ``n_new`` blocks, in order, so that the new
    blocks follow evenly spaced parent blocks (``n_new = n_layer``: one after each)."""
    from stablemorph.transformer.grow import insertion_points as points
    return points(n_layer, n_new)


def grow_layers(net: Net, n_layer: int, scheme: str, gen: torch.Generator,
                out_scale: float) -> list[int]:
    """Insert identity blocks until there are ``n_layer`` (in place); returns the indices
    they went in at (in order).

    A new block copies its neighbour's norms (the block before it). ``net2net`` copies the
    neighbour's attention and MLP input weights and zeroes the output projections
    (Net2DeeperNet for a residual block); ``netmorph``: random inputs, zero outputs;
    ``stable``: every weight dense: heads and MLP units in cancelling groups
    (:mod:`stablemorph.hf.units`, grown from an empty block), output biases ``c`` and ``-c``
    (the MLP branch is zero whatever its input, so shifting that input by ``c`` is harmless).
    """
    points = insertion_points(len(net.blocks), n_layer - len(net.blocks))
    for index in points:
        nb = net.blocks[max(index - 1, 0)]
        std = _stds(nb)
        if scheme == "net2net":
            blk = {k: v.clone() for k, v in nb.items()}
            for k in ("o.w", "o.b", "down.w", "down.b"):
                if k in blk:
                    blk[k] = torch.zeros_like(blk[k])
        else:
            blk = {k: nb[k].clone() for k in ("ln1.w", "ln1.b", "ln2.w", "ln2.b") if k in nb}
            for k, v in nb.items():
                if k not in blk:  # an empty version of every unit tensor
                    blk[k] = v[:0] if k in IN_MLP + IN_Q + KV else (
                        v[:, :0] if k in ("o.w", "down.w") else v)
            head_units(blk, 0, 0, net.n_head, net.n_kv, net.head_dim, scheme, gen, out_scale,
                        std)
            mlp_units(blk, 0, net.d_mlp, scheme, gen, out_scale, std)
            if "o.b" in blk and "down.b" in blk and scheme == "stable":
                cst = normal(blk["o.b"].shape, std["o.b"] * out_scale, gen)
                blk["o.b"], blk["down.b"] = cst, -cst
            else:  # a single output bias (or none) must be zero for the identity
                for k in ("o.b", "down.b"):
                    if k in blk:
                        blk[k] = torch.zeros_like(blk[k])
            for k in ("q.b", "k.b", "v.b", "up.b", "gate.b"):
                if k in blk and scheme == "netmorph":  # fresh Linear biases start at zero
                    blk[k] = torch.zeros_like(blk[k])
        net.blocks.insert(index, blk)
        net.source.insert(index, None)
    net.notes.append(f"identity blocks inserted at {points} (shaped after the block before)")
    return points


def check_roles(blocks: Sequence[dict[str, Tensor]]) -> None:
    """Every block has the same roles (what the families write back)."""
    roles = set(blocks[0])
    for i, b in enumerate(blocks):
        if set(b) != roles:
            raise RuntimeError(f"internal: block {i} has roles {sorted(b)} != {sorted(roles)}")


def grow_head_dim(net: Net, hd2: int, scheme: str, gen: torch.Generator, out_scale: float,
                  scaled: bool) -> None:
    """Widen every head from ``net.head_dim`` to ``hd2`` dims (in place), for classes that
    derive ``head_dim = hidden / heads`` (GPT-2, BERT).

    A head's score is ``sum_j q_j k_j`` over its dims: each key dim ``k_j`` is a unit whose
    incoming row is the key row and whose *outgoing* weight is the query row, so new dims
    follow :func:`~stablemorph.hf.units.add_units` (``stable``: groups sharing a key row with
    query rows summing to zero; ``net2net``: a copied key dim splitting the query row;
    ``netmorph``: zero query rows); value dims likewise with the output projection's
    columns. With ``scaled`` (scores divided by ``sqrt(head_dim)``) the queries are then
    multiplied by ``sqrt(hd2 / head_dim)``.
    """
    hd = net.head_dim
    m = hd2 - hd
    for blk in net.blocks:
        std = _stds(blk)
        h = blk["q.w"].shape[0] // hd
        parts: dict[str, list[Tensor]] = {k: [] for k in ("q.w", "q.b", "k.w", "k.b", "v.w",
                                                          "v.b", "o.w") if k in blk}
        for i in range(h):
            rows = slice(i * hd, (i + 1) * hd)
            k_in = {k: blk[k][rows] for k in ("k.w", "k.b") if k in blk}
            q_out = {"q.w": blk["q.w"][rows].T}
            if "q.b" in blk:
                q_out["q.b"] = blk["q.b"][rows][None, :]
            k_new, q_new = add_units(k_in, q_out, 1, [0] * hd, [0] * m, scheme, gen, std,
                                     out_scale)
            v_in = {k: blk[k][rows] for k in ("v.w", "v.b") if k in blk}
            v_new, o_new = add_units(v_in, {"o.w": blk["o.w"][:, rows]}, 1, [0] * hd,
                                     [0] * m, scheme, gen, std, out_scale)
            for k, v in (*k_new.items(), *v_new.items()):
                parts[k].append(v)
            parts["q.w"].append(q_new["q.w"].T)
            if "q.b" in blk:
                parts["q.b"].append(q_new["q.b"][0])
            parts["o.w"].append(o_new["o.w"])
        for k, v in parts.items():
            blk[k] = torch.cat(v, 1 if k == "o.w" else 0)
        if scaled:
            for k in ("q.w", "q.b"):
                if k in blk:
                    blk[k] = blk[k] * math.sqrt(hd2 / hd)
    net.head_dim = hd2
