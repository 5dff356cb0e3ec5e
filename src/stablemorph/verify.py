"""Check that a child computes the same function as its parent, on a probe batch, in eval
mode and in train mode (BatchNorm on batch statistics), without side effects on either.

Deviation measures, over every output tensor (tuples, lists and dicts are walked):

- ``max_abs``: the largest ``|child - parent|`` element;
- ``max_rel``: per output tensor, ``max |child - parent| / max |parent|``, the worst over
  tensors; relative to the output's scale rather than element-wise, so outputs that happen
  to be near zero do not blow it up.

Both models are restored afterwards: module train/eval flags and every buffer (BatchNorm
running statistics and batch counters) are exactly as before the call. In train mode,
``nn.Dropout`` modules are kept in eval mode and the global RNG is re-seeded identically
before each forward, so stochastic layers do not count as deviation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

MODES = ("eval", "train")

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def default_tolerance(dtype: torch.dtype) -> float:
    """The largest ``max_rel`` a morph accepts for a model of this dtype."""
    if dtype == torch.float64:
        return 1e-10
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2
    return 1e-5


@dataclass
class VerifyReport:
    """Deviation of ``child`` from ``parent``; ``per_mode`` maps ``"eval"``/``"train"`` to
    ``(max_abs, max_rel)``."""

    max_abs: float
    max_rel: float
    per_mode: dict[str, tuple[float, float]] = field(default_factory=dict)

    def ok(self, tol: float) -> bool:
        """True when ``max_rel <= tol`` (a NaN deviation is never ok)."""
        return self.max_rel <= tol


def _tensors(out: object) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for key in sorted(out, key=str) for t in _tensors(out[key])]
    if isinstance(out, list | tuple):
        return [t for item in out for t in _tensors(item)]
    return []


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s module modes and buffers (BN running statistics) on exit."""
    modes = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in modes.items():
            m.train(training)


def _set_mode(model: nn.Module, mode: str) -> None:
    model.train(mode == "train")
    if mode == "train":
        for m in model.modules():
            if isinstance(m, _DROPOUT):
                m.eval()


def _run(model: nn.Module, inputs: Sequence[Tensor], mode: str, seed: int) -> list[Tensor]:
    _set_mode(model, mode)
    cuda = sorted({t.device.index or 0 for t in inputs if t.is_cuda})
    with torch.random.fork_rng(devices=cuda):  # the caller's RNG streams are left as they were
        torch.manual_seed(seed)
        return _tensors(model(*inputs))


@torch.no_grad()
def verify(
    parent: nn.Module,
    child: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    modes: Sequence[str] = MODES,
) -> VerifyReport:
    """Run ``parent`` and ``child`` on ``inputs`` in each of ``modes`` and measure how far the
    child's outputs are from the parent's.

    Args:
        parent, child: the models; left exactly as they were (modes and buffers).
        inputs: one tensor or a sequence of positional inputs; a train-mode check with
            BatchNorm needs a batch of at least 2.
        modes: any of ``"eval"`` and ``"train"``.

    Raises:
        ValueError: the outputs differ in number or shape (the message gives both).
    """
    inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    per_mode: dict[str, tuple[float, float]] = {}
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
        with preserved_state(parent), preserved_state(child):
            want = _run(parent, inputs, mode, seed=0)
            got = _run(child, inputs, mode, seed=0)
        if len(want) != len(got):
            raise ValueError(f"parent returns {len(want)} tensors, child returns {len(got)}")
        worst_abs = worst_rel = 0.0
        for k, (w, g) in enumerate(zip(want, got, strict=True)):
            if w.shape != g.shape:
                raise ValueError(
                    f"output {k}: parent shape {tuple(w.shape)} != child shape {tuple(g.shape)}"
                )
            if w.numel() == 0:
                continue
            diff = (g.double() - w.double()).abs().max().item()
            scale = w.double().abs().max().item()
            rel = diff / scale if scale > 0 else diff
            if diff != diff:  # NaN anywhere: report it, never hide it behind max()
                worst_abs = worst_rel = float("nan")
                break
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
        per_mode[mode] = (worst_abs, worst_rel)
    values = list(per_mode.values())
    return VerifyReport(
        max_abs=max((v[0] for v in values), default=0.0, key=_nan_first),
        max_rel=max((v[1] for v in values), default=0.0, key=_nan_first),
        per_mode=per_mode,
    )


def _nan_first(x: float) -> float:
    return float("inf") if x != x else x
