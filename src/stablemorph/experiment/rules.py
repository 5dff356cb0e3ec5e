"""The stable scheme's rule in experiments: how much a factor pair amplifies the first
optimiser steps, and what to do about it (issue 9; the research log with every number is in
``benchmarks/results/stability_matrix.md``).

A deepen (or an insert_subnet branch) puts two factors with ``F2 (*) F1 = W~`` where the
parent had one layer ``W``. One optimiser step on the factors changes the block's output by
``J dF`` (``J``: the Jacobian of the composite in the factors); the parent's own step on ``W``
changes it by ``dW``:

- SGD: ``dF = -lr J^T U``, ratio ``<U, J dF> / <U, dW> = ||J^T U||^2 / ||U||^2``;
- Adam-like (fresh parameters step by ``lr sign(g)``): ratio of ``||J sign(J^T U)||`` to
  ``||sign(U)||``.

:func:`data_amplification` measures it on the layer's real inputs (a probe batch),
:func:`amplification` on i.i.d. random kernel gradients. The adopted rule
(``STABLE_RULE`` in :mod:`stablemorph.experiment.stability`), every step exact and dense:

- :func:`orthogonal_second_`: a pointwise pair gets a dense random orthogonal second factor
  (the published solve leaves the parent's spectrum in ``F2``: anisotropic steps);
- :func:`carry_factor_state_`: the parent layer's optimiser state mapped onto the factors;
- :func:`lr_scales` + :func:`with_lr_scales`: the factors' rate times ``1 / amplification``,
  and under Adam times the parent layer's own typical step (:func:`adam_step_ratio`).

Hypotheses that did not make it, kept as arm options for the record: :func:`regauge_`
(minimum average amplification), :func:`isometric_gauge_`, :func:`shrink_first_bias_`,
:func:`scale_new_fan_out_` (widen).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stablemorph.equation import composite, pad_kernel
from stablemorph.record import history

ADAPTIVE = ("adam", "adamw")


@dataclass(frozen=True)
class FactorPair:
    """The two factor layers of a deepen or subnet branch ``target`` (their parent module,
    which also holds the activation ``act``)."""

    target: str
    first: str
    second: str
    stride: int
    groups: int
    kernel: int  # the parent's kernel size (0 for Linear, -1 unknown: whole composite)
    parent_layer: str = ""  # the parent's layer the pair stands for (deepen) or splits (subnet)


def factor_pairs(model: nn.Module) -> list[FactorPair]:
    """Every ``F1 -> act -> F2`` block made by a deepen (in place of ``target``) or an
    insert_subnet (the branch beside ``target``'s shortcut) in ``model``'s history whose two
    layers are still in the model."""
    modules = dict(model.named_modules())
    pairs = []
    for rec in history(model):
        if rec.op == "deepen":
            base = rec.target
        elif rec.op == "insert_subnet":
            base = f"{rec.target}.branch" if f"{rec.target}.branch" in modules else (
                f"{rec.target}.shortcut.branch")
        else:
            continue
        first, second = f"{base}.first", f"{base}.second"
        if first not in modules or second not in modules:
            continue
        f1 = modules[first]
        stride = f1.stride[0] if hasattr(f1, "stride") else 1
        groups = getattr(f1, "groups", 1)
        # deepen's default first kernel is the parent's, whose support the parent's own
        # gradient covers; a subnet's composite is compared on its whole support
        k = f1.kernel_size[0] if hasattr(f1, "kernel_size") else 0
        if rec.op != "deepen" and k:
            k = -1
        pairs.append(FactorPair(base, first, second, stride, groups, k, rec.target))
    return pairs


def _probes(shape: tuple[int, ...], kernel: int, samples: int, seed: int) -> list[Tensor]:
    """Random gradients on the parent kernel's (centred) support of a composite ``shape``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(samples):
        U = torch.zeros(shape, dtype=torch.float64)
        if len(shape) == 2 or kernel <= 0:
            U = torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            kc = shape[-1]
            lo = (kc - kernel) // 2
            sl = (slice(None), slice(None), *[slice(lo, lo + kernel)] * (len(shape) - 2))
            U[sl] = torch.randn(U[sl].shape, generator=gen, dtype=torch.float64)
        out.append(U)
    return out


def _grads(F1: Tensor, F2: Tensor, pair: FactorPair, U: Tensor) -> tuple[Tensor, Tensor]:
    a = F1.detach().double().requires_grad_(True)
    b = F2.detach().double().requires_grad_(True)
    W = composite(a, b, pair.stride, pair.groups)
    ga, gb = torch.autograd.grad((W * U).sum(), (a, b))
    return ga, gb


def amplification(model: nn.Module, pair: FactorPair, optimizer: str = "sgd",
                  samples: int = 8, seed: int = 0) -> float:
    """The pair's first-step amplification (module docstring) for ``optimizer`` (``"sgd"``
    or an Adam-like name in :data:`ADAPTIVE`): 1 means the parent's step size."""
    modules = dict(model.named_modules())
    F1, F2 = modules[pair.first].weight, modules[pair.second].weight
    with torch.no_grad():
        W = composite(F1.double(), F2.double(), pair.stride, pair.groups)
    ratios = []
    for U in _probes(tuple(W.shape), pair.kernel, samples, seed):
        ga, gb = _grads(F1, F2, pair, U)
        if optimizer in ADAPTIVE:
            sa, sb = ga.sign(), gb.sign()
            _, dW = torch.func.jvp(
                lambda x, y: composite(x, y, pair.stride, pair.groups),
                (F1.detach().double(), F2.detach().double()), (sa, sb))
            ratios.append(float(dW.norm() / U.sign().norm()))
        else:
            ratios.append(float((ga.pow(2).sum() + gb.pow(2).sum()) / U.pow(2).sum()))
    return sum(ratios) / len(ratios)


@torch.no_grad()
def regauge_(model: nn.Module, samples: int = 8, seed: int = 0) -> None:
    """Rebalance every deepen's middle channels to the SGD-amplification minimum, in place;
    the model computes the same function (up to float rounding)."""
    modules = dict(model.named_modules())
    for pair in factor_pairs(model):
        f1, f2 = modules[pair.first], modules[pair.second]
        W = composite(f1.weight.double(), f2.weight.double(), pair.stride, pair.groups)
        n1 = torch.zeros(f1.weight.shape[0], dtype=torch.float64)
        n2 = torch.zeros_like(n1)
        for U in _probes(tuple(W.shape), pair.kernel, samples, seed):
            with torch.enable_grad():
                ga, gb = _grads(f1.weight, f2.weight, pair, U)
            n1 += ga.pow(2).flatten(1).sum(1)
            g = pair.groups
            o_g = gb.shape[0] // g
            n2 += gb.reshape(g, o_g, gb.shape[1], -1).pow(2).sum((1, 3)).flatten()
        d = (n1.sqrt() / n2.sqrt().clamp_min(1e-300)).sqrt().clamp(1e-3, 1e3)
        shape1 = (-1, *([1] * (f1.weight.dim() - 1)))
        f1.weight.mul_(d.reshape(shape1).to(f1.weight.dtype))
        if f1.bias is not None:
            f1.bias.mul_(d.to(f1.bias.dtype))
        g = pair.groups
        o_g, m_g = f2.weight.shape[0] // g, f2.weight.shape[1]
        dd = d.reshape(g, 1, m_g).expand(g, o_g, m_g).reshape(f2.weight.shape[0], m_g)
        f2.weight.div_(dd.reshape(*dd.shape, *([1] * (f2.weight.dim() - 2))).to(f2.weight.dtype))


def _block_input(model: nn.Module, pair: FactorPair, probe: Tensor) -> Tensor:
    """The input the pair's first factor receives on ``probe`` (eval mode)."""
    first = dict(model.named_modules())[pair.first]
    box: list[Tensor] = []
    handle = first.register_forward_hook(lambda m, args, out: box.append(args[0].detach()))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(probe)
    finally:
        handle.remove()
        for m, mode in modes:
            m.training = mode
    return box[0]


def _bias_map(b: Tensor, like: Tensor) -> Tensor:
    """A per-channel bias step as the output change it makes (channel dim 1, or last for a
    Linear's (N, C) output)."""
    if like.dim() == 2:
        return b.expand_as(like)
    return b.reshape(1, -1, *([1] * (like.dim() - 2))).expand_as(like)


def data_amplification(model: nn.Module, pair: FactorPair, probe: Tensor,
                       optimizer: str = "sgd", samples: int = 4, seed: int = 0,
                       slopes: bool = False) -> float:
    """The pair's first-step amplification on the data: the block's input ``x`` is what it
    receives on ``probe``; for random output gradients ``delta`` the block's step on its
    factors (weights and biases) is compared, on the output on ``x``, with the step the
    parent's layer ``W~`` (the composite, same stride and padding as ``F1``) takes on its own
    kernel support. SGD: ``<delta, dOut_child> / <delta, dOut_parent>``; Adam-like: the ratio
    of ``||dOut||`` under sign steps. 1 means the parent's step size. With ``slopes`` the
    activation's slope between the factors counts as a parameter of the block too."""
    modules = dict(model.named_modules())
    f1, f2 = modules[pair.first], modules[pair.second]
    act = modules.get(f"{pair.target}.act")
    x = _block_input(model, pair, probe).double()
    conv = isinstance(f1, nn.Conv1d | nn.Conv2d)
    fn = (torch.nn.functional.conv1d if isinstance(f1, nn.Conv1d) else
          torch.nn.functional.conv2d) if conv else None
    th = {n: t.detach().double() for n, t in (("w1", f1.weight), ("w2", f2.weight))}
    th["b1"] = f1.bias.detach().double() if f1.bias is not None else None
    th["b2"] = f2.bias.detach().double() if f2.bias is not None else None
    th["a"] = act.a.detach().double() if slopes and act is not None else None
    act64 = copy.deepcopy(act).double() if th["a"] is not None else None
    names = [n for n in ("w1", "b1", "a", "w2", "b2") if th[n] is not None]

    def block(*vals: Tensor) -> Tensor:
        p = dict(zip(names, vals, strict=True))
        if conv:
            h = fn(x, p["w1"], p.get("b1"), f1.stride, f1.padding, 1, f1.groups)
        else:
            h = torch.nn.functional.linear(x, p["w1"], p.get("b1"))
        if "a" in p:
            h = torch.func.functional_call(act64, {"a": p["a"]}, (h,))
        if conv:
            return fn(h, p["w2"], p.get("b2"), 1, 0, 1, f2.groups)
        return torch.nn.functional.linear(h, p["w2"], p.get("b2"))

    with torch.no_grad():
        W = composite(th["w1"], th["w2"], pair.stride, pair.groups)
        bias = block(*[th[n] for n in names]) - (
            fn(x, W, None, f1.stride, f1.padding, 1, f1.groups) if conv else x @ W.T)
    mask = torch.zeros_like(W)
    if conv and pair.kernel > 0:
        lo = (W.shape[-1] - pair.kernel) // 2
        mask[(slice(None), slice(None), *[slice(lo, lo + pair.kernel)] * (W.dim() - 2))] = 1
    else:
        mask += 1

    def parent(w: Tensor) -> Tensor:
        out = fn(x, w, None, f1.stride, f1.padding, 1, f1.groups) if conv else x @ w.T
        return out + bias

    gen = torch.Generator().manual_seed(seed)
    ratios = []
    for _ in range(samples):
        with torch.no_grad():
            out = parent(W)
        delta = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        vals = [th[n].clone().requires_grad_(True) for n in names]
        grads = torch.autograd.grad((block(*vals) * delta).sum(), vals)
        w = W.clone().requires_grad_(True)
        gW = torch.autograd.grad((parent(w) * delta).sum(), w)[0] * mask
        # the parent's bias (F2's bias stands for it) takes the same step as F2's
        gb = grads[names.index("b2")] if "b2" in names else None
        if optimizer in ADAPTIVE:
            _, d_child = torch.func.jvp(block, tuple(th[n] for n in names),
                                        tuple(g.sign() for g in grads))
            _, d_par = torch.func.jvp(parent, (W,), (gW.sign(),))
            if gb is not None:
                d_par = d_par + _bias_map(gb.sign(), d_par)
            ratios.append(float(d_child.norm() / d_par.norm().clamp_min(1e-300)))
        else:
            par = gW.pow(2).sum() + (gb.pow(2).sum() if gb is not None else 0.0)
            ratios.append(float(sum(g.pow(2).sum() for g in grads) / par.clamp_min(1e-300)))
    return sum(ratios) / len(ratios)


@torch.no_grad()
def isometric_gauge_(model: nn.Module, kappa: float = 1.0) -> None:
    """Rescale every deepen's middle channels (exactly: ``F1[m] *= d_m``, ``F2[:, m] /= d_m``)
    so every column of the second factor has ``kappa`` times the norm of a He-initialised
    column: the second factor then acts like ``kappa`` times an isometry where it was one
    before the per-channel balance (an orthogonal ``F2``), and the first factor carries the
    parent's kernel, scaled by ``1 / kappa``."""
    modules = dict(model.named_modules())
    for pair in factor_pairs(model):
        f1, f2 = modules[pair.first], modules[pair.second]
        w2 = f2.weight
        g = pair.groups
        o_g, m_g = w2.shape[0] // g, w2.shape[1]
        k2n = w2[0, 0].numel()
        cols = w2.reshape(g, o_g, m_g, k2n).transpose(1, 2).reshape(g * m_g, -1).norm(dim=1)
        target = kappa * (o_g * k2n * 2.0 / (m_g * k2n)) ** 0.5
        d = (cols / target).clamp_min(1e-12)
        f1.weight.mul_(d.reshape(-1, *([1] * (f1.weight.dim() - 1))))
        if f1.bias is not None:
            f1.bias.mul_(d)
        dd = d.reshape(g, 1, m_g).expand(g, o_g, m_g).reshape(w2.shape[0], m_g)
        w2.div_(dd.reshape(*dd.shape, *([1] * (w2.dim() - 2))))


def lr_scales(model: nn.Module, optimizer: str = "sgd", samples: int = 8,
              seed: int = 0, slopes: bool = False, probe: Tensor | None = None
              ) -> dict[str, float]:
    """``{parameter name: 1 / amplification}`` for both factors (weights and biases) of
    every deepen in the model's history (and the activation's slope between them with
    ``slopes``); with ``probe`` the amplification is measured on the data
    (:func:`data_amplification`), else on random gradients (:func:`amplification`)."""
    scales: dict[str, float] = {}
    for pair in factor_pairs(model):
        if probe is not None:
            amp = data_amplification(model, pair, probe, optimizer, seed=seed, slopes=slopes)
        else:
            amp = amplification(model, pair, optimizer, samples, seed)
        s = 1.0 / max(amp, 1e-12)
        if slopes:
            scales[f"{pair.target}.act.a"] = s
        for layer in (pair.first, pair.second):
            for suffix in ("weight", "bias"):
                scales[f"{layer}.{suffix}"] = s
    names = dict(model.named_parameters())
    return {n: s for n, s in scales.items() if n in names}


def with_lr_scales(optimizer: torch.optim.Optimizer, model: nn.Module,
                   scales: dict[str, float]) -> torch.optim.Optimizer:
    """``optimizer``'s param groups split so every parameter with a multiplier sits in a
    group of its own: a copy of its group with ``lr`` times the multiplier and the key
    ``"lr_scale"`` (its group's, times the multiplier: read by the training loop), in place;
    the optimiser's state is kept. Returns ``optimizer``."""
    if not scales:
        return optimizer
    by_id = {id(p): n for n, p in model.named_parameters()}
    new_groups = []
    for group in optimizer.param_groups:
        keep, moved = [], {}
        for p in group["params"]:
            s = scales.get(by_id.get(id(p), ""), None)
            if s is None:
                keep.append(p)
            else:
                moved.setdefault(s, []).append(p)
        group["params"] = keep
        for s, params in moved.items():
            new_groups.append({**{k: v for k, v in group.items() if k != "params"},
                               "params": params, "lr": group["lr"] * s,
                               "lr_scale": group.get("lr_scale", 1.0) * s})
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    for g in new_groups:
        optimizer.param_groups.append(g)
    return optimizer


_FIRST = ("momentum_buffer", "exp_avg")
_SQUARE = ("exp_avg_sq",)


def _adjoint(F1: Tensor, F2: Tensor, pair: FactorPair, M: Tensor, which: int) -> Tensor:
    """``d/dF <composite(F1, F2), M>`` for ``F = (F1, F2)[which]``: the composite's linear map
    in that factor, transposed, applied to ``M`` (a kernel of the composite's size)."""
    with torch.enable_grad():
        a = F1.detach().double().requires_grad_(which == 0)
        b = F2.detach().double().requires_grad_(which == 1)
        W = composite(a, b, pair.stride, pair.groups)
        return torch.autograd.grad((W * M).sum(), (a, b)[which])[0]


@torch.no_grad()
def carry_factor_state_(optimizer: torch.optim.Optimizer, model: nn.Module,
                        parent_optimizer: torch.optim.Optimizer, parent: nn.Module) -> None:
    """Give every deepen's fresh factors the optimiser state their parent layer had, mapped
    through the factorisation, in place: a first moment (SGD momentum, Adam's ``exp_avg``)
    ``M`` of the parent kernel becomes ``J_F^T M`` for each factor (exactly the first moment
    the factors would hold had the parent's gradients flowed through them), Adam's second
    moment ``V`` becomes ``(J_F o J_F)^T V`` (the diagonal approximation: products of the
    factors' squares), the step count is the parent's. ``F2``'s bias takes the parent bias's
    state, ``F1``'s the parent bias's mapped through ``F2``. Parameters the optimiser does
    not hold, or whose parent layer had no state, are left alone."""
    modules = dict(model.named_modules())
    pparams = dict(parent.named_parameters())
    for pair in factor_pairs(model):
        W = pparams.get(f"{pair.target}.weight")
        if W is None or W not in parent_optimizer.state:
            continue
        sW = parent_optimizer.state[W]
        pb = pparams.get(f"{pair.target}.bias")
        sb = parent_optimizer.state.get(pb, {}) if pb is not None else {}
        f1, f2 = modules[pair.first], modules[pair.second]
        F1, F2 = f1.weight.detach().double(), f2.weight.detach().double()
        kc = (F1.shape[-1] + pair.stride * (F2.shape[-1] - 1)) if F1.dim() > 2 else 1
        b1 = f1.bias.detach().double() if f1.bias is not None else None
        for key, value in sW.items():
            if key in _FIRST or key in _SQUARE:
                sq = key in _SQUARE
                M = pad_kernel(value.detach().double(), kc) if F1.dim() > 2 else value.double()
                m1 = _adjoint(F1, F2.square() if sq else F2, pair, M, 0)
                m2 = _adjoint(F1.square() if sq else F1, F2, pair, M, 1)
                mb = sb.get(key)
                if mb is not None and b1 is not None:
                    # F2 also sees the constant map b1: its gradient gets delta (x) b1 per tap
                    extra = (mb.double()[:, None] * (b1.square() if sq else b1)[None, :])
                    o_g = F2.shape[0] // pair.groups
                    extra = extra.reshape(pair.groups, o_g, pair.groups, -1).diagonal(
                        dim1=0, dim2=2).permute(2, 0, 1).reshape(F2.shape[0], -1)
                    m2 = m2 + extra.reshape(*extra.shape, *([1] * (F2.dim() - 2)))
                new = {f1.weight: m1, f2.weight: m2}
                if mb is not None:
                    if f2.bias is not None:
                        new[f2.bias] = mb.double()
                    if f1.bias is not None:
                        s2 = (F2.square() if sq else F2).reshape(F2.shape[0], F2.shape[1], -1)
                        s2 = s2.sum(-1)  # (C_out, C_mid/g): each tap sees the constant
                        o_g = F2.shape[0] // pair.groups
                        mbg = mb.double().reshape(pair.groups, o_g)
                        new[f1.bias] = torch.einsum(
                            "gom,go->gm", s2.reshape(pair.groups, o_g, -1), mbg).reshape(-1)
                for p, v in new.items():
                    if any(p is q for g in optimizer.param_groups for q in g["params"]):
                        optimizer.state[p][key] = v.to(p.dtype)
        for p in (f1.weight, f2.weight, f1.bias, f2.bias):
            if p is not None and "step" in sW and p in optimizer.state:
                optimizer.state[p]["step"] = sW["step"].clone()


@torch.no_grad()
def shrink_first_bias_(model: nn.Module, factor: float) -> None:
    """Scale every deepen's first-factor bias ``b1`` by ``factor`` and move the difference into
    the second factor's bias (``b2 += F2 (b1 - factor b1)``, ``F2`` applied to a constant map:
    exact, since the second factor never pads)."""
    modules = dict(model.named_modules())
    for pair in factor_pairs(model):
        f1, f2 = modules[pair.first], modules[pair.second]
        if f1.bias is None or f2.bias is None:
            continue
        moved = f1.bias.detach().double() * (1.0 - factor)
        w2 = f2.weight.detach().double()
        g = pair.groups
        o_g, m_g = w2.shape[0] // g, w2.shape[1]
        s2 = w2.reshape(g, o_g, m_g, -1).sum(-1)
        resp = torch.einsum("gom,gm->go", s2, moved.reshape(g, m_g)).reshape(-1)
        f2.bias.add_(resp.to(f2.bias.dtype))
        f1.bias.mul_(factor)


@torch.no_grad()
def orthogonal_second_(model: nn.Module, seed: int = 0) -> None:
    """Re-factor every deepen whose second factor is pointwise (Linear, or a 1x1 conv; groups
    1) exactly as ``F2 = c Q`` (``Q`` a dense random matrix with orthonormal columns, ``c`` the
    He scale of ``F2``'s shape) and ``F1 = F2^+ W + (I - F2^+ F2) R`` (``W`` the block's
    composite kernel, ``R`` the old ``F1``: its component in ``F2``'s null space keeps ``F1``
    dense when ``C_mid > C_out``). The first factor's bias keeps its values; the second's is
    recomputed so the block's bias is unchanged."""
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    for pair in factor_pairs(model):
        f1, f2 = modules[pair.first], modules[pair.second]
        if pair.groups != 1 or (f2.weight.dim() > 2 and f2.weight[0, 0].numel() != 1):
            continue
        w1, w2 = f1.weight.detach().double(), f2.weight.detach().double()
        c_out, m = w2.shape[0], w2.shape[1]
        A1 = w1.reshape(m, -1)
        A2 = w2.reshape(c_out, m)
        Wc = A2 @ A1
        bias = None
        if f2.bias is not None:
            b1 = f1.bias.detach().double() if f1.bias is not None else torch.zeros(m).double()
            bias = f2.bias.detach().double() + A2 @ b1
        q, r = torch.linalg.qr(torch.randn(m, c_out, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))
        Q = q.T * 2.0**0.5  # (C_out, m): orthonormal rows, He-scaled entries (std (2/m)^0.5)
        pinv = torch.linalg.pinv(Q)
        F1 = pinv @ Wc + (torch.eye(m, dtype=torch.float64) - pinv @ Q) @ A1
        f1.weight.copy_(F1.reshape(w1.shape).to(f1.weight.dtype))
        f2.weight.copy_(Q.reshape(w2.shape).to(f2.weight.dtype))
        if bias is not None:
            f2.bias.copy_((bias - Q @ b1).to(f2.bias.dtype))


def adam_step_ratio(optimizer: torch.optim.Optimizer, parent: nn.Module,
                    target: str) -> float | None:
    """The typical size of the parent layer's own Adam step, per entry and in units of the
    learning rate: ``mean |m_hat| / (sqrt(v_hat) + eps)`` of ``target.weight`` (``None``
    without Adam state). A fresh parameter's first Adam step is ``lr sign(g)`` (ratio 1), a
    trained one's is this much."""
    W = dict(parent.named_parameters()).get(f"{target}.weight")
    state = optimizer.state.get(W, {}) if W is not None else {}
    if "exp_avg" not in state or "exp_avg_sq" not in state:
        return None
    group = next(g for g in optimizer.param_groups if any(p is W for p in g["params"]))
    b1, b2 = group["betas"]
    t = float(state["step"])
    m = state["exp_avg"] / (1 - b1**t)
    v = state["exp_avg_sq"] / (1 - b2**t)
    return float((m.abs() / (v.sqrt() + group["eps"])).mean())


@torch.no_grad()
def scale_new_fan_out_(model: nn.Module, factor: float) -> None:
    """Scale the outgoing weights of every widen's *fresh* units (the ``(Z, -Z)`` pairs of
    the stable plan: consumer columns whose origin index is negative) by ``factor``; the pairs
    still cancel, so the function is unchanged."""
    params = dict(model.named_parameters())
    for rec in history(model):
        if rec.op != "widen":
            continue
        for name, origin in rec.report.param_map.items():
            if (origin.dim != 1 or origin.index is None or name not in params
                    or params[name].dim() < 2):
                continue
            new = (origin.index < 0).nonzero().flatten()
            if len(new):
                p = params[name]
                p[:, new.to(p.device)] = p[:, new.to(p.device)] * factor
