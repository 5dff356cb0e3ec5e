"""The optimiser side of the stable scheme's step rule (issue 9), applied by
:func:`stablemorph.optim.transfer_optimizer` to what a morph recorded on its factor pairs
(:class:`~stablemorph.record.ParamOrigin` ``lr_advice``, ``lr_reference``, ``factor``):

- the learning-rate multiplier: the morph's measured ``1 / first-step amplification``
  (:mod:`stablemorph.morphs.first_step`) for the optimiser's family (:func:`is_adaptive`),
  under an adaptive optimiser times the parent layer's own typical step
  (:func:`adaptive_step_ratio`): a fresh parameter's first Adam step is ``lr sign(g)``, a
  trained one's much smaller;
- the optimiser state: the parent layer's state mapped through the factorisation
  (:func:`factor_state`), exactly the first moment the factors would hold had the parent's
  gradients flowed through them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stablemorph.equation import composite, pad_kernel

#: Optimisers whose steps are normalised per entry by a running second moment: a fresh
#: parameter's first step is about ``lr sign(grad)`` (any optimiser with ``betas`` counts too).
ADAPTIVE: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam,
    torch.optim.Adamax, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta,
)
# Per-entry state keys mapped through the factorisation, by kind (``STATE_KINDS`` of optim).
_FIRST = ("momentum_buffer", "exp_avg", "grad_avg")
_SQUARE = ("exp_avg_sq", "square_avg")


def is_adaptive(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` takes normalised (sign-like) first steps (:data:`ADAPTIVE`)."""
    return isinstance(optimizer, ADAPTIVE) or "betas" in optimizer.defaults


def adaptive_step_ratio(optimizer: torch.optim.Optimizer, param: Tensor) -> float | None:
    """The typical size of ``param``'s own Adam step, per entry and in units of the learning
    rate: ``mean |m_hat| / (sqrt(v_hat) + eps)`` (``None`` without Adam state: ``exp_avg``,
    ``exp_avg_sq``, ``step`` and the group's ``betas``, ``eps``)."""
    state = optimizer.state.get(param, {})
    if not all(k in state for k in ("exp_avg", "exp_avg_sq", "step")):
        return None
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    if "betas" not in group or "eps" not in group:
        return None
    b1, b2 = group["betas"]
    t = float(state["step"])
    m = state["exp_avg"] / (1 - b1**t)
    v = state["exp_avg_sq"] / (1 - b2**t)
    return float((m.abs() / (v.sqrt() + group["eps"])).mean())


def _adjoint(F1: Tensor, F2: Tensor, stride: int, groups: int, M: Tensor, which: int
             ) -> Tensor:
    """``d/dF <composite(F1, F2), M>`` for ``F = (F1, F2)[which]``: the composite's linear map
    in that factor, transposed, applied to ``M`` (a kernel of the composite's size)."""
    with torch.enable_grad():
        a = F1.detach().double().requires_grad_(which == 0)
        b = F2.detach().double().requires_grad_(which == 1)
        W = composite(a, b, stride, groups)
        return torch.autograd.grad((W * M).sum(), (a, b)[which])[0]


@torch.no_grad()
def factor_state(w1: Tensor, w2: Tensor, b1: Tensor | None, stride: int, groups: int,
                 weight_state: dict[str, Any], bias_state: dict[str, Any]
                 ) -> dict[str, dict[str, Tensor]]:
    """The optimiser state of a factor pair ``F2 (*) F1`` (weights ``w1``, ``w2``; first
    bias ``b1``; ``F1``'s ``stride`` and ``groups``) from its parent layer's
    (``weight_state`` of the parent kernel, ``bias_state`` of its bias), keyed ``"w1"``,
    ``"w2"``, ``"b1"``, ``"b2"``, each ``{state key: tensor}`` in float64.

    A first moment ``M`` of the parent kernel (SGD's momentum, Adam's ``exp_avg``) becomes
    ``J_F^T M`` for each factor (``J_F``: the composite's Jacobian in that factor): the
    first moment the factors would hold had the parent's gradients flowed through them. A
    second moment ``V`` becomes ``(J_F o J_F)^T V`` (the diagonal approximation: products of
    the factors' squares). ``F2``'s bias takes the parent bias's state; ``F1``'s the parent
    bias's mapped through ``F2`` (and ``F2`` also sees the constant map ``b1``). Keys other
    than first and second moments are left out (the caller keeps what it had).
    """
    F1, F2 = w1.detach().double(), w2.detach().double()
    kc = (F1.shape[-1] + stride * (F2.shape[-1] - 1)) if F1.dim() > 2 else 1
    b1 = b1.detach().double() if b1 is not None else None
    out: dict[str, dict[str, Tensor]] = {"w1": {}, "w2": {}, "b1": {}, "b2": {}}
    o_g = F2.shape[0] // groups
    for key, value in weight_state.items():
        if key not in _FIRST and key not in _SQUARE:
            continue
        sq = key in _SQUARE
        M = pad_kernel(value.detach().double(), kc) if F1.dim() > 2 else value.double()
        m1 = _adjoint(F1, F2.square() if sq else F2, stride, groups, M, 0)
        m2 = _adjoint(F1.square() if sq else F1, F2, stride, groups, M, 1)
        mb = bias_state.get(key)
        if mb is not None and b1 is not None:
            # F2 also sees the constant map b1: its gradient gets delta (x) b1 per tap
            extra = (mb.double()[:, None] * (b1.square() if sq else b1)[None, :])
            extra = extra.reshape(groups, o_g, groups, -1).diagonal(
                dim1=0, dim2=2).permute(2, 0, 1).reshape(F2.shape[0], -1)
            m2 = m2 + extra.reshape(*extra.shape, *([1] * (F2.dim() - 2)))
        out["w1"][key], out["w2"][key] = m1, m2
        if mb is not None:
            out["b2"][key] = mb.double()
            s2 = (F2.square() if sq else F2).reshape(F2.shape[0], F2.shape[1], -1)
            s2 = s2.sum(-1)  # (C_out, C_mid/g): each tap sees the constant
            mbg = mb.double().reshape(groups, o_g)
            out["b1"][key] = torch.einsum(
                "gom,go->gm", s2.reshape(groups, o_g, -1), mbg).reshape(-1)
    return out
