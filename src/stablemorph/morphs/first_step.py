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
    """The first-step amplification (module docstring) of ``block`` for one optimiser
    family: :func:`step_amplifications`'s ``"adaptive"`` or ``"sgd"`` figure."""
    return step_amplifications(block, x, kernel, samples=samples, seed=seed,
                               slopes=slopes)["adaptive" if adaptive else "sgd"]


def step_amplifications(block: nn.Module, x: Tensor, kernel: int, *, samples: int = SAMPLES,
                        seed: int = SEED, slopes: bool = False) -> dict[str, float]:
    """The first-step amplifications (module docstring) of ``block`` (children ``first``,
    ``act``, ``second``) on its input ``x``: ``{"sgd": ..., "adaptive": ...}``, both from the
    same random output gradients.

    ``kernel``: the parent layer's kernel size, whose centred support the parent's step
    covers (0 or -1: the composite's whole support). ``slopes``: the activation's slope
    counts as a block parameter too (a research option). Computed in float32: a ratio of
    norms, for which float32's rounding (about 1e-7 relative) is far below what a learning
    rate can resolve; float64 convolutions made it most of a morph's time at 512 channels."""
    f1, f2, act = block.first, block.second, block.act
    dt = torch.float32
    x = x.to(dt)
    conv = isinstance(f1, nn.Conv1d | nn.Conv2d)
    fn = (F.conv1d if isinstance(f1, nn.Conv1d) else F.conv2d) if conv else None
    stride = f1.stride[0] if conv else 1
    th = {n: t.detach().to(dt) for n, t in (("w1", f1.weight), ("w2", f2.weight))}
    th["b1"] = f1.bias.detach().to(dt) if f1.bias is not None else None
    th["b2"] = f2.bias.detach().to(dt) if f2.bias is not None else None
    th["a"] = act.a.detach().to(dt) if slopes else None
    act_dt = copy.deepcopy(act).to(dt) if slopes else None
    names = [n for n in ("w1", "b1", "a", "w2", "b2") if th[n] is not None]

    def run(*vals: Tensor) -> Tensor:
        p = dict(zip(names, vals, strict=True))
        if conv:
            h = fn(x, p["w1"], p.get("b1"), f1.stride, f1.padding, 1, f1.groups)
        else:
            h = F.linear(x, p["w1"], p.get("b1"))
        if "a" in p:
            h = torch.func.functional_call(act_dt, {"a": p["a"]}, (h,))
        if conv:
            return fn(h, p["w2"], p.get("b2"), 1, 0, 1, f2.groups)
        return F.linear(h, p["w2"], p.get("b2"))

    with torch.no_grad():
        W = composite(th["w1"], th["w2"], stride, f1.groups if conv else 1)
        out = run(*[th[n] for n in names])
    # The parent's step covers its own kernel's centred support; on it the composite's conv
    # is a conv with that kernel and the padding less the offset (the same output, 25/9 of
    # the work saved for a 3x3 parent of a 5x5 composite)
    padding: Any = f1.padding if conv else 0
    mask: Tensor | None = None
    if conv and 0 < kernel < W.shape[-1]:
        lo = (W.shape[-1] - kernel) // 2
        if all(p >= lo for p in f1.padding):
            W = W[(slice(None), slice(None), *[slice(lo, lo + kernel)] * (W.dim() - 2))]
            padding = tuple(p - lo for p in f1.padding)
        else:  # the crop would need negative padding: a mask on the whole composite
            mask = torch.zeros_like(W)
            mask[(slice(None), slice(None), *[slice(lo, lo + kernel)] * (W.dim() - 2))] = 1

    def parent(w: Tensor) -> Tensor:
        """The parent's output less its bias: linear in ``w``."""
        return fn(x, w, None, f1.stride, padding, 1, f1.groups) if conv else x @ w.T

    gen = torch.Generator().manual_seed(seed)
    ratios: dict[str, list[float]] = {"sgd": [], "adaptive": []}
    # one forward each, one backward per random output gradient
    vals = [th[n].clone().requires_grad_(True) for n in names]
    w = W.clone().requires_grad_(True)
    out_child, out_parent = run(*vals), parent(w)
    for _ in range(samples):
        delta = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, dt)
        grads = torch.autograd.grad(out_child, vals, delta, retain_graph=True)
        gW = torch.autograd.grad(out_parent, w, delta, retain_graph=True)[0]
        if mask is not None:
            gW = gW * mask
        # the parent's bias (F2's bias stands for it) takes the same step as F2's
        gb = grads[names.index("b2")] if "b2" in names else None
        par = gW.pow(2).sum() + (gb.pow(2).sum() if gb is not None else 0.0)
        ratios["sgd"].append(float(sum(g.pow(2).sum() for g in grads) / par.clamp_min(1e-30)))
        _, d_child = torch.func.jvp(run, tuple(th[n] for n in names),
                                    tuple(g.sign() for g in grads))
        with torch.no_grad():
            d_par = parent(gW.sign())  # parent is linear: its jvp is itself
        if gb is not None:
            d_par = d_par + _bias_map(gb.sign(), d_par, conv)
        ratios["adaptive"].append(float(d_child.norm() / d_par.norm().clamp_min(1e-30)))
    return {family: sum(r) / len(r) for family, r in ratios.items()}


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
    return {family: 1.0 / max(amp, 1e-12)
            for family, amp in step_amplifications(module, x, kernel).items()}
