"""What a morph leaves behind: its report, how each child parameter came from the parent,
and the replayable recipe of every morph applied so far.

A morph attaches its :class:`MorphRecord` to the child it returns (a list kept under
``HISTORY_ATTR``, copied along with the model), so that optimiser surgery
(:mod:`stablemorph.optim`) and checkpoints (:mod:`stablemorph.checkpoint`) can read it later
without the caller carrying it around.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

HISTORY_ATTR = "_stablemorph_history"


@dataclass
class ParamOrigin:
    """How one child parameter was made from the parent's parameters.

    - ``source is None``: a fresh parameter (decomposed factor, new layer); its optimiser
      state is made from its ``stand_in``'s (:mod:`stablemorph.optim`).
    - ``source`` set, ``index is None``: the parent's parameter ``source`` unchanged in value
      (possibly under a new name).
    - ``source`` set, ``index`` set: ``child.select(dim, k) = parent[source].select(dim,
      index[k]) * scale[k]`` for every ``k`` with ``index[k] >= 0``; entries with
      ``index[k] < 0`` are new units with no parent counterpart (their optimiser state is
      made from the source's statistics).
      ``scale`` is 1 where omitted.

    ``stand_in`` (fresh parameters): the parent parameter a fresh one stands in for, whose
    optimiser param group it joins and whose optimiser state statistics it may borrow
    (:mod:`stablemorph.optim`); ``None``: the nearest parent parameter by name.
    ``lr_scale``: the child parameter's learning rate relative to its param group's
    (:func:`stablemorph.optim.transfer_optimizer` gives parameters with ``lr_scale != 1``
    their own groups).
    """

    source: str | None
    dim: int | None = None
    index: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    stand_in: str | None = None
    lr_scale: float = 1.0

    @property
    def is_fresh(self) -> bool:
        return self.source is None


@dataclass
class MorphReport:
    """Measured outcome of one morph.

    ``max_abs`` / ``max_rel`` are the largest absolute and relative output deviations between
    parent and child on the probe batch, in the model's dtype. ``residual`` is the relative
    residual of the morphism equation where one was solved (``None`` otherwise).
    ``zero_fraction`` / ``near_zero_fraction`` count exact zeros and ``|w| < 1e-3 * rms``
    over the new or changed parameters listed in ``changed``.
    """

    op: str
    target: str
    scheme: str
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    residual: float | None = None
    zero_fraction: float = 0.0
    near_zero_fraction: float = 0.0
    changed: list[str] = field(default_factory=list)
    param_map: dict[str, ParamOrigin] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        res = "" if self.residual is None else f" residual={self.residual:.2e}"
        return (
            f"{self.op}({self.target!r}, scheme={self.scheme!r}): max_abs={self.max_abs:.2e} "
            f"max_rel={self.max_rel:.2e}{res} zeros={self.zero_fraction:.1%} "
            f"near_zeros={self.near_zero_fraction:.1%} in {len(self.changed)} params, "
            f"{self.seconds:.2f}s"
        )


@dataclass
class MorphRecord:
    """One applied morph: enough to replay it (``op``, ``target``, ``kwargs``, JSON-able)
    and what it measured (``report``)."""

    op: str
    target: str
    kwargs: dict[str, Any]
    report: MorphReport


def compose_origins(outer: dict[str, ParamOrigin], inner: dict[str, ParamOrigin]
                    ) -> dict[str, ParamOrigin]:
    """The param map of two morphs in a row: ``outer`` (child <- middle) after ``inner``
    (middle <- parent) gives child <- parent.

    Index maps along the same dim compose (scales multiply, new units stay new); along two
    different dims they cannot be expressed, and the entry becomes fresh with the parent
    parameter as its stand-in. ``lr_scale`` multiplies along a chain of sources; a fresh
    parameter keeps its own, and its stand-in is mapped back to the parent.
    """

    def back(name: str | None) -> str | None:
        i = inner.get(name) if name is not None else None
        return None if i is None else (i.source if i.source is not None else i.stand_in)

    out: dict[str, ParamOrigin] = {}
    for name, o in outer.items():
        i = inner.get(o.source) if o.source is not None else None
        if i is None or i.source is None:
            stand_in = back(o.stand_in) if o.source is None else back(o.source)
            lr = o.lr_scale * (1.0 if i is None else i.lr_scale)
            out[name] = ParamOrigin(None, stand_in=stand_in, lr_scale=lr)
            continue
        lr = o.lr_scale * i.lr_scale
        if o.index is None:
            out[name] = ParamOrigin(i.source, i.dim, i.index, i.scale, lr_scale=lr)
        elif i.index is None:
            out[name] = ParamOrigin(i.source, o.dim, o.index, o.scale, lr_scale=lr)
        elif i.dim == o.dim:
            at = o.index.clamp(min=0)
            index = torch.where(o.index >= 0, i.index[at], -1)
            o_scale = torch.ones(len(o.index), dtype=torch.float64) if o.scale is None else o.scale
            i_scale = (torch.ones(len(i.index), dtype=torch.float64) if i.scale is None
                       else i.scale)
            scale = o_scale.double() * i_scale.double()[at]
            out[name] = ParamOrigin(i.source, o.dim, index, scale, lr_scale=lr)
        else:
            out[name] = ParamOrigin(None, stand_in=i.source, lr_scale=lr)
    return out


def history(model: nn.Module) -> list[MorphRecord]:
    """The morphs applied to ``model``, oldest first (empty for a model never morphed)."""
    return list(getattr(model, HISTORY_ATTR, []))


def last_report(model: nn.Module) -> MorphReport:
    """The report of the latest morph that produced ``model``."""
    records = history(model)
    if not records:
        raise ValueError(f"{type(model).__name__} was not produced by a stablemorph morph")
    return records[-1].report


def append_record(model: nn.Module, record: MorphRecord) -> None:
    """Attach ``record`` to ``model``'s history (a new list: the parent's is not touched)."""
    object.__setattr__(model, HISTORY_ATTR, [*history(model), record])
