"""The GPT growths' SGD step rule (issue 9; the research log with every number is
``benchmarks/results/gptsgd.md``).

A growth adds parameters whose first SGD step moves the logits on top of the parent's own:
a new block's output projections and biases take gradients even where the block computes
exactly zero, and the width growths' new units, heads and stream channels do too. Measured
at the logits on the probe batch (random output gradients ``delta``, the seeded directions of
:mod:`stablemorph.morphs.first_step`), one SGD step of the whole model moves ``<delta,
logits>`` by ``lr`` times its first-step *energy* ``sum over parameters ||d<delta, logits> /
d param||^2`` (:func:`stablemorph.morphs.new_units.output_energy`). The child's energy over
the parent's is the growth's *amplification* (about 1.2 on the project's GPT, depth x2 or
width x2); every parameter of the child is advised the SGD learning-rate multiplier
``1 / amplification`` (``ParamOrigin.width_advice``, as widen's channel-group rule), so the
child's first step moves the logits as much as the parent's did.

Why the whole model and not only the new parameters: a depth growth leaves the old
parameters' gradients exactly the parent's (the new branch is zero for every input, so is its
Jacobian), so the excess is the new parameters' energy alone and a multiplier on them alone
removes it only at 0 (measured: 0.83 on them removed a sixth of the loss-rise excess, the
whole-model multiplier three quarters); matching each new tensor's energy to its stand-in's
diverged (a new block's cancelling fan-in has 1e-5..1e-2 of its stand-in's energy).

Along a chain of growths, with the optimiser transferred after each one (as the experiment
does), every parameter's rate is the product of the steps' ``E_before / E_child``, which
telescopes to the first parent's energy over the final child's. A single transfer over the
whole chain gives the same to the first parent's parameters (``record.compose_origins``
multiplies ``width_advice``), but a parameter created by a later growth only the figures of
the growths from its own on (``compose_origins`` keeps a fresh parameter's own step-rule
fields): transfer after each growth, or grow with :func:`stablemorph.transformer.grow`
(``sm.grow``), which carries the earlier steps' multipliers into the parameters a later step
creates, so one transfer after it gives every parameter the chain's. ``transfer_optimizer``
applies the multiplier under non-adaptive optimisers only (Adam normalises each entry's step;
``adaptive_new`` handles the new entries there).
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from stablemorph.morphs.contract import Surgery
from stablemorph.morphs.new_units import output_energy
from stablemorph.record import ParamOrigin


def amplification(parent: nn.Module, child: nn.Module, probe: tuple[Tensor, ...]
                  ) -> float | None:
    """The child's first SGD step energy at its output over the parent's, both summed over
    every trainable parameter (module docstring; ``None`` where the parent's is zero: nothing
    trains); neither model is changed."""
    e_parent = sum(output_energy(parent, probe).values())
    if e_parent <= 0:
        return None
    return sum(output_energy(child, probe).values()) / e_parent


def with_growth_advice(parent: nn.Module, child: nn.Module, probe: tuple[Tensor, ...],
                       done: Surgery) -> Surgery:
    """``done`` with every child parameter's origin carrying ``width_advice = 1 /
    amplification`` (unchanged parameters get an identity origin; ``changed`` keeps the
    surgery's list, so zeros are counted over the same parameters) and a note; ``done``
    with a note only where nothing was measured (no trainable parameter, or a probe the
    models cannot run: the verification that follows reports why)."""
    try:
        amp = amplification(parent, child, probe)
    except Exception as err:  # the verification runs the same forward next and reports it
        amp, why = None, f"{type(err).__name__}: {err}"
    else:
        why = "no trainable parameter moves the parent's output"
    if amp is None:
        return dataclasses.replace(done, notes=[*done.notes, f"step rule: not measured ({why})"])
    advice = 1.0 / max(amp, 1e-12)
    parent_params = dict(parent.named_parameters())
    origins: dict[str, ParamOrigin] = {}
    for name, p in child.named_parameters():
        origin = done.origins.get(name)
        if origin is None:
            if name not in parent_params or parent_params[name].shape != p.shape:
                raise RuntimeError(f"internal: child parameter {name!r} has no origin")
            origin = ParamOrigin(source=name)
        origins[name] = dataclasses.replace(origin, width_advice=advice)
    changed = list(done.origins) if done.changed is None else done.changed
    note = (f"step rule: first SGD step {amp:.3g}x the parent's at the logits; SGD lr "
            f"multiplier {advice:.3g} on every parameter")
    return dataclasses.replace(done, origins=origins, changed=changed,
                               notes=[*done.notes, note])
