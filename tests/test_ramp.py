"""Releasing a transferred optimiser's learning-rate multipliers over time
(:mod:`stablemorph.experiment.release`): at the first step a released group steps at the recorded
multiplier, at the horizon at the full rate, linearly in between; the stored rates (what
schedulers and loops see) are untouched; groups without a multiplier are not touched; the
ramp composes with a user's LambdaLR carried by ``transfer_scheduler``; bad values are
refused by name."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from stablemorph.experiment.release import (
    attach_release,
    memory_steps,
    release_factor,
    release_lr_scales,
)
from stablemorph.experiment.stability import ExperimentError, plan_arm
from stablemorph.morphs import deepen
from stablemorph.optim import transfer_optimizer, transfer_scheduler
from stablemorph.zoo import build_model

torch.set_num_threads(1)
LR = 0.1


def grown(optimizer: str = "sgd") -> tuple[nn.Module, nn.Module, torch.optim.Optimizer,
                                           torch.Tensor, torch.Tensor]:
    """A trained MLP parent, its stable deepen child (with recorded multipliers), the
    parent's optimiser (no momentum for SGD: a step is then exactly ``lr * grad``)."""
    torch.manual_seed(0)
    model = build_model("mlp", hidden=[10, 8], in_features=7, num_classes=5)
    x, y = torch.randn(12, 7), torch.randint(0, 5, (12,))
    opt = (torch.optim.SGD(model.parameters(), lr=LR) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=LR))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, deepen(model, "fc2", inputs=x), opt, x, y


def step_lrs(opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             steps: int, scheduler: LambdaLR | None = None) -> list[list[float]]:
    """Per step, every group's rate as the optimiser applies it (a pre-hook registered
    after the release's sees its factor)."""
    seen: list[list[float]] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([g["lr"] for g in o.param_groups]))
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return seen


def test_the_ramp_starts_at_the_recorded_multiplier_and_reaches_one_at_the_horizon() -> None:
    parent, child, opt, x, y = grown()
    new = transfer_optimizer(opt, parent, child)
    scales = [g.get("lr_scale", 1.0) for g in new.param_groups]
    assert any(s < 1.0 for s in scales)  # the stable rule recorded multipliers
    assert release_lr_scales(new, 4) == sum(s != 1.0 for s in scales)
    seen = step_lrs(new, child, x, y, 6)
    for k, lrs in enumerate(seen):
        m = [s + (1.0 - s) * min(k / 4, 1.0) for s in scales]
        torch.testing.assert_close(lrs, [LR * v for v in m])
    assert seen[0] == [LR * s for s in scales] and seen[4] == seen[5] == [LR] * len(scales)
    # the stored rates are the transferred ones; groups without a multiplier have no release
    assert [g["lr"] for g in new.param_groups] == [LR * s for s in scales]
    assert all(("lr_release" in g) == (s != 1.0) for g, s in zip(new.param_groups, scales,
                                                                  strict=True))


def test_a_released_step_moves_the_parameters_by_the_ramped_rate() -> None:
    parent, child, opt, x, y = grown()
    new = transfer_optimizer(opt, parent, child)
    release_lr_scales(new, 2)
    for k in range(3):
        before = [p.detach().clone() for g in new.param_groups for p in g["params"]]
        factors = [release_factor(g) for g in new.param_groups for _ in g["params"]]
        lrs = [g["lr"] for g in new.param_groups for _ in g["params"]]
        new.zero_grad()
        F.cross_entropy(child(x), y).backward()
        grads = [p.grad.clone() for g in new.param_groups for p in g["params"]]
        new.step()
        after = [p.detach() for g in new.param_groups for p in g["params"]]
        for b, a, g, lr, f in zip(before, after, grads, lrs, factors, strict=True):
            torch.testing.assert_close(b - a, lr * f * g)
        assert k < 2 or all(f * g["lr"] == pytest.approx(LR) for g in new.param_groups
                            for f in [release_factor(g)])


def test_the_ramp_composes_with_a_user_lambda_scheduler_and_transfer_scheduler() -> None:
    parent, child, opt, x, y = grown()
    sched = LambdaLR(opt, lambda t: 0.5 ** t)
    new = transfer_optimizer(opt, parent, child)
    new_sched = transfer_scheduler(sched, new)
    scales = [g.get("lr_scale", 1.0) for g in new.param_groups]
    release_lr_scales(new, 3)
    seen = step_lrs(new, child, x, y, 5, new_sched)
    for k, lrs in enumerate(seen):
        want = [LR * 0.5 ** k * (s + (1.0 - s) * min(k / 3, 1.0)) for s in scales]
        torch.testing.assert_close(lrs, want)
    # the scheduler only ever sees (and sets) the transferred rates
    torch.testing.assert_close(new_sched.get_last_lr(), [LR * 0.5 ** 5 * s for s in scales])


def test_the_release_state_survives_copies_and_a_copy_needs_its_hooks_back() -> None:
    parent, child, opt, x, y = grown("adamw")
    new = transfer_optimizer(opt, parent, child)
    assert release_lr_scales(new) > 0
    assert {g["lr_release"]["steps"] for g in new.param_groups if "lr_release" in g} == {1000}
    step_lrs(new, child, x, y, 2)
    model2, opt2 = copy.deepcopy((child, new))
    assert not opt2._optimizer_step_pre_hooks  # PyTorch drops hooks on a copy
    attach_release(opt2)
    attach_release(opt2)  # once only
    assert len(opt2._optimizer_step_pre_hooks) == len(opt2._optimizer_step_post_hooks) == 1
    seen = step_lrs(opt2, model2, x, y, 1)
    assert seen[0] == [g["lr"] * release_factor(g) for g in new.param_groups]
    assert all(g["lr_release"]["step"] == 2 for g in new.param_groups if "lr_release" in g)
    assert all(g["lr_release"]["step"] == 3 for g in opt2.param_groups if "lr_release" in g)
    saved = opt2.state_dict()["param_groups"]
    assert [g.get("lr_release") for g in saved] == [g.get("lr_release")
                                                    for g in opt2.param_groups]


def test_a_step_that_raises_does_not_compound_the_factor() -> None:
    parent, child, opt, x, y = grown()
    new = transfer_optimizer(opt, parent, child)
    release_lr_scales(new, 4)
    stored = [g["lr"] for g in new.param_groups]
    step_lrs(new, child, x, y, 1)
    factors = [release_factor(g) for g in new.param_groups]
    assert any(f != 1.0 for f in factors)

    def failing() -> float:
        raise RuntimeError("closure failed")

    with pytest.raises(RuntimeError, match="closure failed"):
        new.step(failing)
    # the failed step is not counted, and the next one starts from the stored rate
    seen = step_lrs(new, child, x, y, 1)
    assert seen[-1] == [lr * f for lr, f in zip(stored, factors, strict=True)]
    assert [g["lr"] for g in new.param_groups] == stored


def test_a_second_release_starts_where_the_first_one_is() -> None:
    parent, child, opt, x, y = grown()
    new = transfer_optimizer(opt, parent, child)
    release_lr_scales(new, 4)
    step_lrs(new, child, x, y, 2)
    now = [g["lr"] * release_factor(g) for g in new.param_groups]
    release_lr_scales(new, 10)
    torch.testing.assert_close([g["lr"] * release_factor(g) for g in new.param_groups], now)


def test_memory_steps_is_the_optimisers_slowest_average() -> None:
    w = [nn.Parameter(torch.zeros(2))]
    assert memory_steps(torch.optim.AdamW(w, betas=(0.9, 0.999)).param_groups[0]) == 1000
    assert memory_steps(torch.optim.RMSprop(w, alpha=0.99).param_groups[0]) == 100
    assert memory_steps(torch.optim.SGD(w, lr=0.1, momentum=0.9).param_groups[0]) == 10
    assert memory_steps(torch.optim.SGD(w, lr=0.1).param_groups[0]) == 1


def test_bad_values_are_refused_by_name_and_leave_the_optimiser_alone() -> None:
    w = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD([{"params": w[:1]}, {"params": w[1:], "lr_scale": 0.0}], lr=0.1)
    for steps in (0, 1.5, True, "10"):
        with pytest.raises(ValueError, match=r"release_lr_scales: steps must be an integer "
                                             r">= 1 or None, got"):
            release_lr_scales(opt, steps)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"param group 1 has lr_scale 0.0; only positive"):
        release_lr_scales(opt, 5)
    assert all("lr_release" not in g for g in opt.param_groups)
    assert not opt._optimizer_step_pre_hooks
    bad = torch.optim.SGD([{"params": w, "lr_scale": 0.5}], lr=0.1, momentum=0.9)
    bad.param_groups[0]["momentum"] = 1.0
    with pytest.raises(ValueError, match=r"the param group's momentum decay 1.0 is outside"):
        release_lr_scales(bad)


def test_an_arm_takes_one_release() -> None:
    assert "relm" in plan_arm("stable+relm").options
    for arm in ("stable+relm+relw", "stable+relw+relt"):
        with pytest.raises(ExperimentError, match=rf"arm '{re.escape(arm)}': give one release"):
            plan_arm(arm)
