"""Release the learning-rate multipliers of a transferred optimiser over time (issue 9).

:func:`~stablemorph.optim.transfer_optimizer` puts the parameters whose origin carries a
learning-rate multiplier (the stable scheme's step rule: ``lr_advice``, ``adaptive_new``,
``width_advice``) into extra param groups whose ``lr`` is the original rate times the
multiplier ``c``, with ``group["lr_scale"] = c``. The multiplier keeps the child's first steps
at the parent's size; kept for the whole run it also slows the new parameters for the whole
run. :func:`release_lr_scales` ramps it back to 1:

    during the ``k``-th optimiser step after the call (``k = 0, 1, ...``) a group with
    multiplier ``c`` steps at ``lr * m(k) / c``, ``m(k) = a + (1 - a) * min(k / H, 1)``,

``a`` its multiplier at the call (``c``, or where a release was already under way, the
multiplier that one applies now), ``H`` the horizon in steps. ``lr`` is whatever the group's
rate is at that step (set by a scheduler, a :func:`~stablemorph.optim.transfer_scheduler`
copy, or a loop that sets ``rate * group["lr_scale"]``): the ramp is applied by optimiser
step hooks for the duration of ``optimizer.step()`` only, and the stored ``lr`` is restored
exactly afterwards, so it composes with any scheduler and schedulers never see it. Groups with
``lr_scale == 1`` (no multiplier) are not touched.

The release's state is one dict per released group, ``group["lr_release"]`` (``scale``: the
group's ``lr_scale`` at the call, ``start``: ``a``, ``steps``: ``H``, ``step``: ``k``), so it
is saved with ``optimizer.state_dict()`` and survives ``copy.deepcopy`` and pickling; PyTorch
drops optimiser hooks on those, so a copy needs :func:`attach_release` once before it steps.

The default horizon, :func:`memory_steps`, is the optimiser's own memory ``1 / (1 - beta)``
of its slowest running average: Adam's ``beta2`` (1000 steps at 0.999), RMSprop's ``alpha``,
SGD's ``momentum`` (10 steps at 0.9), 1 step without one.

Not part of the stable scheme's default (measured, ``benchmarks/results/ramp.md``): the
multipliers are not a transient. The factor pairs' first-step amplification they compensate
is structural (re-measured after 200 training steps it is within 4% of its value at the
morph), and under SGD any ramp that reaches 1 brings back a drop at the step it reaches 1,
deeper than the published baselines' (digits CNN deepen, raised rate: worst accuracy 0.14-0.16
below the parent vs 0.04 for NetMorph), for +0.2-0.5 points of final accuracy there and less
final accuracy on the MLPs. It stays available for training runs that want the full rate.
"""

from __future__ import annotations

from typing import Any

import torch

_KEY = "lr_release"


def memory_steps(group: dict[str, Any]) -> int:
    """``round(1 / (1 - beta))`` for the slowest running average of a param group's
    optimiser (``betas[1]``, else ``alpha``, else ``momentum``; 1 without any). ValueError
    naming the key for a decay outside ``[0, 1)``."""
    for key, beta in (("betas", (group.get("betas") or (None, None))[1]),
                      ("alpha", group.get("alpha")), ("momentum", group.get("momentum"))):
        if beta is None:
            continue
        beta = float(beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"release_lr_scales: the param group's {key} decay {beta} is "
                             f"outside [0, 1); give steps explicitly")
        return max(1, round(1.0 / (1.0 - beta)))
    return 1


def release_lr_scales(optimizer: torch.optim.Optimizer, steps: int | None = None) -> int:
    """Ramp every param group's learning-rate multiplier (``group["lr_scale"] != 1``) back
    to 1 over ``steps`` optimiser steps from now (module docstring), in place.

    Args:
        optimizer: typically the result of :func:`~stablemorph.optim.transfer_optimizer`;
            groups without ``"lr_scale"`` (or with 1) are left as they are.
        steps: the horizon ``H >= 1``; ``None``: each group's :func:`memory_steps`.

    Returns:
        The number of groups released.

    Raises:
        ValueError: ``steps`` not an integer >= 1, or a group's ``lr_scale`` not positive
            (naming the group); nothing is changed then.
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ValueError(f"release_lr_scales: steps must be an integer >= 1 or None, got "
                         f"{steps!r}")
    plans = []
    for gi, group in enumerate(optimizer.param_groups):
        scale = float(group.get("lr_scale", 1.0))
        if scale == 1.0 and _KEY not in group:
            continue
        if not scale > 0.0:
            raise ValueError(f"release_lr_scales: param group {gi} has lr_scale {scale}; "
                             f"only positive multipliers can be released")
        horizon = memory_steps(group) if steps is None else steps
        plans.append((group, {"scale": scale, "start": _current(group), "steps": horizon,
                              "step": 0}))
    for group, plan in plans:
        group[_KEY] = plan
    attach_release(optimizer)
    return len(plans)


def attach_release(optimizer: torch.optim.Optimizer) -> None:
    """Register the release's step hooks on ``optimizer`` (once; a no-op when they are
    there). Needed after ``copy.deepcopy``, pickling or ``load_state_dict`` into a new
    optimiser, which keep the groups' release state but not PyTorch's hooks."""
    if not any(_KEY in g for g in optimizer.param_groups) or any(
            h is _before_step for h in optimizer._optimizer_step_pre_hooks.values()):
        return
    optimizer.register_step_pre_hook(_before_step)
    optimizer.register_step_post_hook(_after_step)


def release_factor(group: dict[str, Any]) -> float:
    """The factor the release applies to ``group``'s stored rate at its next step:
    ``m(k) / scale`` (1 for a group without a release)."""
    plan = group.get(_KEY)
    return 1.0 if plan is None else _multiplier(plan) / plan["scale"]


def _multiplier(plan: dict[str, Any]) -> float:
    a = plan["start"]
    return a + (1.0 - a) * min(plan["step"] / plan["steps"], 1.0)


def _current(group: dict[str, Any]) -> float:
    """The multiplier ``group`` steps with now (its ``lr_scale`` times a release's factor)."""
    return float(group.get("lr_scale", 1.0)) * release_factor(group)


def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        plan = group.get(_KEY)
        if plan is not None:
            # a step that raised left its scaled rate behind: start from the stored one
            plan["lr"] = plan.pop("lr", group["lr"])
            group["lr"] = plan["lr"] * release_factor(group)


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        plan = group.get(_KEY)
        if plan is not None and "lr" in plan:
            group["lr"] = plan.pop("lr")  # exactly the stored rate (schedulers read it)
            plan["step"] += 1
