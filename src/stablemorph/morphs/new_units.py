"""How much a widen's new units move the function at the first SGD step, measured on the
probe batch (the stable scheme's widen rule, issue 9; numbers in
``benchmarks/results/stability_research.md``).

A widen adds units to a channel group: rows of its producers (and their biases), entries of
the channel-wise modules on the way (norms, PAct), columns of its consumers. For random
gradients ``delta`` at the consumers' outputs (the same seeded directions as
:mod:`stablemorph.morphs.first_step`), one SGD step ``-lr grad`` changes those outputs to
first order by ``<delta, dOut> = -lr ||grad||^2``: the squared gradient norm over a set of
parameters is the first-step *energy* those parameters put into the function.
:func:`widen_energy` splits the child's energy over the group's parameters into the old
units' share (equal to the parent's: the child computes the same function), the new units'
incoming side (producer rows, biases, norm entries) and their outgoing side (consumer
columns), and measures the parent's over the same parameters (where the old units keep
the parent's values, as stable's pairs and NetMorph's units do, the parent's equals the old
units' in the child: the same function, the same gradients, and that pass is saved).

For the stable scheme's pairs (incoming ``(V, V)``, outgoing ``(Z, -Z)``) the incoming side's
gradient is proportional to ``Z`` and the outgoing side's does not depend on ``Z``: with the
fan-out scaled by ``s`` the new units' energy is ``new_out + s^2 new_in``
(:meth:`WidenEnergy.new_units`). NetMorph's zero fan-out units have ``new_out`` only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stablemorph.morphs.first_step import SAMPLES, SEED
from stablemorph.record import ParamOrigin
from stablemorph.verify import Probe, preserved_state


@dataclass(frozen=True)
class WidenEnergy:
    """First-step energies (module docstring), each a mean over the random directions.

    ``parent``: the parent's, over the parameters the group's changed parameters come from;
    ``old``: the child's old units' (equals ``parent`` up to rounding); ``new_in`` / ``new_out``:
    the new units' incoming and outgoing sides' (new: no parent counterpart, or a second
    holder of a parent position: copies, the norm entries a fresh unit borrows)."""

    parent: float
    old: float
    new_in: float
    new_out: float

    def new_units(self, fan_out: float = 1.0) -> float:
        """The new units' energy with their fan-out scaled by ``fan_out``."""
        return self.new_out + fan_out**2 * self.new_in

    def amplification(self, fan_out: float = 1.0) -> float:
        """The child's first-step energy over the group's parameters relative to the
        parent's (1: the parent's step)."""
        return (self.old + self.new_units(fan_out)) / max(self.parent, 1e-30)


def _train_mode(model: nn.Module) -> None:
    """Training mode as the optimiser sees it, without dropout's randomness."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()


class _Enough(Exception):
    """Raised by the last consumer's hook: the rest of the forward is not needed."""


Parts = dict[str, list[tuple[str, int, Tensor | None]]]
"""A part's name -> ``(parameter name, unit dim, (units,) bool mask of the part's units or
None for all)`` members."""


def _energies(model: nn.Module, probe: Probe, consumers: list[str], parts: Parts,
              samples: int, seed: int) -> dict[str, float]:
    """Mean squared gradient norm of ``<delta, consumer outputs>`` over each part."""
    params = dict(model.named_parameters())
    names = sorted({n for members in parts.values() for n, _, _ in members})
    outs: dict[str, Tensor] = {}
    modules = dict(model.named_modules())

    def hook(c: str, out: Tensor) -> None:
        outs.setdefault(c, out)
        if len(outs) == len(consumers):
            raise _Enough

    handles = [modules[c].register_forward_hook(lambda m, a, out, c=c: hook(c, out))
               for c in consumers]
    try:
        # the backward needs the forward's buffers (BatchNorm's running statistics) as they
        # were: it runs before preserved_state restores them
        with preserved_state(model), torch.random.fork_rng(), torch.enable_grad():
            _train_mode(model)
            try:
                probe.run(model)
            except _Enough:
                pass
            missing = [c for c in consumers if c not in outs]
            if missing:
                raise ValueError(f"the consumers {missing} are never called on the probe batch")
            total = _sum_squares([outs[c] for c in consumers], [params[n] for n in names],
                                 names, parts, samples, seed)
    finally:
        for h in handles:
            h.remove()
    return total


def _directions(outs: list[Tensor], samples: int, seed: int) -> Iterator[list[Tensor]]:
    """The seeded random output gradients, one list (one per output, its shape, dtype and
    device) per sample: drawn in float64 sample by sample, output by output (the same
    numbers as :mod:`stablemorph.morphs.first_step`'s directions)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(samples):
        yield [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)
               for o in outs]


def _unit_squares(g: Tensor, dim: int) -> Tensor:
    """``(g.shape[dim],)`` float64: the squares of ``g`` summed over every dim but ``dim``.

    The dims after ``dim`` (contiguous: one unit's fan, a few thousand entries) are summed
    in ``g``'s dtype, those before it in float64: within 1e-9 relative of the all-float64
    sum on a ResNet's 3x3 convolutions, in a third of its time."""
    squares = g.pow(2)
    inner = list(range(dim + 1, g.dim()))
    if inner:
        squares = squares.sum(inner)
    return squares.sum(list(range(dim)), dtype=torch.float64) if dim else squares.double()


def _sum_squares(outs: list[Tensor], tensors: list[Tensor], names: list[str], parts: Parts,
                 samples: int, seed: int) -> dict[str, float]:
    """Mean over ``samples`` seeded random ``delta`` of ``||d<delta, outs>/d part||^2``.

    One backward per direction (``retain_graph`` until the last): a single batched one
    (``is_grads_batched``, vmap over the backward) gave the same figures but took longer on
    the ResNet-18 widen of ``benchmarks/morph.py`` (1.8 CPU s for its 12 batched backwards
    against 1.0-1.5 s for the 48 of the loop, under cProfile). The squares are summed per
    unit once per gradient (:func:`_unit_squares`): a part is then a mask over units, not a
    boolean index over every entry (the first version's masked copies took 2.9 s of its
    10.0 s on that widen under cProfile)."""
    total = {part: torch.zeros((), dtype=torch.float64) for part in parts}
    for s, deltas in enumerate(_directions(outs, samples, seed)):
        grads = torch.autograd.grad(outs, tensors, deltas, retain_graph=s + 1 < samples,
                                    allow_unused=True)
        by_name = dict(zip(names, grads, strict=True))
        units: dict[tuple[str, int], Tensor] = {}
        for part, members in parts.items():
            for n, dim, mask in members:
                g = by_name[n]
                if g is None:
                    continue
                if (n, dim) not in units:
                    units[n, dim] = _unit_squares(g, dim).cpu()
                u = units[n, dim]
                total[part] += u.sum() if mask is None else u[mask].sum()
    return {part: float(v) / samples for part, v in total.items()}


def _new_positions(index: Tensor) -> Tensor:
    """Positions along the unit dim that are new: no parent counterpart (``index < 0``) or a
    copy of a parent position an earlier one already holds (a copied unit, or the norm
    entries a fresh unit borrows from its template)."""
    pos = torch.arange(len(index))
    known = index >= 0
    first = torch.full((int(index.max()) + 1 if bool(known.any()) else 1,), len(index))
    first = first.scatter_reduce(0, index[known], pos[known], "amin")
    return ~known | (first[index.clamp(min=0)] != pos)


def _old_kept(origin: ParamOrigin) -> bool:
    """Whether the old positions hold the parent's values unchanged (scale 1)."""
    if origin.scale is None:
        return True
    old = ~_new_positions(origin.index)
    return bool((origin.scale.double()[old] == 1.0).all())


def widen_energy(parent: nn.Module, child: nn.Module, origins: dict[str, ParamOrigin],
                 consumers: Iterable[str], probe: Any, *, samples: int = SAMPLES,
                 seed: int = SEED) -> WidenEnergy:
    """The first-step energies of a widen (module docstring).

    Args:
        parent, child: the models before and after the widen (same consumer names, same
            consumer output shapes); neither is changed (modes, buffers, RNG restored).
        origins: the widen's changed parameters (child name -> origin with ``index`` along
            the unit dim ``dim``; ``index < 0``: new units).
        consumers: the dense modules that read the widened channels (their outputs are where
            the random gradients enter).
        probe: the batch (a tensor, or a :class:`~stablemorph.verify.Probe`).

    Raises:
        ValueError: a consumer never called on the probe.
    """
    probe = Probe.of(probe)
    consumers = list(consumers)
    cparams = dict(child.named_parameters())
    grouped = {n: o for n, o in origins.items()
               if o.index is not None and o.source is not None and n in cparams}
    parts: Parts = {"old": [], "new_in": [], "new_out": []}
    for n, o in grouped.items():
        new = _new_positions(o.index)
        outgoing = any(n.startswith(f"{c}.") for c in consumers)
        parts["old"].append((n, o.dim, ~new))
        parts["new_out" if outgoing else "new_in"].append((n, o.dim, new))
    child_e = _energies(child, probe, consumers, parts, samples, seed)
    if all(_old_kept(o) for o in grouped.values()):
        # the old units hold the parent's values and the child computes the parent's
        # function: their gradients are the parent's (one pass saved)
        return WidenEnergy(child_e["old"], child_e["old"], child_e["new_in"],
                           child_e["new_out"])
    sources = sorted({o.source for o in grouped.values() if o.source is not None})
    parent_e = _energies(parent, probe, consumers, {"parent": [(s, 0, None) for s in sources]},
                         samples, seed)
    return WidenEnergy(parent_e["parent"], child_e["old"], child_e["new_in"],
                       child_e["new_out"])


def output_energy(model: nn.Module, probe: Any, names: Iterable[str] | None = None, *,
                  samples: int = SAMPLES, seed: int = SEED) -> dict[str, float]:
    """Each parameter's first-step SGD energy at the model's *output* (module docstring):
    the mean over the seeded random output gradients ``delta`` of ``||d<delta, model(probe)>
    / d param||^2``, by parameter name (``names``: those parameters, default all that
    require grad), in train mode without dropout; the model's modes, buffers and RNG are
    restored. A growth that only adds a branch computing exactly zero leaves the old
    parameters' figures unchanged (the parent's), so the child's total over the parent's is
    the growth's amplification of the whole model's first step."""
    params = dict(model.named_parameters())
    chosen = [n for n, p in params.items() if p.requires_grad] if names is None else list(names)
    if not chosen:
        return {}
    parts: Parts = {n: [(n, 0, None)] for n in chosen}
    return _energies(model, Probe.of(probe), [""], parts, samples, seed)
