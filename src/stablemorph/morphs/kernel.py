"""``enlarge_kernel``: give a conv a larger kernel (receptive field), same function.

- ``"netmorph"`` / ``"net2net"``: the kernel is zero-padded to the new size (centred) and
  the padding grows by the same amount, which is exact at the borders too. Every new tap is
  zero: one kernel cannot grow exactly in any other way.
- ``"stable"``: since exact growth of a single kernel needs those zeros, the layer is
  replaced instead by a dense ``KxK`` conv (the new size) followed by a ``PAct`` and a dense
  1x1 conv: a depth decomposition with the larger receptive field (the report's notes say
  so). The child architecture therefore differs from the other schemes' for this morph.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from stablemorph.activations import ACTIVATIONS
from stablemorph.equation import pad_kernel
from stablemorph.graph import set_module
from stablemorph.morphs.contract import (
    MorphError,
    Surgery,
    adopt,
    check_scheme,
    get_layer,
    new_parameter,
    run_morph,
)
from stablemorph.morphs.deepen import factor_origins
from stablemorph.morphs.factor import Geometry, build_factors, check_feasible, default_width
from stablemorph.record import ParamOrigin


def enlarge_kernel(
    model: nn.Module,
    target: str,
    kernel_size: int,
    *,
    scheme: str = "stable",
    width: int | None = None,
    activation: str = "relu",
    seed: int = 0,
    inputs: Tensor | Sequence[Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
    tol: float | None = None,
) -> nn.Module:
    """A copy of ``model`` whose conv ``target`` has a ``kernel_size`` receptive field.

    Args:
        model: the parent; never modified.
        target: dotted name of an ``nn.Conv1d``/``nn.Conv2d`` (square kernel ``K``).
        kernel_size: the new size, larger than ``K`` with ``kernel_size - K`` even.
        scheme: ``"stable"`` (default; dense two-layer replacement), ``"netmorph"`` or
            ``"net2net"`` (zero-padded kernel), see the module docstring.
        width / activation: for ``"stable"`` only: the middle width (default as in
            :func:`~.factor.default_width`) and the PAct's ``phi``.
        seed, inputs, input_shape, tol: as for :func:`~stablemorph.morphs.deepen.deepen`.

    Raises:
        MorphError: not a conv, a size that cannot hold the old kernel centred, or a failed
            verification.
    """
    check_scheme(scheme)
    if activation not in ACTIVATIONS:
        raise MorphError(f"enlarge_kernel {target!r}: unknown activation {activation!r}")
    layer = get_layer(model, target, (nn.Conv1d, nn.Conv2d), "enlarge_kernel")
    geom = Geometry.of(layer, target, "enlarge_kernel")
    extra = int(kernel_size) - geom.kernel
    if extra <= 0 or extra % 2:
        raise MorphError(
            f"enlarge_kernel {target!r}: kernel_size must exceed the current {geom.kernel} by "
            f"an even amount (to stay centred), got {kernel_size!r}"
        )
    if scheme != "stable" and width is not None:
        raise MorphError(f"enlarge_kernel {target!r}: width applies to scheme 'stable' only "
                         f"(the others keep one layer)")
    kwargs: dict[str, object] = {"kernel_size": int(kernel_size), "scheme": scheme,
                                 "seed": seed}

    if scheme == "stable":
        width = default_width(geom, kernel_size, 1) if width is None else int(width)
        check_feasible(geom, width, kernel_size, 1, target, "enlarge_kernel")
        kwargs.update(width=width, activation=activation)

        def surgery(child: nn.Module, probe: tuple[Tensor, ...]) -> Surgery:
            old = child.get_submodule(target)
            factors = build_factors(geom, old.weight, old.bias, scheme="stable", width=width,
                                    kernels=(int(kernel_size), 1), activation=activation,
                                    seed=seed)
            set_module(child, target, adopt(factors.block, old))
            bias = f"{target}.bias" if old.bias is not None else None
            notes = [f"exact growth of one kernel needs zero taps; 'stable' replaced {target!r} "
                     f"by a dense {kernel_size}-wide conv, a PAct and a dense 1x1 conv "
                     f"(width {width})", *factors.notes]
            return Surgery(factor_origins(target, factors, bias),
                           residual=factors.report.residual_cast, notes=notes)
    else:

        def surgery(child: nn.Module, probe: tuple[Tensor, ...]) -> Surgery:
            conv = child.get_submodule(target)
            conv.weight = new_parameter(pad_kernel(conv.weight.detach(), kernel_size),
                                        conv.weight)
            conv.kernel_size = (int(kernel_size),) * geom.nd
            conv.padding = (geom.padding + extra // 2,) * geom.nd
            return Surgery({f"{target}.weight": ParamOrigin(None)},
                           notes=[f"kernel zero-padded from {geom.kernel} to {kernel_size}"])

    return run_morph("enlarge_kernel", model, target, scheme, kwargs, surgery, inputs,
                     input_shape, tol)
