"""The experiment's ``--morph``, one path for every model: a growth is a list of morph steps
applied in order, each returning a new model with one :class:`~stablemorph.record.MorphRecord`
more, so the optimiser follows every step with
:func:`~stablemorph.optim.transfer_optimizer`.

- CNN / MLP morphs (:data:`stablemorph.morphs.MORPHS`): ``deepen``, ``widen``,
  ``insert_subnet``, ``enlarge_kernel``, one step per target layer. For ``widen`` the option
  ``factor`` (default 2) sets each target's new width to ``factor`` times its width in the
  parent (or give ``width``); a target that an earlier target's widen already grew to that
  width (the same channel group, e.g. a ResNet stage tied by its residual adds) is skipped:
  its step returns the model unchanged.
- GPT growths (the project's :class:`~stablemorph.transformer.model.GPT`): ``depth`` inserts
  blocks up to ``n_layer`` (default twice the parent's depth), one evenly spaced insertion
  per step; ``width`` multiplies the MLP width, the heads (same head size) and the residual
  width by ``factor`` (default 2), in that order. Option ``out_scale``: the scale of the new
  units' fan-out (the growths' default); ``step_rule``: the growths' SGD multiplier
  (:mod:`stablemorph.transformer.sgd_rule`; default the scheme's).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from stablemorph.morphs import MORPHS
from stablemorph.morphs import apply as apply_morph

GPT_MORPHS = ("depth", "width")
CNN_MORPHS = ("deepen", "widen", "insert_subnet", "enlarge_kernel")
ALL_MORPHS = (*CNN_MORPHS, *GPT_MORPHS)


class GrowthError(ValueError):
    """A morph request the experiment cannot run (unknown morph, option or target)."""


@dataclass(frozen=True)
class Step:
    """One morph step: ``run(model, scheme, seed, probe) -> child``."""

    label: str
    run: Callable[[nn.Module, str, int, Tensor], nn.Module]


def _is_gpt(model: nn.Module) -> bool:
    from stablemorph.transformer.model import GPT

    return isinstance(model, GPT)


def _check_kwargs(op: str, fn: Callable[..., Any], kwargs: dict[str, Any],
                  extra: tuple[str, ...] = ()) -> None:
    allowed = set(inspect.signature(fn).parameters) - {"model", "target", "scheme", "seed",
                                                       "inputs", "probe", "index"}
    unknown = sorted(set(kwargs) - allowed - set(extra))
    if unknown:
        raise GrowthError(f"--morph {op}: unknown option(s) {unknown}; accepted: "
                          f"{sorted(allowed | set(extra))}")


def morph_steps(op: str, model: nn.Module, targets: list[str],
                kwargs: dict[str, Any]) -> list[Step]:
    """The steps that grow ``model`` by ``op`` with ``kwargs`` (module docstring).

    Raises:
        GrowthError: unknown morph or option, a GPT morph on another model (or the other way
            round), an unknown target, a widen factor that does not grow.
    """
    kwargs = dict(kwargs)
    if op not in ALL_MORPHS:
        raise GrowthError(f"unknown morph {op!r}; choose one of {ALL_MORPHS}")
    gpt = _is_gpt(model)
    if gpt != (op in GPT_MORPHS):
        raise GrowthError(f"--morph {op} applies to {'GPT' if op in GPT_MORPHS else 'CNN/MLP'} "
                          f"models; this model is a {type(model).__name__}; use one of "
                          f"{GPT_MORPHS if gpt else CNN_MORPHS}")
    if gpt:
        return _gpt_steps(op, model, kwargs)
    names = dict(model.named_modules())
    missing = [t for t in targets if t not in names or t == ""]
    if missing:
        raise GrowthError(f"--targets {missing} are not layers of the {type(model).__name__}")
    fn = MORPHS[op]
    factor = kwargs.pop("factor", None) if op == "widen" else None
    _check_kwargs(op, fn, kwargs)
    steps = []
    for target in targets:
        opts = dict(kwargs)
        if op == "widen" and "width" not in opts:
            layer = names[target]
            now = _units(layer)
            if now is None:
                raise GrowthError(f"--morph widen: {target!r} is a {type(layer).__name__}, "
                                  f"not a Linear or conv layer")
            f = 2.0 if factor is None else float(factor)
            opts["width"] = math.ceil(f * now)
            if opts["width"] <= now:
                raise GrowthError(f"--morph widen: factor {f} does not grow {target!r} "
                                  f"({now} units)")

        def run(m: nn.Module, scheme: str, seed: int, probe: Tensor, _t: str = target,
                _o: dict[str, Any] = opts) -> nn.Module:
            if op == "widen" and _units(m.get_submodule(_t)) >= _o["width"]:
                return m  # an earlier target's widen grew this layer with its channel group
            return apply_morph(op, m, _t, scheme=scheme, seed=seed, inputs=probe, **_o)

        steps.append(Step(f"{op} {target}", run))
    return steps


def _units(layer: nn.Module) -> int | None:
    """A Linear or conv layer's output units."""
    return getattr(layer, "out_channels", getattr(layer, "out_features", None))


def _gpt_steps(op: str, model: nn.Module, kwargs: dict[str, Any]) -> list[Step]:
    from stablemorph.transformer.depth import insert_block
    from stablemorph.transformer.grow import insertion_points
    from stablemorph.transformer.heads import grow_heads
    from stablemorph.transformer.mlp_width import grow_mlp
    from stablemorph.transformer.stream import grow_d_model

    cfg = model.config
    common = {k: kwargs.pop(k) for k in ("out_scale", "tol", "step_rule") if k in kwargs}
    if op == "depth":
        n_layer = int(kwargs.pop("n_layer", 2 * cfg.n_layer))
        if kwargs:
            raise GrowthError(f"--morph depth: unknown option(s) {sorted(kwargs)}; accepted: "
                              f"['n_layer', 'out_scale', 'step_rule', 'tol']")
        if n_layer <= cfg.n_layer:
            raise GrowthError(f"--morph depth: n_layer={n_layer} is not larger than the "
                              f"parent's {cfg.n_layer}")
        return [Step(f"insert block {i}",
                     lambda m, scheme, seed, probe, _i=i: insert_block(
                         m, _i, scheme=scheme, seed=seed, probe=probe, **common))
                for i in insertion_points(cfg.n_layer, n_layer - cfg.n_layer)]
    factor = float(kwargs.pop("factor", 2.0))
    if kwargs:
        raise GrowthError(f"--morph width: unknown option(s) {sorted(kwargs)}; accepted: "
                          f"['factor', 'out_scale', 'step_rule', 'tol']")
    n_head = round(factor * max(b.attn.n_head for b in model.blocks))
    d_mlp = round(factor * max(b.mlp.fc.out_features for b in model.blocks))
    d_model = round(factor * cfg.d_model)
    if d_model <= cfg.d_model:
        raise GrowthError(f"--morph width: factor {factor} does not grow d_model={cfg.d_model}")
    return [
        Step(f"mlp width {d_mlp}", lambda m, scheme, seed, probe: grow_mlp(
            m, d_mlp, scheme=scheme, seed=seed, probe=probe, **common)),
        Step(f"heads {n_head}", lambda m, scheme, seed, probe: grow_heads(
            m, n_head, scheme=scheme, seed=seed, probe=probe, **common)),
        Step(f"d_model {d_model}", lambda m, scheme, seed, probe: grow_d_model(
            m, d_model, scheme=scheme, seed=seed, probe=probe, **common)),
    ]
