"""How much a factor pair amplifies the first optimiser steps, measured on the probe batch
(the stable scheme's step rule, issue 9; numbers in ``benchmarks/results/stability_research.md``).

A deepen (or an insert_subnet branch) puts ``F1 -> act -> F2`` (at ``a = 1`` the identity)
where the parent had one layer ``W~ = F2 (*) F1``. One optimiser step on the block's
parameters changes its output on the block's real input ``x`` by ``dOut_child``; the parent's
own step on ``W~`` (on the parent kernel's support; its bias takes ``F2``'s bias step)
changes it by ``dOut_parent``. For random output gradients ``delta``:

- SGD (``dTheta = -lr grad``): amplification ``||grad_child||^2 / ||grad_parent||^2``
  (``<delta, dOut_child> / <delta, dOut_parent>``);
- adaptive optimisers (Adam and kin: a fresh parameter's first step is ``lr sign(grad)``):
  ``||J sign(grad_child)|| / ||J_parent sign(grad_parent)||``.

1 means the parent's step size; the stable scheme recommends ``1 / amplification`` as the
block's learning-rate multiplier (:func:`advise`), applied by
:func:`stablemorph.optim.transfer_optimizer`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablemorph.equation import composite
from stablemorph.verify import preserved_state

#: random output gradients averaged per measurement, and their seed (a measurement, not a
#: choice: the same directions for every morph)
SAMPLES = 4
SEED = 0


def block_input(model: nn.Module, first: nn.Module, probe: Any) -> Tensor:
    """The input the module ``first`` (of ``model``) receives on ``probe`` (a tensor, or a
    :class:`~stablemorph.verify.Probe`), in eval mode; modes, buffers and RNG untouched."""
    box: list[Tensor] = []
    handle = first.register_forward_hook(lambda m, args, out: box.append(args[0].detach()))
    try:
        with preserved_state(model), torch.no_grad(), torch.random.fork_rng():
            model.eval()
            run = getattr(probe, "run", None)
            run(model) if run is not None else model(probe)
    finally:
        handle.remove()
    if not box:
        raise ValueError(f"the block's first layer {type(first).__name__} is never called on "
                         f"the probe batch")
    return box[0]


def _bias_map(b: Tensor, like: Tensor, conv: bool) -> Tensor:
    """A per-channel bias step as the output change it makes (channels on dim 1 for a conv,
    last for a Linear)."""
    if not conv:
        return b.expand_as(like)
    return b.reshape(1, -1, *([1] * (like.dim() - 2))).expand_as(like)


def step_amplification(block: nn.Module, x: Tensor, kernel: int, adaptive: bool, *,
                       samples: int = SAMPLES, seed: int = SEED, slopes: bool = False) -> float:
    """The first-step amplification (module docstring) of ``block`` (children ``first``,
    ``act``, ``second``) on its input ``x``.

    ``kernel``: the parent layer's kernel size, whose centred support the parent's step
    covers (0 or -1: the composite's whole support). ``adaptive``: sign steps (Adam-like)
    instead of SGD's. ``slopes``: the activation's slope counts as a block parameter too
    (a research option). Computed in float64."""
    f1, f2, act = block.first, block.second, block.act
    x = x.double()
    conv = isinstance(f1, nn.Conv1d | nn.Conv2d)
    fn = (F.conv1d if isinstance(f1, nn.Conv1d) else F.conv2d) if conv else None
    stride = f1.stride[0] if conv else 1
    th = {n: t.detach().double() for n, t in (("w1", f1.weight), ("w2", f2.weight))}
    th["b1"] = f1.bias.detach().double() if f1.bias is not None else None
    th["b2"] = f2.bias.detach().double() if f2.bias is not None else None
    th["a"] = act.a.detach().double() if slopes else None
    act64 = copy.deepcopy(act).double() if slopes else None
    names = [n for n in ("w1", "b1", "a", "w2", "b2") if th[n] is not None]

    def run(*vals: Tensor) -> Tensor:
        p = dict(zip(names, vals, strict=True))
        if conv:
            h = fn(x, p["w1"], p.get("b1"), f1.stride, f1.padding, 1, f1.groups)
        else:
            h = F.linear(x, p["w1"], p.get("b1"))
        if "a" in p:
            h = torch.func.functional_call(act64, {"a": p["a"]}, (h,))
        if conv:
            return fn(h, p["w2"], p.get("b2"), 1, 0, 1, f2.groups)
        return F.linear(h, p["w2"], p.get("b2"))

    with torch.no_grad():
        W = composite(th["w1"], th["w2"], stride, f1.groups if conv else 1)
        bias = run(*[th[n] for n in names]) - (
            fn(x, W, None, f1.stride, f1.padding, 1, f1.groups) if conv else x @ W.T)
    mask = torch.zeros_like(W)
    if conv and kernel > 0:
        lo = (W.shape[-1] - kernel) // 2
        mask[(slice(None), slice(None), *[slice(lo, lo + kernel)] * (W.dim() - 2))] = 1
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
        delta = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
        vals = [th[n].clone().requires_grad_(True) for n in names]
        grads = torch.autograd.grad((run(*vals) * delta).sum(), vals)
        w = W.clone().requires_grad_(True)
        gW = torch.autograd.grad((parent(w) * delta).sum(), w)[0] * mask
        # the parent's bias (F2's bias stands for it) takes the same step as F2's
        gb = grads[names.index("b2")] if "b2" in names else None
        if adaptive:
            _, d_child = torch.func.jvp(run, tuple(th[n] for n in names),
                                        tuple(g.sign() for g in grads))
            _, d_par = torch.func.jvp(parent, (W,), (gW.sign(),))
            if gb is not None:
                d_par = d_par + _bias_map(gb.sign(), d_par, conv)
            ratios.append(float(d_child.norm() / d_par.norm().clamp_min(1e-300)))
        else:
            par = gW.pow(2).sum() + (gb.pow(2).sum() if gb is not None else 0.0)
            ratios.append(float(sum(g.pow(2).sum() for g in grads) / par.clamp_min(1e-300)))
    return sum(ratios) / len(ratios)


def advise(model: nn.Module, block: str, probe: Any, kernel: int) -> dict[str, float] | None:
    """The learning-rate multipliers the stable scheme recommends for the factors of
    ``model``'s block ``block``: ``{"sgd": 1 / a_sgd, "adaptive": 1 / a_adaptive}`` with the
    amplifications measured on ``probe`` (:func:`step_amplification`); ``None`` where the
    model does not run on the probe or never calls the block (a morph's own verification
    runs the same forward next and reports why)."""
    module = model.get_submodule(block)
    try:
        x = block_input(model, module.first, probe)
    except Exception:  # the morph's verification runs this forward next and reports it
        return None
    return {family: 1.0 / max(step_amplification(module, x, kernel, family == "adaptive"),
                              1e-12)
            for family in ("sgd", "adaptive")}
