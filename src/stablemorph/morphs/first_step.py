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

Two implementations of the same figures: explicit convolutions (:mod:`.step_grads`, the
default: the block at ``a = 1`` is bilinear in its factors) and autograd with
``torch.func.jvp`` (:mod:`.first_step_autograd`, for ``slopes=True``); they agree to float32
rounding (``tests/test_first_step.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from stablemorph.morphs.first_step_autograd import autograd_amplifications
from stablemorph.morphs.step_grads import explicit_amplifications
from stablemorph.verify import capture_inputs, preserved_state

#: random output gradients averaged per measurement, and their seed (a measurement, not a
#: choice: the same directions for every morph)
SAMPLES = 4
SEED = 0


def block_input(model: nn.Module, first: nn.Module, probe: Any) -> Tensor:
    """The input the module ``first`` (of ``model``) receives on ``probe`` (a tensor, or a
    :class:`~stablemorph.verify.Probe`), in eval mode, at its first call (a copy: later
    in-place writes of the forward do not reach it); modes, buffers and RNG untouched. One
    whole forward of ``model``: a morph takes it from its own verification instead
    (:func:`stablemorph.verify.capture_inputs`)."""
    with capture_inputs({"first": first}) as seen:
        with preserved_state(model), torch.no_grad(), torch.random.fork_rng():
            model.eval()
            run = getattr(probe, "run", None)
            run(model) if run is not None else model(probe)
    if "first" not in seen:
        raise ValueError(f"the block's first layer {type(first).__name__} is never called on "
                         f"the probe batch")
    return seen["first"]


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
    counts as a block parameter too (a research option; autograd). Computed in float32: a
    ratio of norms, for which float32's rounding (about 1e-7 relative) is far below what a
    learning rate can resolve."""
    if slopes:
        return autograd_amplifications(block, x, kernel, samples, seed, slopes=True)
    return explicit_amplifications(block, x, kernel, samples, seed)


def multipliers(block: nn.Module, x: Tensor, kernel: int) -> dict[str, float]:
    """The learning-rate multipliers for ``block``'s factors on its input ``x``:
    ``{"sgd": 1 / a_sgd, "adaptive": 1 / a_adaptive}`` (:func:`step_amplifications`)."""
    return {family: 1.0 / max(amp, 1e-12)
            for family, amp in step_amplifications(block, x, kernel).items()}


def advise(model: nn.Module, block: str, probe: Any, kernel: int) -> dict[str, float] | None:
    """The learning-rate multipliers the stable scheme recommends for the factors of
    ``model``'s block ``block`` (:func:`multipliers`) with the amplifications measured on
    ``probe``; ``None`` where the model does not run on the probe or never calls the block (a
    morph's own verification runs the same forward next and reports why). One forward of
    ``model`` to capture the block's input (:func:`block_input`)."""
    module = model.get_submodule(block)
    try:
        x = block_input(model, module.first, probe)
    except Exception:  # the morph's verification runs this forward next and reports it
        return None
    return multipliers(module, x, kernel)
