"""How much a factorised layer amplifies the first optimiser steps, and what to do about it.

A deepen (or a dense kernel enlargement) replaces the parent's layer ``W`` by two factors with
``F2 (*) F1 = W~``. One optimiser step on the factors changes the composite by
``dW = J dF`` (``J``: the Jacobian of the composite in the factors); the parent's own step on
``W`` is ``dW_p``. For a gradient ``U`` on the parent kernel's support:

- SGD: ``dF = -lr J^T U``, so ``<U, dW> / <U, dW_p> = ||J^T U||^2 / ||U||^2``;
- Adam-like optimisers (each entry moves by about ``lr``): ``dF = -lr sign(J^T U)``,
  ``dW_p = -lr sign(U)``, the ratio of the sizes ``||J sign(J^T U)|| / ||sign(U)||``.

:func:`amplification` averages these over random ``U``. Two remedies, both exact (the
function is untouched):

- :func:`regauge_`: rescale each middle channel (``F1[m] *= d_m``, ``F2[:, m] /= d_m``; the
  activation between them is positively homogeneous, so the block computes the same) to the
  ``d_m`` that minimises the SGD amplification: ``d_m^2 = ||g_F1[m]|| / ||g_F2[:, m]||``;
- :func:`lr_scales`: a learning-rate multiplier ``1 / amplification`` for both factors, so the
  child's first step in function space has the parent's size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stablemorph.equation import composite
from stablemorph.record import history

ADAPTIVE = ("adam", "adamw")


@dataclass(frozen=True)
class FactorPair:
    """The two factor layers a deepen put in place of ``target``."""

    target: str
    first: str
    second: str
    stride: int
    groups: int
    kernel: int  # the parent's kernel size (0 for Linear, -1 unknown: whole composite)


def factor_pairs(model: nn.Module) -> list[FactorPair]:
    """Every ``F1 -> act -> F2`` block made by a deepen in ``model``'s history whose two
    layers are still in the model."""
    modules = dict(model.named_modules())
    pairs = []
    for rec in history(model):
        if rec.op != "deepen":
            continue
        first, second = f"{rec.target}.first", f"{rec.target}.second"
        if first not in modules or second not in modules:
            continue
        f1 = modules[first]
        stride = f1.stride[0] if hasattr(f1, "stride") else 1
        groups = getattr(f1, "groups", 1)
        # deepen's default first kernel is the parent's: then the parent kernel is F1's size;
        # with another first kernel the whole composite support is used
        k = f1.kernel_size[0] if hasattr(f1, "kernel_size") else 0
        if rec.kwargs.get("first_kernel_size") is not None:
            k = -1
        pairs.append(FactorPair(rec.target, first, second, stride, groups, k))
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
    group of its own kind carrying ``"lr_scale"`` (read by the training loop), in place; the
    optimiser's state is kept. Returns ``optimizer``."""
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
                               "params": params, "lr_scale": s})
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    for g in new_groups:
        optimizer.param_groups.append(g)
    return optimizer
