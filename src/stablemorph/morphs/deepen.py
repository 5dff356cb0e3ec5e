"""``deepen``: replace one Linear/Conv layer by ``F1 -> PAct(a=1) -> F2`` computing the same.

The child architecture depends only on the options, never on the scheme, so that the
schemes can be compared on identical networks; the schemes fill in the values:
``"stable"`` a dense decomposition, ``"netmorph"`` NetMorph's practical algorithm (shrink,
solve, zero-pad), ``"net2net"`` ``F1 = G`` and ``F2`` the centred identity.

The step rule (``step_rule``, on by default for ``"stable"`` only; :mod:`stablemorph.schemes`):
a pointwise pair gets an orthogonal second factor (stable only), and the factors' origins
record the learning-rate multipliers measured on the probe batch
(:func:`~stablemorph.morphs.first_step.multipliers`, on the block's input taken from the
morph's own verification forward), the parent layer whose typical adaptive step scales them,
and the factorisation that maps the layer's optimiser state onto them:
:func:`stablemorph.optim.transfer_optimizer` applies all three.

The replaced layer ``name`` becomes ``nn.Sequential`` with children ``first`` (``F1``,
carrying the stride), ``act`` (:class:`~stablemorph.activations.PAct`, per channel) and
``second`` (``F2``); a BatchNorm after the layer stays after ``F2`` (DESIGN.md section 1,
"BatchNorm"), so it sees the same input in train and eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from stablemorph.activations import ACTIVATIONS
from stablemorph.graph import set_module
from stablemorph.morphs.contract import (
    MorphError,
    Surgery,
    adopt,
    check_scheme,
    get_layer,
    run_morph,
)
from stablemorph.morphs.factor import (
    Factors,
    Geometry,
    build_factors,
    check_feasible,
    default_width,
    resolve_kernels,
)
from stablemorph.morphs.first_step import multipliers
from stablemorph.record import ParamOrigin
from stablemorph.schemes import step_rule_on

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def factor_origins(prefix: str, factors: Factors, parent_bias: str | None,
                   rule: dict[str, Any] | None = None) -> dict[str, ParamOrigin]:
    """Origins of the block's parameters under ``prefix``: all fresh, except ``F2``'s bias
    where it is the parent's bias ``parent_bias`` unchanged. ``rule``: the step-rule fields
    (:func:`step_rule_fields`) given to the two factors' weights and biases."""
    origins = {f"{prefix}.{n}": ParamOrigin(None) for n, _ in factors.block.named_parameters()}
    if parent_bias is not None and factors.bias_kept:
        origins[f"{prefix}.second.bias"] = ParamOrigin(parent_bias)
    apply_rule(origins, prefix, rule)
    return origins


def apply_rule(origins: dict[str, ParamOrigin], prefix: str, rule: dict[str, Any] | None
               ) -> None:
    """Set the step-rule fields ``rule`` on the origins of the block ``prefix``'s factors
    (``prefix.first.*``, ``prefix.second.*``); each origin gets its own copy of a dict."""
    factors = (f"{prefix}.first.", f"{prefix}.second.")
    for name, origin in origins.items():
        if rule and name.startswith(factors):
            for key, value in rule.items():
                setattr(origin, key, dict(value) if isinstance(value, dict) else value)


def advice_notes(fields: dict[str, Any] | None) -> list[str]:
    """The report's line on the recorded step rule (none without it)."""
    advice = (fields or {}).get("lr_advice")
    if advice is None:
        return []
    return [f"step rule: lr multipliers recorded for the factors: sgd {advice['sgd']:.3g}, "
            f"adaptive {advice['adaptive']:.3g}"
            + (f" (x the typical Adam step of {fields['lr_reference']})"
               if fields.get("lr_reference") else "")]


def step_rule_fields(block: nn.Module, prefix: str, x: Tensor, kernel: int,
                     layer: str | None, parent_params: set[str]) -> dict[str, Any]:
    """The step-rule fields of ``ParamOrigin`` for the block ``prefix`` (the module ``block``)
    on its input ``x``: the multipliers measured there
    (:func:`~stablemorph.morphs.first_step.multipliers`; ``kernel``: the parent's kernel size,
    0 or -1 for the whole composite), the parent layer ``layer`` whose weight calibrates
    adaptive steps and whose state maps onto the factors (``None``: no such layer)."""
    reference = f"{layer}.weight" if layer is not None else None
    fields: dict[str, Any] = {
        "lr_advice": multipliers(block, x, kernel),
        "lr_reference": reference if reference in parent_params else None,
    }
    if fields["lr_reference"] is not None:
        first = block.first
        fields["factor"] = {"layer": layer, "first": f"{prefix}.first",
                            "second": f"{prefix}.second",
                            "stride": int(getattr(first, "stride", (1,))[0]),
                            "groups": int(getattr(first, "groups", 1))}
    return fields


def step_rule_measure(child: nn.Module, prefix: str, origins: dict[str, ParamOrigin],
                      kernel: int, layer: str | None, parent_params: set[str], *,
                      factor: bool = True) -> dict[str, Callable[[Tensor], list[str]]]:
    """The step rule as a :class:`~.contract.Surgery` measurement: on the input the block
    ``prefix`` of ``child`` receives in the morph's verification, its
    :func:`step_rule_fields` set on ``origins`` (without the state mapping unless
    ``factor``) and the report's line returned. A block the probe never reaches gets none."""
    block = child.get_submodule(prefix)

    def measure(x: Tensor) -> list[str]:
        fields = step_rule_fields(block, prefix, x, kernel, layer, parent_params)
        if not factor:
            fields.pop("factor", None)
        apply_rule(origins, prefix, fields)
        return advice_notes(fields)

    return {f"{prefix}.first": measure}


def deepen(
    model: nn.Module,
    target: str,
    *,
    scheme: str = "stable",
    kernel_size: int | None = None,
    width: int | None = None,
    first_kernel_size: int | None = None,
    activation: str = "relu",
    variant: str | None = None,
    seed: int = 0,
    inputs: Tensor | Sequence[Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
    tol: float | None = None,
    step_rule: bool | None = None,
) -> nn.Module:
    """A copy of ``model`` with layer ``target`` replaced by two layers and a parametric
    activation between them (at ``a = 1``: the identity), computing the same function.

    Args:
        model: the parent; never modified.
        target: dotted name of an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` (square
            kernel, dilation 1, zero padding; grouped and depthwise convs are fine).
        scheme: ``"stable"`` (default), ``"netmorph"`` or ``"net2net"``.
        kernel_size: ``K2``, the new second layer's kernel (default 1: a pointwise layer
            after the parent's kernel, dense and exact for every scheme).
        width: ``C_mid``, the new layer's input width (default: the layer's output width, or
            more where ``"stable"`` needs it, see :func:`~.factor.default_width`; the same
            for every scheme).
        first_kernel_size: ``K1`` (default the parent's ``K``); ``K1 + stride (K2 - 1) - K``
            must be even and >= 0.
        activation: ``phi`` of the inserted PAct: relu, leaky_relu, gelu, tanh, sigmoid or
            identity.
        variant: passed to :func:`stablemorph.solvers.decompose`.
        seed: seeds the decomposition and the random biases.
        inputs / input_shape: the probe batch (see :mod:`.contract`).
        tol: largest accepted ``max_rel`` (default by dtype; float32: 1e-5).
        step_rule: the step rule (module docstring; default: the scheme's, on for
            ``"stable"``). ``True`` on a baseline records the multipliers and the state
            mapping for its published factors; ``False`` on ``"stable"`` gives the published
            stable solve with nothing recorded.

    Raises:
        MorphError: unknown or unsupported layer, options that cannot compose the parent's
            kernel, a ``"stable"`` request with no dense exact solution (before any work,
            with the nearest feasible width/kernel), a decomposition that misses its
            tolerance, or a failed verification.
    """
    check_scheme(scheme)
    if activation not in ACTIVATIONS:
        raise MorphError(f"deepen {target!r}: unknown activation {activation!r}; choose one "
                         f"of {sorted(ACTIVATIONS)}")
    layer = get_layer(model, target, LAYERS, "deepen")
    geom = Geometry.of(layer, target, "deepen")
    k1, k2 = resolve_kernels(geom, first_kernel_size, kernel_size, target, "deepen")
    width = default_width(geom, k1, k2) if width is None else int(width)
    if width < 1 or width % geom.groups:
        raise MorphError(f"deepen {target!r}: width must be a positive multiple of "
                         f"groups={geom.groups}, got {width}")
    if scheme == "stable":
        check_feasible(geom, width, k1, k2, target, "deepen")
    rule = step_rule_on(scheme, step_rule)

    def surgery(child: nn.Module, probe: tuple[Tensor, ...]) -> Surgery:
        old = child.get_submodule(target)
        parent_params = {n for n, _ in child.named_parameters()}
        factors = build_factors(geom, old.weight, old.bias, scheme=scheme, width=width,
                                kernels=(k1, k2), activation=activation, seed=seed,
                                variant=variant, orthogonal=rule and scheme == "stable")
        set_module(child, target, adopt(factors.block, old))
        bias = f"{target}.bias" if old.bias is not None else None
        origins = factor_origins(target, factors, bias)
        measures = step_rule_measure(child, target, origins, geom.kernel if geom.nd else 0,
                                     target, parent_params) if rule else {}
        return Surgery(origins, residual=factors.report.residual_cast,
                       notes=list(factors.notes), measures=measures)

    kwargs = {"scheme": scheme, "kernel_size": k2, "first_kernel_size": k1, "width": width,
              "activation": activation, "variant": variant, "seed": seed, "step_rule": rule}
    return run_morph("deepen", model, target, scheme, kwargs, surgery, inputs, input_shape, tol)
