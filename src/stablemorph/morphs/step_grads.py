"""A factor pair's first-step amplifications by explicit convolutions (no autograd graph, no
``torch.func``): the fast path of :func:`stablemorph.morphs.first_step.step_amplifications`.

At morph time the block ``F1 -> act -> F2`` is measured with the activation left out (the
identity at ``a = 1``), so it is ``out = conv2(h; w2, b2)`` with ``h = conv1(x; w1, b1)``:
bilinear in ``(w1, w2)``. For an output gradient ``delta`` (the shape of ``out``):

- ``w2``, ``b2``: conv2's weight and bias gradients at input ``h``;
- ``grad h``: conv2's input gradient; ``w1``, ``b1``: conv1's weight and bias gradients at ``x``
  for ``grad h``;
- the output change of a step ``(d1, db1, d2, db2)`` (the Jacobian-vector product, exact for a
  bilinear map): ``conv2(conv1(x; d1, db1); w2) + conv2(h; d2, db2)``;
- the parent layer is linear in its kernel: its gradient is a weight gradient at ``x`` and its
  output change a convolution of ``x``.

A Linear pair is the same with matrix products (its leading dims, batch and tokens, flattened
into rows). These are the kernels autograd and ``torch.func.jvp`` call for the same products,
so the figures equal :mod:`.first_step_autograd`'s to float32 rounding (about 1e-7 relative).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablemorph.equation import composite_size

#: output gradients of at most this many elements (all samples) are kept for the next
#: measurement of the same shape (the layers of one stage share it: drawing them in float64
#: was a fifth of a small layer's measurement)
CACHED_ELEMENTS = 1 << 22


def output_gradients(shape: torch.Size, samples: int, seed: int, device: torch.device,
                     dtype: torch.dtype) -> tuple[Tensor, ...]:
    """``samples`` standard normal output gradients of ``shape``, drawn in float64 on the CPU
    from ``seed`` (the same numbers on every device and dtype), then moved to ``device``.
    Read-only: small ones are shared between calls."""
    if samples * shape.numel() <= CACHED_ELEMENTS:
        return _cached_gradients(tuple(shape), samples, seed, torch.device(device), dtype)
    return _draw(shape, samples, seed, device, dtype)


def _draw(shape: Sequence[int], samples: int, seed: int, device: torch.device,
          dtype: torch.dtype) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
                 for _ in range(samples))


_cached_gradients = functools.lru_cache(maxsize=4)(_draw)


@dataclass
class FactorPair:
    """A factor pair as two convolutions (``nd`` spatial dims): ``conv1`` with ``stride``,
    ``padding`` and ``groups``; ``conv2`` with stride 1, no padding and the same groups; or
    (``nd == 0``: 2-D weights) as two Linear layers on rows ``(M, C)``."""

    w1: Tensor
    b1: Tensor | None
    w2: Tensor
    b2: Tensor | None
    stride: int
    padding: list[int]
    groups: int

    @property
    def nd(self) -> int:
        return self.w1.dim() - 2

    def geometry(self, first: bool, padding: list[int] | None = None
                 ) -> tuple[list[int], list[int], list[int], bool, list[int], int]:
        """aten's convolution arguments after the weight and bias (stride, padding, dilation,
        transposed, output padding, groups) for ``conv1`` (``first``; ``padding`` overrides
        its padding) or ``conv2``."""
        nd = self.nd
        stride, pad = ([self.stride] * nd, self.padding if padding is None else padding) \
            if first else ([1] * nd, [0] * nd)
        return stride, pad, [1] * nd, False, [0] * nd, self.groups

    def conv(self, x: Tensor, w: Tensor, b: Tensor | None, first: bool,
             padding: list[int] | None = None) -> Tensor:
        """``x`` through a conv with weight ``w`` and bias ``b`` in :meth:`geometry` (a Linear
        layer where ``nd == 0``)."""
        if self.nd == 0:
            return F.linear(x, w, b)
        return torch.ops.aten.convolution(x, w, b, *self.geometry(first, padding))

    def grads(self, delta: Tensor, x: Tensor, w: Tensor, bias: bool, first: bool,
              padding: list[int] | None = None, inputs: bool = False
              ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(grad x, grad w, grad b)`` of ``<delta, conv(x, w, b)>`` in :meth:`geometry`;
        ``grad x`` only with ``inputs``, ``grad b`` only with ``bias`` (else ``None``)."""
        if self.nd == 0:
            return (delta @ w if inputs else None, delta.T @ x,
                    delta.sum(0) if bias else None)
        return torch.ops.aten.convolution_backward(
            delta, x, w, [w.shape[0]] if bias else None, *self.geometry(first, padding),
            [inputs, True, bias])


def as_pair(block: nn.Module, x: Tensor, dtype: torch.dtype) -> tuple[FactorPair, Tensor]:
    """``block``'s factors (``first``, ``second``: both Linear or both Conv1d/2d) as a
    :class:`FactorPair` in ``dtype``, and ``x`` batched for it: a Linear's ``(..., C_in)`` as
    rows ``(M, C_in)``, an unbatched conv input with a batch of one."""
    f1, f2 = block.first, block.second

    def value(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to(dtype)

    w1, w2 = value(f1.weight), value(f2.weight)
    x = x.detach().to(dtype)
    if isinstance(f1, nn.Linear):
        return FactorPair(w1, value(f1.bias), w2, value(f2.bias), 1, [], 1), \
            x.reshape(-1, w1.shape[1])
    if x.dim() == w1.dim() - 1:
        x = x[None]
    return FactorPair(w1, value(f1.bias), w2, value(f2.bias), int(f1.stride[0]),
                      list(f1.padding), int(f1.groups)), x


def parent_geometry(pair: FactorPair, kernel: int) -> tuple[list[int], list[int], Tensor | None]:
    """The parent layer the pair replaces, as ``(kernel shape, padding, mask)``: its kernel's
    centred ``kernel``-wide support of the composite (0 or -1: the whole composite), with the
    padding that gives the same output; where that would need negative padding, the whole
    composite and a 0/1 ``mask`` of the support (``None`` otherwise)."""
    kc = composite_size(pair.w1.shape[-1], pair.w2.shape[-1], pair.stride) if pair.nd else 1
    shape = [pair.w2.shape[0], pair.w1.shape[1], *[kc] * pair.nd]
    if not 0 < kernel < kc:
        return shape, pair.padding, None
    lo = (kc - kernel) // 2
    if all(p >= lo for p in pair.padding):
        return [*shape[:2], *[kernel] * pair.nd], [p - lo for p in pair.padding], None
    mask = pair.w1.new_zeros(shape)
    mask[(slice(None), slice(None), *[slice(lo, lo + kernel)] * pair.nd)] = 1
    return shape, pair.padding, mask


def explicit_amplifications(block: nn.Module, x: Tensor, kernel: int, samples: int, seed: int
                            ) -> dict[str, float]:
    """:func:`~stablemorph.morphs.first_step.step_amplifications` without the activation's
    slopes, in float32: the mean over ``samples`` output gradients (from ``seed``) of the SGD
    and the adaptive amplification."""
    pair, x = as_pair(block, x, torch.float32)
    shape, padding, mask = parent_geometry(pair, kernel)
    parent_w = x.new_empty(shape)
    with torch.no_grad():
        h = pair.conv(x, pair.w1, pair.b1, True)
        k2 = pair.w2.shape[-1]
        out_shape = torch.Size([h.shape[0], pair.w2.shape[0], *[n - k2 + 1 for n in h.shape[2:]]])
        deltas = output_gradients(out_shape, samples, seed, x.device, torch.float32)
        ratios = [_ratios(pair, x, h, delta, parent_w, padding, mask) for delta in deltas]
    return {family: sum(r[k] for r in ratios) / len(ratios)
            for k, family in enumerate(("sgd", "adaptive"))}


def _ratios(pair: FactorPair, x: Tensor, h: Tensor, delta: Tensor, parent_w: Tensor,
            padding: list[int], mask: Tensor | None) -> tuple[float, float]:
    """(SGD, adaptive) amplification of the pair for one output gradient ``delta``
    (:mod:`.first_step`'s definitions)."""
    gh, gw2, gb2 = pair.grads(delta, h, pair.w2, pair.b2 is not None, False, inputs=True)
    _, gw1, gb1 = pair.grads(gh, x, pair.w1, pair.b1 is not None, True)
    _, gW, _ = pair.grads(delta, x, parent_w, False, True, padding)
    if mask is not None:
        gW = gW * mask
    grads = [g for g in (gw1, gb1, gw2, gb2) if g is not None]
    # pow().sum(): a pairwise float32 sum (5e-8 relative at 512 channels; a single-pass
    # vector_norm was off by 1e-4 there)
    par = gW.pow(2).sum() + (gb2.pow(2).sum() if gb2 is not None else 0.0)
    sgd = float(sum(g.pow(2).sum() for g in grads) / par.clamp_min(1e-30))
    sb2 = None if gb2 is None else gb2.sign()
    d_child = pair.conv(pair.conv(x, gw1.sign(), None if gb1 is None else gb1.sign(), True),
                        pair.w2, None, False) + pair.conv(h, gw2.sign(), sb2, False)
    d_par = pair.conv(x, gW.sign(), sb2, True, padding)
    return sgd, float(d_child.norm() / d_par.norm().clamp_min(1e-30))

