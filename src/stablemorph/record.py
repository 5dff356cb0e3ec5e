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

    The step rule (:mod:`stablemorph.step_rule`; JSON values, so checkpoints keep them):
    ``lr_advice``: the multipliers the morph recommends, by optimiser family,
    ``{"sgd": s, "adaptive": a}`` (``transfer_optimizer`` multiplies ``lr_scale`` by the
    family's figure); ``lr_reference``: the parent parameter whose typical adaptive step
    further scales the ``"adaptive"`` figure (``None``: none); ``factor``: the parameter
    belongs to the factor pair ``{"layer", "first", "second", "stride", "groups"}`` standing
    for the parent's layer ``layer`` (its ``.weight`` and ``.bias``), the pair's modules
    ``first`` and ``second`` named in the child: its optimiser state is the layer's mapped
    through the factorisation. ``adaptive_new``: under an adaptive optimiser the
    parameter's new entries (all of a fresh parameter without ``lr_advice``, the new units
    ``index < 0`` of an indexed one) start at their stand-in's (or source's) typical step
    (:func:`stablemorph.optim.transfer_optimizer`; set by :func:`mark_new_entries`).
    ``width_advice``: the SGD learning-rate multiplier a widen recommends for its channel
    group's parameters, ``1 / first-step amplification`` (:mod:`stablemorph.morphs.new_units`;
    ``transfer_optimizer`` multiplies ``lr_scale`` by it under non-adaptive optimisers); a
    GPT growth records it on every parameter, measured over the whole model at the logits
    (:mod:`stablemorph.transformer.sgd_rule`).
    """

    source: str | None
    dim: int | None = None
    index: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    stand_in: str | None = None
    lr_scale: float = 1.0
    lr_advice: dict[str, float] | None = None
    lr_reference: str | None = None
    factor: dict[str, Any] | None = None
    adaptive_new: bool = False
    width_advice: float | None = None

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
    parameter as its stand-in. ``lr_scale`` and ``lr_advice`` multiply along a chain of
    sources; a fresh parameter keeps its own, and its stand-in (and ``lr_reference``) is
    mapped back to the parent. A ``factor`` record is kept while the parameter passes
    unchanged and its layer maps back to an unchanged parent layer; else it is dropped.
    ``adaptive_new`` holds if either morph set it; ``width_advice`` multiplies along a chain
    of sources.
    """

    def back(name: str | None) -> str | None:
        i = inner.get(name) if name is not None else None
        return None if i is None else (i.source if i.source is not None else i.stand_in)

    out: dict[str, ParamOrigin] = {}
    for name, o in outer.items():
        i = inner.get(o.source) if o.source is not None else None
        rule = _compose_rule(o, i, inner)
        if i is None or i.source is None:
            stand_in = back(o.stand_in) if o.source is None else back(o.source)
            lr = o.lr_scale * (1.0 if i is None else i.lr_scale)
            out[name] = ParamOrigin(None, stand_in=stand_in, lr_scale=lr, **rule)
            continue
        lr = o.lr_scale * i.lr_scale
        if o.index is None:
            out[name] = ParamOrigin(i.source, i.dim, i.index, i.scale, lr_scale=lr, **rule)
        elif i.index is None:
            out[name] = ParamOrigin(i.source, o.dim, o.index, o.scale, lr_scale=lr, **rule)
        elif i.dim == o.dim:
            at = o.index.clamp(min=0)
            index = torch.where(o.index >= 0, i.index[at], -1)
            o_scale = torch.ones(len(o.index), dtype=torch.float64) if o.scale is None else o.scale
            i_scale = (torch.ones(len(i.index), dtype=torch.float64) if i.scale is None
                       else i.scale)
            scale = o_scale.double() * i_scale.double()[at]
            out[name] = ParamOrigin(i.source, o.dim, index, scale, lr_scale=lr, **rule)
        else:
            out[name] = ParamOrigin(None, stand_in=i.source, lr_scale=lr, **rule)
    return out


def _compose_rule(o: ParamOrigin, i: ParamOrigin | None, inner: dict[str, ParamOrigin]
                  ) -> dict[str, Any]:
    """The step-rule fields (``lr_advice``, ``lr_reference``, ``factor``, ``adaptive_new``,
    ``width_advice``) of ``o`` after
    ``i`` (its source's origin in ``inner``, ``None`` for a fresh ``o``)."""

    def unchanged(param: str | None) -> str | None:
        j = inner.get(param) if param is not None else None
        return j.source if j is not None and j.source is not None and j.index is None else None

    def back(param: str | None) -> str | None:
        j = inner.get(param) if param is not None else None
        return None if j is None else (j.source if j.source is not None else j.stand_in)

    advice = o.lr_advice
    if i is not None and i.lr_advice is not None:
        advice = {k: v * (1.0 if o.lr_advice is None else o.lr_advice.get(k, 1.0))
                  for k, v in i.lr_advice.items()}
    reference = back(o.lr_reference) if o.lr_reference is not None else (
        i.lr_reference if i is not None else None)
    factor = o.factor
    if factor is None and i is not None and o.index is None:
        factor = i.factor
    elif factor is not None:
        layer = unchanged(f"{factor['layer']}.weight")
        factor = None if layer is None else {**factor, "layer": layer[:-len(".weight")]}
    width = o.width_advice
    if i is not None and i.width_advice is not None:
        width = i.width_advice * (1.0 if width is None else width)
    return {"lr_advice": advice, "lr_reference": reference, "factor": factor,
            "adaptive_new": o.adaptive_new or (i is not None and i.adaptive_new),
            "width_advice": width}


def mark_new_entries(param_map: dict[str, ParamOrigin]) -> None:
    """Set ``adaptive_new`` on every origin with new entries: fresh parameters and indexed
    ones with new units (the stable scheme's step rule, :mod:`stablemorph.step_rule`)."""
    for origin in param_map.values():
        if origin.is_fresh or (origin.index is not None and bool((origin.index < 0).any())):
            origin.adaptive_new = True


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
