"""The contract every transformer growth keeps, in one place.

A growth (:mod:`~stablemorph.transformer.mlp_width`, :mod:`~.heads`, :mod:`~.stream`,
:mod:`~.depth`) only works out the child's parameter values. This module does the rest:

- :func:`check_parent`: the parent is a :class:`GPT` with finite weights (raise before any
  work, so the caller's model is never touched);
- :class:`ChildParams`: the child's parameters in float64, each with its
  :class:`ParamOrigin` and the parent parameter it stands in for (whose ``requires_grad`` and
  optimiser group it takes);
- :func:`finish_growth`: builds the child on the parent's device, dtype and train/eval mode,
  verifies it against the parent on a probe batch of token ids (raising
  :class:`GrowthVerificationError` beyond the tolerance), measures zero fractions and
  attaches a :class:`MorphRecord`.

Deviation measure: ``max_abs = max |child - parent|`` over all logits of the probe batch and
``max_rel = max_abs / max |parent|`` (relative to the logits' scale, so that logits near zero
do not make the ratio meaningless).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from stablemorph.record import (
    HISTORY_ATTR,
    MorphRecord,
    MorphReport,
    ParamOrigin,
    append_record,
    history,
)
from stablemorph.transformer.model import GPT, GPTConfig

SCHEMES = ("net2net", "netmorph", "stable")
PROBE_BATCH = 4
PROBE_LEN = 16


class GrowthVerificationError(ValueError):
    """A grown model's logits differ from its parent's beyond the tolerance."""


def check_scheme(op: str, scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"{op}: unknown scheme {scheme!r}; choose one of {SCHEMES}")


def check_parent(op: str, model: GPT) -> None:
    """Raise ``TypeError`` for a non-GPT and ``ValueError`` naming the first parameter with
    NaN or infinite values."""
    if not isinstance(model, GPT):
        raise TypeError(f"{op}: expects a stablemorph.transformer.GPT, got {type(model).__name__}")
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"{op}: parameter {name!r} {tuple(p.shape)} has non-finite values")


def check_out_scale(op: str, out_scale: float) -> None:
    if not (isinstance(out_scale, int | float) and 0 < out_scale < float("inf")):
        raise ValueError(f"{op}: out_scale must be a positive finite number, got {out_scale!r}")


def check_blocks(op: str, model: GPT, blocks: list[int] | None) -> list[int]:
    """The block indices to act on (all when ``None``), each checked to exist."""
    n = model.config.n_layer
    if blocks is None:
        return list(range(n))
    for b in blocks:
        if not isinstance(b, int) or not 0 <= b < n:
            raise ValueError(f"{op}: unknown block index {b!r}; the model has blocks 0..{n - 1}")
    return sorted(set(blocks))


def default_tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2


def rms(t: Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0


@dataclass
class ChildParams:
    """The child's parameters under construction, by child parameter name.

    ``values`` are float64 tensors; ``origins`` say how each came from the parent;
    ``analogue`` names the parent parameter each child parameter stands in for; ``new`` names
    parameters of new modules (a copy there counts as new). :meth:`from_parent` starts with
    every parameter unchanged.
    """

    values: dict[str, Tensor]
    origins: dict[str, ParamOrigin]
    analogue: dict[str, str]
    new: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_parent(cls, model: GPT) -> ChildParams:
        named = dict(model.named_parameters())
        return cls(
            values={n: p.detach().to(torch.float64, copy=True) for n, p in named.items()},
            origins={n: ParamOrigin(n) for n in named},
            analogue={n: n for n in named},
        )

    def set(self, name: str, value: Tensor, origin: ParamOrigin, analogue: str) -> None:
        self.values[name] = value
        self.origins[name] = origin
        self.analogue[name] = analogue

    def changed(self) -> list[str]:
        """Names of new parameters and of those whose values differ from their source."""
        return [
            n for n, o in self.origins.items()
            if o.source is None or o.index is not None or n in self.new
        ]


def dup_origin(source: str, dim: int, index: Tensor, scale: Tensor | None = None) -> ParamOrigin:
    return ParamOrigin(source, dim=dim, index=index.long(), scale=scale)


def default_probe(model: GPT) -> Tensor:
    """A fixed batch of random token ids ``(4, min(16, block_size))`` on the model's device."""
    cfg = model.config
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg.vocab_size, (PROBE_BATCH, min(PROBE_LEN, cfg.block_size)),
                        generator=gen)
    return ids.to(model.wte.weight.device)


def _build_child(parent: GPT, config: GPTConfig, params: ChildParams) -> GPT:
    ref = parent.wte.weight
    child = GPT(config).to(device=ref.device, dtype=ref.dtype)
    parent_params = dict(parent.named_parameters())
    child_params = dict(child.named_parameters())
    missing = set(child_params) ^ set(params.values)
    if missing:
        raise RuntimeError(f"internal: child parameters and plan disagree on {sorted(missing)}")
    with torch.no_grad():
        for name, p in child_params.items():
            value = params.values[name]
            if value.shape != p.shape:
                raise RuntimeError(
                    f"internal: {name} planned {tuple(value.shape)}, built {tuple(p.shape)}"
                )
            p.copy_(value.to(p.dtype))
            p.requires_grad_(parent_params[params.analogue[name]].requires_grad)
    child.train(parent.training)
    return child


def measure_deviation(parent: GPT, child: GPT, probe: Tensor) -> tuple[float, float]:
    """``(max_abs, max_rel)`` between the two models' logits on ``probe``."""
    with torch.no_grad():
        ref = parent(probe).double()
        out = child(probe).double()
    max_abs = float((out - ref).abs().max())
    return max_abs, max_abs / max(float(ref.abs().max()), torch.finfo(torch.float64).tiny)


def zero_fractions(params: ChildParams, names: list[str]) -> tuple[float, float]:
    """Fractions of exact zeros and of ``|w| < 1e-3 * rms(tensor)`` over ``names``."""
    total = zeros = near = 0
    for n in names:
        v = params.values[n]
        total += v.numel()
        zeros += int((v == 0).sum())
        near += int((v.abs() < 1e-3 * rms(v)).sum())
    return (zeros / total, near / total) if total else (0.0, 0.0)


def finish_growth(
    *,
    op: str,
    target: str,
    scheme: str,
    kwargs: dict[str, Any],
    parent: GPT,
    config: GPTConfig,
    params: ChildParams,
    probe: Tensor | None,
    tol: float | None,
    started: float,
) -> GPT:
    """Build, verify and record the child. Raises :class:`GrowthVerificationError` when the
    probe logits differ by more than ``tol`` (relative); the parent is never modified."""
    child = _build_child(parent, config, params)
    probe = default_probe(parent) if probe is None else probe
    tol = default_tolerance(parent.wte.weight.dtype) if tol is None else tol
    max_abs, max_rel = measure_deviation(parent, child, probe)
    if not max_rel <= tol:
        raise GrowthVerificationError(
            f"{op}({target!r}, scheme={scheme!r}) is not function-preserving: "
            f"max_rel={max_rel:.3e} > tol={tol:.1e} (max_abs={max_abs:.3e})"
        )
    changed = params.changed()
    zero, near = zero_fractions(params, changed)
    report = MorphReport(
        op=op,
        target=target,
        scheme=scheme,
        max_abs=max_abs,
        max_rel=max_rel,
        zero_fraction=zero,
        near_zero_fraction=near,
        changed=changed,
        param_map=dict(params.origins),
        seconds=time.perf_counter() - started,
        notes=list(params.notes),
    )
    object.__setattr__(child, HISTORY_ATTR, history(parent))
    append_record(child, MorphRecord(op=op, target=target, kwargs=kwargs, report=report))
    return child
