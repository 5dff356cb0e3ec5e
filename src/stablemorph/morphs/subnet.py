"""``insert_subnet``: Modularized Morphing's residual case. A shortcut (or a layer) is split
into two parts, ``share * shortcut(x)`` and ``(1 - share) * shortcut(x)``, and the second is
morphed exactly into a branch of convs ``F1 -> PAct(a=1) -> F2`` (3x3 then 1x1 by default).

The target can be:

- an ``nn.Identity`` (or an empty ``nn.Sequential``) used as a shortcut: it becomes
  :class:`ResidualBranch` ``share * x + branch(x)``;

  the branch acts on the units of ``x`` as the layer upstream lays them out: channels-first
  ``(N, C, L)`` / ``(N, C, H, W)`` after a conv gives conv factors, ``(N, T, F)`` after a
  Linear (tokens, features) gives Linear factors applied to each token alone, exact at any
  sequence length and never mixing tokens (causality kept);
- a Linear/Conv layer ``L`` (e.g. a 1x1 projection shortcut): it becomes
  ``share * L(x) + branch(x)``, the branch composing ``(1 - share) L``;
- any other module whose forward adds its own input ``x`` to something (a residual block
  with an identity shortcut, such as ``layer1.0`` of the zoo's ResNet): the ``x`` operand of
  that add is routed through a new :class:`ResidualBranch` submodule named ``shortcut``. The
  block is rebuilt as a ``torch.fx.GraphModule`` of the same class name whose submodules and
  state_dict keys are unchanged; its forward becomes fx's generated code.

The branch composes exactly to ``(1 - share)`` times the identity (or the layer), by the
chosen scheme's decomposition, so the function is unchanged in eval and train mode.

The step rule (``step_rule``, as for :func:`~stablemorph.morphs.deepen.deepen`): the branch's
factors get an orthogonal pointwise second factor (stable only) and the learning-rate
multipliers measured on the probe batch, against the branch's whole composite; under an
adaptive optimiser they also scale by the split layer's typical step (a layer target). The
branch stands for no parent layer's kernel, so its factors keep the fresh-parameter state.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from stablemorph.activations import ACTIVATIONS
from stablemorph.graph import input_unit_dim, set_module, trace_graph
from stablemorph.morphs.contract import (
    MorphError,
    Surgery,
    adopt,
    check_scheme,
    get_layer,
    run_morph,
)
from stablemorph.morphs.deepen import factor_origins, step_rule_measure
from stablemorph.morphs.factor import (
    Factors,
    Geometry,
    build_factors,
    check_feasible,
    default_width,
    resolve_kernels,
)
from stablemorph.record import ParamOrigin
from stablemorph.schemes import get_scheme, step_rule_on
from stablemorph.verify import preserved_state

_ADDS = {operator.add, operator.iadd, torch.add}
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


class ResidualBranch(nn.Module):
    """``scale * shortcut(x) + branch(x)``; ``shortcut`` defaults to the identity.

    Shapes: ``shortcut`` and ``branch`` map the input to outputs of the same shape.
    """

    def __init__(self, branch: nn.Module, scale: float, shortcut: nn.Module | None = None
                 ) -> None:
        super().__init__()
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.branch = branch
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.shortcut(x) + self.branch(x)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def _is_identity(m: nn.Module) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Sequential) and len(m) == 0)


def _input_shape(model: nn.Module, target: str, probe: tuple[Tensor, ...]) -> torch.Size:
    """The shape of the first input ``target`` receives on the probe batch."""
    seen: list[torch.Size] = []
    module = model.get_submodule(target)
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    try:
        with preserved_state(model), torch.no_grad():
            run = getattr(probe, "run", None)  # a verify.Probe also carries keyword inputs
            run(model) if run is not None else model(*probe)
    finally:
        handle.remove()
    if not seen:
        raise MorphError(f"insert_subnet: {target!r} is never called on the probe batch")
    return seen[0]


def _identity_geometry(model: nn.Module, target: str, probe: tuple[Tensor, ...]) -> Geometry:
    """The identity's geometry: Linear over the last dim for ``(N, F)`` and for inputs whose
    units lie last (``(N, T, F)`` tokens after a Linear), else a conv over the channels of
    ``(N, C, L)`` / ``(N, C, H, W)``."""
    shape = _input_shape(model, target, probe)
    dim = input_unit_dim(model, target, probe)
    if dim is None:  # nothing upstream says: channels-first only in a model with convs
        convs = any(isinstance(m, nn.Conv1d | nn.Conv2d) for m in model.modules())
        dim = 1 if convs and len(shape) in (3, 4) else len(shape) - 1
    if dim == len(shape) - 1 and len(shape) >= 2:
        return Geometry(0, shape[-1], shape[-1], 1, 1, 0, 1)
    if dim != 1 or len(shape) not in (3, 4):
        raise MorphError(f"insert_subnet {target!r}: input shape {tuple(shape)} with units on "
                         f"dim {dim}: supported are units last ((N, F), (N, T, F)) or "
                         f"channels-first (N, C, L) and (N, C, H, W)")
    return Geometry(len(shape) - 2, shape[1], shape[1], 1, 1, 0, 1)


def _identity_kernel(geom: Geometry, scale: float, like: Tensor) -> Tensor:
    eye = torch.eye(geom.out_channels, dtype=like.dtype, device=like.device) * scale
    return eye.reshape(geom.out_channels, geom.out_channels, *([1] * geom.nd))


def _find_shortcut(block: nn.Module, target: str) -> tuple[fx.Graph, fx.Node, fx.Node]:
    """``block``'s traced graph, its one add of the block input, and that input node
    (a GraphError when fx cannot trace the block's own forward)."""
    graph, _ = trace_graph(block)
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target in _ADDS
            and inputs and inputs[0] in n.args]
    if len(adds) != 1:
        what = "no add of its input" if not adds else f"{len(adds)} adds of its input"
        raise MorphError(
            f"insert_subnet {target!r}: {type(block).__name__}.forward has {what} (an identity "
            f"shortcut); target the shortcut module or a conv (e.g. a projection) instead"
        )
    return graph, adds[0], inputs[0]


def _route_shortcut(block: nn.Module, graph: fx.Graph, add: fx.Node, x: fx.Node,
                    branch: ResidualBranch) -> tuple[fx.GraphModule, str]:
    """``block`` rebuilt with the ``x`` operand of ``add`` passed through ``branch``
    (registered under a new name, returned)."""
    name = "shortcut"
    while hasattr(block, name):
        name += "_branch"
    block.add_module(name, branch)
    with graph.inserting_before(add):
        routed = graph.call_module(name, (x,))
    add.replace_input_with(x, routed)
    gm = fx.GraphModule(block, graph, class_name=type(block).__name__)
    gm.train(block.training)
    return gm, name


def insert_subnet(
    model: nn.Module,
    target: str,
    *,
    kernel_sizes: Sequence[int] = (3, 1),
    width: int | None = None,
    share: float = 0.5,
    activation: str = "relu",
    scheme: str = "stable",
    seed: int = 0,
    inputs: Tensor | Sequence[Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
    tol: float | None = None,
    step_rule: bool | None = None,
) -> nn.Module:
    """A copy of ``model`` in which the shortcut or layer ``target`` gets a parallel branch
    ``F1 -> PAct -> F2`` carrying ``1 - share`` of it (module docstring).

    Args:
        model: the parent; never modified.
        target: an identity shortcut module, a Linear/Conv1d/Conv2d layer, or a residual
            block whose forward adds its input.
        kernel_sizes: ``(K1, K2)`` of the branch (default 3x3 then 1x1; ``(1, 3)`` is the
            mirror); ``K1 + stride (K2 - 1) - K`` even and >= 0.
        width: the branch's middle width (default :func:`~.factor.default_width`).
        share: the part ``0 < share < 1`` the shortcut keeps.
        activation, scheme, seed, inputs, input_shape, tol, step_rule: as for ``deepen``.

    Raises:
        MorphError: no identity shortcut or unsupported target, bad options, a ``"stable"``
            request with no dense exact solution, or a failed verification.
    """
    check_scheme(scheme)
    if activation not in ACTIVATIONS:
        raise MorphError(f"insert_subnet {target!r}: unknown activation {activation!r}")
    if not 0.0 < float(share) < 1.0:
        raise MorphError(f"insert_subnet {target!r}: share must be in (0, 1), got {share!r}")
    k1, k2 = (int(k) for k in kernel_sizes)
    module = get_layer(model, target, (nn.Module,), "insert_subnet")
    if isinstance(module, _LAYERS):
        geom: Geometry | None = Geometry.of(module, target, "insert_subnet")
    elif isinstance(module, ResidualBranch):
        raise MorphError(f"insert_subnet {target!r}: already a ResidualBranch; target its "
                         f"'.shortcut' or a layer of its branch")
    else:
        geom = None  # an identity: its channels are known once the probe has run
    rule = step_rule_on(scheme, step_rule)
    kwargs: dict[str, object] = {"scheme": scheme, "kernel_sizes": [k1, k2], "width": width,
                                 "share": float(share), "activation": activation, "seed": seed,
                                 "step_rule": rule}

    def plan(g: Geometry) -> tuple[int, int, int]:
        """Kernels and width for geometry ``g``, recorded in ``kwargs``; refuses an infeasible
        "stable" request."""
        kk1, kk2 = resolve_kernels(g, k1 if g.nd else None, k2 if g.nd else None, target,
                                   "insert_subnet")
        w = default_width(g, kk1, kk2) if width is None else int(width)
        if get_scheme(scheme).dense:
            check_feasible(g, w, kk1, kk2, target, "insert_subnet")
        kwargs.update(kernel_sizes=[kk1, kk2], width=w)
        return kk1, kk2, w

    if geom is not None:
        plan(geom)  # a layer's geometry is known now: refuse before any work

    def surgery(child: nn.Module, probe: tuple[Tensor, ...]) -> Surgery:
        old = child.get_submodule(target)
        parent_params = {n for n, _ in child.named_parameters()}
        shortcut = None
        if not isinstance(old, _LAYERS) and not _is_identity(old):
            shortcut = _find_shortcut(old, target)  # refuse before any work
        if isinstance(old, _LAYERS):
            g = Geometry.of(old, target, "insert_subnet")
            G, bias = old.weight.detach() * (1 - share), None
            if old.bias is not None:
                bias = old.bias.detach() * (1 - share)
        else:
            g = _identity_geometry(child, target, probe)
            like = next(iter(child.parameters()))
            G, bias = _identity_kernel(g, 1 - share, like), None
        kk1, kk2, w = plan(g)
        factors: Factors = build_factors(g, G, bias, scheme=scheme, width=w,
                                         kernels=(kk1, kk2), activation=activation, seed=seed,
                                         orthogonal=rule and scheme == "stable")
        notes = list(factors.notes)

        def measures(prefix: str, origins: dict[str, ParamOrigin]
                     ) -> dict[str, Callable[[Tensor], list[str]]]:
            # the branch stands for no parent kernel: no state mapping
            return step_rule_measure(child, prefix, origins, -1, target, parent_params,
                                     factor=False) if rule else {}

        if isinstance(old, _LAYERS):
            adopt(factors.block, old)
            set_module(child, target, ResidualBranch(factors.block, share, shortcut=old))
            origins = factor_origins(f"{target}.branch", factors, None)
            found = measures(f"{target}.branch", origins)
            named = dict(child.named_parameters())  # a tied weight is listed once, elsewhere
            for n, _ in old.named_parameters():
                if f"{target}.shortcut.{n}" in named:
                    origins[f"{target}.shortcut.{n}"] = ParamOrigin(f"{target}.{n}")
            notes.insert(0, f"{target!r} split into {share} * layer + a branch")
            return Surgery(origins, residual=factors.report.residual_cast, notes=notes,
                           measures=found)
        factors.block.train(old.training)
        branch = ResidualBranch(factors.block, share)
        branch.train(old.training)
        if shortcut is None:
            set_module(child, target, branch)
            prefix = f"{target}.branch"
        else:
            rebuilt, name = _route_shortcut(old, *shortcut, branch)
            set_module(child, target, rebuilt)
            prefix = f"{target}.{name}.branch"
        notes.insert(0, f"identity shortcut of {target!r} split into {share} * x + a branch")
        origins = factor_origins(prefix, factors, None)
        return Surgery(origins, residual=factors.report.residual_cast, notes=notes,
                       measures=measures(prefix, origins))

    return run_morph("insert_subnet", model, target, scheme, kwargs, surgery, inputs,
                     input_shape, tol)
