"""Research options of the stability experiment (issue 9) that are not the library's rule:
each re-gauges the factor pairs of a deepen / insert_subnet, or sets learning-rate
multipliers, after the morph (the research log with every number is in
``benchmarks/results/stability_research.md``).

The adopted rule lives in the library: the stable scheme's morphs re-factor pointwise pairs
with an orthogonal second factor (:func:`stablemorph.morphs.factor.orthogonalise_`) and
record the first-step multipliers measured on the probe
(:func:`stablemorph.morphs.first_step.advise`) and the factorisation, which
:func:`stablemorph.optim.transfer_optimizer` applies (:mod:`stablemorph.step_rule`).

Kept here for the record: :func:`amplification` (on i.i.d. random kernel gradients rather
than the data; option ``lr``, and ``benchmarks/step_amplification.py``), :func:`lr_scales`
with :func:`with_lr_scales` (multipliers set after the morph: options ``lr``, ``slope``,
``freeze``), :func:`regauge_` (minimum average amplification), :func:`isometric_gauge_`,
:func:`shrink_first_bias_`, :func:`scale_new_fan_out_` (widen).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stablemorph.equation import composite
from stablemorph.morphs.first_step import block_input, step_amplification
from stablemorph.morphs.new_units import output_energy
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
    (:func:`~stablemorph.morphs.first_step.step_amplification`), else on random gradients
    (:func:`amplification`)."""
    scales: dict[str, float] = {}
    modules = dict(model.named_modules())
    for pair in factor_pairs(model):
        if probe is not None:
            x = block_input(model, modules[pair.first], probe)
            amp = step_amplification(modules[pair.target], x, pair.kernel,
                                     optimizer in ADAPTIVE, seed=seed, slopes=slopes)
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


def scale_new_units_(model: nn.Module, factor: float) -> None:
    """Scale every entry of every widen's *fresh* units by ``factor``: their incoming rows and
    biases, their norms' weight and bias (so that a BatchNorm'd unit's output scales too) and
    their outgoing columns (origin index negative; the ``(V, V) / (Z, -Z)`` pairs still
    cancel, so the function is unchanged). Running statistics and activation slopes are
    left as they are."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    scalable = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm,
                nn.GroupNorm)
    for rec in history(model):
        if rec.op != "widen":
            continue
        for name, origin in rec.report.param_map.items():
            owner = modules.get(name.rpartition(".")[0])
            if origin.index is None or name not in params or not isinstance(owner, scalable):
                continue
            p = params[name]
            shape = [1] * p.dim()
            shape[origin.dim] = -1
            new = (origin.index < 0).to(p.device).view(shape)
            with torch.no_grad():
                p.copy_(torch.where(new, p * factor, p))


def growth_lr_scales(parent: nn.Module, child: nn.Module, probe: Tensor,
                     names: list[str] | None = None) -> dict[str, float]:
    """SGD multipliers ``1 / amplification`` of a growth's first step at the model's output
    (options ``glr``: every parameter of ``child``, ``nlr``: only ``names``, the growth's new
    and changed parameters): amplification = the child's first-step energy over all its
    parameters over the parent's (:func:`stablemorph.transformer.sgd_rule.amplification`,
    the library's rule (g))."""
    from stablemorph.transformer.sgd_rule import amplification

    amp = amplification(parent, child, (probe,)) or 1.0
    chosen = [n for n, _ in child.named_parameters()] if names is None else names
    return {n: 1.0 / amp for n in chosen}


def tensor_lr_scales(parent: nn.Module, child: nn.Module, probe: Tensor) -> dict[str, float]:
    """SGD multipliers matching each new or changed tensor's first-step energy at the
    model's output to its source's (or stand-in's) in the parent (option ``tlr``)."""
    from stablemorph.optim import morphs_param_map

    e_child, e_parent = output_energy(child, probe), output_energy(parent, probe)
    out = {}
    for n, o in morphs_param_map(parent, child).items():
        ref = o.source if o.source is not None else o.stand_in
        if (o.source is None or o.index is not None) and ref in e_parent and e_child[n] > 0:
            out[n] = e_parent[ref] / e_child[n]
    return out
