"""A factor pair's first-step amplifications by autograd and ``torch.func.jvp``: the general
path of :func:`stablemorph.morphs.first_step.step_amplifications`, used where the
activation's slopes count as block parameters (a research option) and as the reference the
explicit path (:mod:`.step_grads`) is tested against. Several times slower: a backward pass
per output gradient and a forward-mode product that re-runs the block."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablemorph.equation import composite
from stablemorph.morphs.step_grads import output_gradients


def _bias_map(b: Tensor, like: Tensor, conv: bool) -> Tensor:
    """A per-channel bias step as the output change it makes (channels on dim 1 for a conv,
    last for a Linear)."""
    if not conv:
        return b.expand_as(like)
    return b.reshape(1, -1, *([1] * (like.dim() - 2))).expand_as(like)


def autograd_amplifications(block: nn.Module, x: Tensor, kernel: int, samples: int,
                            seed: int, slopes: bool) -> dict[str, float]:
    """:func:`~stablemorph.morphs.first_step.step_amplifications` by autograd, in float32;
    ``slopes``: the activation's slope ``a`` is a block parameter too (else the activation
    is left out, as at ``a = 1``)."""
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
    # is a conv with that kernel and the padding less the offset
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

    ratios: dict[str, list[float]] = {"sgd": [], "adaptive": []}
    # one forward each, one backward per random output gradient
    vals = [th[n].clone().requires_grad_(True) for n in names]
    w = W.clone().requires_grad_(True)
    out_child, out_parent = run(*vals), parent(w)
    for delta in output_gradients(out.shape, samples, seed, out.device, dt):
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
