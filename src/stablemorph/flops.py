"""Compute accounting: FLOPs of a training step, counted by PyTorch itself.

:func:`step_flops` runs one forward and backward pass under
:class:`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention: the
operations that dominate; element-wise work is not counted, as in the growth literature's
"6 N tokens"). :class:`FlopMeter` caches the count per architecture so that a training loop
can add it every step for free and stay correct across growths.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, Sequence) else ()
    for value in values:
        if isinstance(value, Tensor) and value.is_floating_point():
            return value
    raise TypeError(f"cannot find an output tensor in a {type(out).__name__}")


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def step_flops(model: nn.Module, inputs: Any,
               loss_fn: Callable[[Any], Tensor] | None = None) -> int:
    """FLOPs of one training step (forward + backward) of ``model`` on ``inputs`` (a tensor,
    a tuple of positional inputs or a dict of keyword inputs).

    ``loss_fn(output) -> scalar`` defaults to the sum of the first floating output tensor
    (the backward's FLOPs do not depend on the loss). Runs in eval mode (no BatchNorm
    statistics updated); the model's mode and its parameters' ``.grad`` are restored.
    """
    grads = {p: p.grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            out = _call(model, inputs)
            loss = loss_fn(out) if loss_fn is not None else _first_tensor(out).sum()
            if loss.requires_grad:
                loss.backward()
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)
        for p, g in grads.items():
            p.grad = g


def _signature(model: nn.Module, inputs: Any) -> tuple:
    shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    if isinstance(inputs, Mapping):
        inputs = tuple(inputs.values())
    if not isinstance(inputs, tuple | list):
        inputs = (inputs,)
    return shapes, tuple(tuple(x.shape) if isinstance(x, Tensor) else x for x in inputs)


class FlopMeter:
    """Running FLOPs total of a training run: ``meter.add(model, batch)`` once per step.

    The per-step count is measured with :func:`step_flops` the first time an architecture and
    batch shape is seen (a grown model is a new architecture) and reused afterwards.
    """

    def __init__(self, loss_fn: Callable[[Any], Tensor] | None = None):
        self.loss_fn = loss_fn
        self.total = 0
        self._cache: dict[tuple, int] = {}

    def per_step(self, model: nn.Module, inputs: Any) -> int:
        key = _signature(model, inputs)
        if key not in self._cache:
            self._cache[key] = step_flops(model, inputs, self.loss_fn)
        return self._cache[key]

    def add(self, model: nn.Module, inputs: Any, steps: int = 1) -> int:
        """Add ``steps`` training steps of ``model`` on batches shaped like ``inputs``; return
        the new total."""
        self.total += steps * self.per_step(model, inputs)
        return self.total
