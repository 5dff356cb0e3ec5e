"""Optimiser surgery: state mapped by the param_map (values checked on a hand-built morph),
steps that mathematics says must match the parent's, param groups, schedulers, errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR, SequentialLR, StepLR

from stablemorph.morphs import deepen, widen
from stablemorph.optim import (
    RULE,
    STATE_KINDS,
    TransferRule,
    transfer_optimizer,
    transfer_scheduler,
)
from stablemorph.record import MorphRecord, MorphReport, ParamOrigin, append_record
from stablemorph.zoo import build_model

torch.set_num_threads(1)

SCALED = TransferRule(scaled=frozenset(STATE_KINDS), fresh_state="none")
# The deepens here test the published transfer of fresh parameters (step_rule=False); the
# stable scheme's step rule on top of it is tested in test_stable_rule.py.


class Tiny(nn.Module):
    """``fc1 (3 -> 4) -> ReLU -> fc2 (4 -> 2)``."""

    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


# A hand-made widening of fc1 from 4 to 6 units: unit 1 copied (shares 0.25 / 0.75 of its
# outgoing column), one new unit with no parent counterpart.
INDEX = torch.tensor([0, 1, 2, 3, 1, -1])
SHARE = torch.tensor([1.0, 0.25, 1.0, 1.0, 0.75, 0.0], dtype=torch.float64)


def hand_widened(parent: Tiny) -> Tiny:
    child = copy.deepcopy(parent)
    child.fc1 = nn.Linear(3, 6)
    child.fc2 = nn.Linear(6, 2)
    with torch.no_grad():
        rows = parent.fc1.weight[INDEX.clamp(min=0)].clone()
        rows[-1] = torch.randn(3)
        child.fc1.weight.copy_(rows)
        child.fc1.bias.copy_(torch.where(INDEX >= 0, parent.fc1.bias[INDEX.clamp(min=0)], 0.0))
        child.fc2.weight.copy_(parent.fc2.weight[:, INDEX.clamp(min=0)] * SHARE.float())
        child.fc2.bias.copy_(parent.fc2.bias)
    param_map = {
        "fc1.weight": ParamOrigin("fc1.weight", dim=0, index=INDEX),
        "fc1.bias": ParamOrigin("fc1.bias", dim=0, index=INDEX),
        "fc2.weight": ParamOrigin("fc2.weight", dim=1, index=INDEX, scale=SHARE),
        "fc2.bias": ParamOrigin("fc2.bias"),
    }
    report = MorphReport("widen", "fc1", "hand", param_map=param_map, changed=list(param_map)[:3])
    append_record(child, MorphRecord("widen", "fc1", {"width": 6}, report))
    return child


def trained(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3,
            in_features: int = 3, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, in_features, generator=gen)
        y = torch.randint(0, 2, (16,), generator=gen)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def snapshot(optimizer: torch.optim.Optimizer) -> tuple[list[list[int]], dict[int, dict]]:
    groups = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
    state = {id(p): {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()}
             for p, s in optimizer.state.items()}
    return groups, state


def assert_untouched(optimizer: torch.optim.Optimizer, before: tuple) -> None:
    groups, state = snapshot(optimizer)
    assert groups == before[0]
    assert state.keys() == before[1].keys()
    for key, s in state.items():
        for k, v in s.items():
            torch.testing.assert_close(v, before[1][key][k], rtol=0, atol=0)


def test_sgd_momentum_indexed_and_scaled_like_the_weights() -> None:
    torch.manual_seed(0)
    parent = Tiny()
    opt = torch.optim.SGD(parent.parameters(), lr=0.1, momentum=0.9)
    trained(parent, opt)
    before = snapshot(opt)
    child = hand_widened(parent)

    new = transfer_optimizer(opt, parent, child, rule=SCALED)

    assert type(new) is torch.optim.SGD
    assert [p for g in new.param_groups for p in g["params"]] == list(child.parameters())
    buf = {n: opt.state[p]["momentum_buffer"] for n, p in parent.named_parameters()}
    got = {n: new.state[p]["momentum_buffer"] for n, p in child.named_parameters()}
    expect_rows = buf["fc1.weight"][INDEX.clamp(min=0)].clone()
    expect_rows[-1] = 0.0
    torch.testing.assert_close(got["fc1.weight"], expect_rows, rtol=0, atol=0)
    torch.testing.assert_close(got["fc1.bias"], torch.cat([buf["fc1.bias"][[0, 1, 2, 3, 1]],
                                                           torch.zeros(1)]), rtol=0, atol=0)
    expect_cols = buf["fc2.weight"][:, INDEX.clamp(min=0)] * SHARE.float()
    expect_cols[:, -1] = 0.0
    torch.testing.assert_close(got["fc2.weight"], expect_cols, rtol=0, atol=0)
    torch.testing.assert_close(got["fc2.bias"], buf["fc2.bias"], rtol=0, atol=0)
    assert got["fc2.bias"].data_ptr() != buf["fc2.bias"].data_ptr()  # a copy, not shared
    assert_untouched(opt, before)


def test_adam_moments_step_and_new_units() -> None:
    torch.manual_seed(1)
    parent = Tiny()
    opt = torch.optim.Adam(parent.parameters(), lr=1e-2, amsgrad=True)
    trained(parent, opt, steps=4)
    child = hand_widened(parent)

    new = transfer_optimizer(opt, parent, child, rule=SCALED)

    old = opt.state[parent.fc2.weight]
    st = new.state[child.fc2.weight]
    torch.testing.assert_close(st["step"], old["step"], rtol=0, atol=0)
    assert float(st["step"]) == 4.0
    cols = INDEX.clamp(min=0)
    s = SHARE.float()
    torch.testing.assert_close(st["exp_avg"][:, :5], (old["exp_avg"][:, cols] * s)[:, :5])
    torch.testing.assert_close(st["exp_avg_sq"][:, :5], (old["exp_avg_sq"][:, cols] * s**2)[:, :5])
    torch.testing.assert_close(st["max_exp_avg_sq"][:, :5],
                               (old["max_exp_avg_sq"][:, cols] * s**2)[:, :5])
    # the new unit: no first moment, the source's mean second moment (module docstring)
    torch.testing.assert_close(st["exp_avg"][:, 5], torch.zeros(2), rtol=0, atol=0)
    torch.testing.assert_close(st["exp_avg_sq"][:, 5], old["exp_avg_sq"].mean().expand(2))
    # where copies split a unit, Adam's per-entry ratio m / sqrt(v) is the parent's
    ratio = st["exp_avg"] / st["exp_avg_sq"].sqrt()
    torch.testing.assert_close(ratio[:, 4], (old["exp_avg"] / old["exp_avg_sq"].sqrt())[:, 1])


def mlp_parent(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", in_features=8, hidden=[6, 5], num_classes=2)


@pytest.mark.parametrize("scheme", ["net2net", "netmorph", "stable"])
def test_momentum_step_of_widened_child_keeps_the_function(scheme: str) -> None:
    """Under momentum alone (zero gradients), the child's SGD step changes the function
    exactly as the parent's: copies move like their source, shares scale the outgoing
    columns' velocity, new units have none."""
    parent = mlp_parent()
    opt = torch.optim.SGD(parent.parameters(), lr=0.5, momentum=0.9)
    trained(parent, opt, steps=5, in_features=8)
    # the published transfer: without the widen rule's SGD multiplier (tests/test_widen_rule.py)
    child = widen(parent, "fc1", 11, scheme=scheme, input_shape=[8, 8], step_rule=False)
    new = transfer_optimizer(opt, parent, child, rule=SCALED)

    for model, optimizer in ((parent, opt), (child, new)):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()

    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(5))
    moved = (parent(x) - mlp_parent()(x)).abs().max()
    assert moved > 1e-2  # the step did change the parent
    torch.testing.assert_close(child(x), parent(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("morph", ["widen", "deepen"])
def test_untouched_layer_takes_the_parents_step(optimizer: str, morph: str) -> None:
    """``head`` is not touched by morphing ``fc1``: same input, same gradient, same state,
    so one training step moves it exactly as the parent's."""
    parent = mlp_parent(3)
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
            "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)}[optimizer]
    opt = make(parent.parameters())
    trained(parent, opt, steps=4, in_features=8)
    if morph == "widen":
        child = widen(parent, "fc1", 9, input_shape=[8, 8])
    else:
        child = deepen(parent, "fc1", input_shape=[8, 8], step_rule=False)
    new = transfer_optimizer(opt, parent, child)

    trained(parent, opt, steps=1, in_features=8, seed=9)
    trained(child, new, steps=1, in_features=8, seed=9)
    torch.testing.assert_close(child.head.weight, parent.head.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(child.head.bias, parent.head.bias, rtol=1e-6, atol=1e-7)
    for key, value in new.state[child.head.weight].items():
        torch.testing.assert_close(value, opt.state[parent.head.weight][key])
    for name, p in child.named_parameters():  # every state tensor has its parameter's shape
        for key, value in new.state[p].items():
            if key != "step":
                assert value.shape == p.shape, (name, key)


def test_fresh_parameters_start_from_scratch() -> None:
    parent = mlp_parent(4)
    opt = torch.optim.Adam(parent.parameters(), lr=1e-2)
    trained(parent, opt, steps=4, in_features=8)
    child = deepen(parent, "fc1", input_shape=[8, 8], step_rule=False)
    new = transfer_optimizer(opt, parent, child, rule=SCALED)

    fresh = [n for n, o in child._stablemorph_history[-1].report.param_map.items()
             if o.is_fresh]
    assert "fc1.first.weight" in fresh
    named = dict(child.named_parameters())
    for n in fresh:
        assert named[n] not in new.state
    before = named["fc1.first.weight"].detach().clone()
    trained(child, new, steps=1, in_features=8, seed=2)
    st = new.state[named["fc1.first.weight"]]
    assert float(st["step"]) == 1.0
    # Adam's first step from fresh state moves every entry by lr (bias correction exact)
    step = (named["fc1.first.weight"].detach() - before).abs()
    moving = st["exp_avg"].abs() > 1e-6
    torch.testing.assert_close(step[moving], torch.full_like(step[moving], 1e-2), rtol=1e-3,
                               atol=0)


def test_param_groups_follow_sources_and_nearest_names() -> None:
    parent = mlp_parent(5)
    decay = [p for n, p in parent.named_parameters() if n.endswith("weight") and "head" not in n]
    no_decay = [p for n, p in parent.named_parameters() if n.endswith("bias") and "head" not in n]
    parent.head.weight.requires_grad_(False)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-3, "lr": 0.1},
                           {"params": no_decay, "weight_decay": 0.0, "lr": 0.02}],
                          lr=0.5, momentum=0.9)
    child = deepen(parent, "fc1", input_shape=[8, 8], step_rule=False)

    new = transfer_optimizer(opt, parent, child)

    names = {id(p): n for n, p in child.named_parameters()}
    got = [sorted(names[id(p)] for p in g["params"]) for g in new.param_groups]
    assert got[0] == ["fc1.first.weight", "fc1.second.weight", "fc2.weight"]
    assert got[1] == ["fc1.act.a", "fc1.first.bias", "fc1.second.bias", "fc2.bias"]
    for g_new, g_old in zip(new.param_groups, opt.param_groups, strict=True):
        for key in ("lr", "weight_decay", "momentum", "nesterov", "dampening"):
            assert g_new[key] == g_old[key]
    assert new.defaults["lr"] == 0.5
    # head.bias was in no group, head.weight is frozen: neither joins the new optimiser
    held = {n for names in got for n in names}
    assert "head.bias" not in held and "head.weight" not in held


def test_named_param_groups_get_the_childs_names() -> None:
    parent = Tiny()
    opt = torch.optim.AdamW(parent.named_parameters(), lr=1e-3)
    child = hand_widened(parent)
    new = transfer_optimizer(opt, parent, child)
    assert new.param_groups[0]["param_names"] == [n for n, _ in child.named_parameters()]


@pytest.mark.parametrize("cls", [torch.optim.RMSprop, torch.optim.Adamax, torch.optim.NAdam,
                                 torch.optim.RAdam])
def test_other_stock_optimisers(cls: type[torch.optim.Optimizer]) -> None:
    parent = mlp_parent(6)
    kwargs = {"momentum": 0.5, "centered": True} if cls is torch.optim.RMSprop else {}
    opt = cls(parent.parameters(), lr=1e-3, **kwargs)
    trained(parent, opt, steps=2, in_features=8)
    child = widen(parent, "fc2", 8, scheme="net2net", input_shape=[8, 8])
    new = transfer_optimizer(opt, parent, child)
    assert type(new) is cls
    for key, value in new.state[child.fc1.weight].items():  # untouched: copied as is
        torch.testing.assert_close(value, opt.state[parent.fc1.weight][key], rtol=0, atol=0)
    trained(child, new, steps=2, in_features=8)
    for p in child.parameters():
        for value in new.state[p].values():
            assert value.dim() == 0 or value.shape == p.shape


def test_scheduler_carries_over() -> None:
    parent = mlp_parent(7)
    opt = torch.optim.SGD(parent.parameters(), lr=0.1, momentum=0.9)
    warm = LambdaLR(opt, lambda s: (s + 1) / 3)
    decay = StepLR(opt, step_size=2, gamma=0.5)
    sched = SequentialLR(opt, [warm, decay], milestones=[3])
    for _ in range(4):
        trained(parent, opt, steps=1, in_features=8)
        sched.step()
    # one group per original group: without the widen rule's multiplier groups
    child = widen(parent, "fc1", 8, input_shape=[8, 8], step_rule=False)
    new_opt = transfer_optimizer(opt, parent, child)
    new_sched = transfer_scheduler(sched, new_opt)

    assert new_sched.optimizer is new_opt and sched.optimizer is opt
    assert all(s.optimizer is new_opt for s in new_sched._schedulers)
    assert new_sched.last_epoch == sched.last_epoch == 4
    assert new_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler stepped before optimizer" warning
        for _ in range(4):
            trained(parent, opt, steps=1, in_features=8)
            sched.step()
            trained(child, new_opt, steps=1, in_features=8)
            new_sched.step()
            assert new_sched.get_last_lr() == sched.get_last_lr()
            assert new_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_scheduler_refuses_a_different_group_count() -> None:
    parent = Tiny()
    opt = torch.optim.SGD(parent.parameters(), lr=0.1)
    sched = StepLR(opt, 1)
    other = torch.optim.SGD([{"params": [parent.fc1.weight]}, {"params": [parent.fc2.weight]}],
                            lr=0.1)
    with pytest.raises(ValueError, match="drives 1 param groups, the new optimiser has 2"):
        transfer_scheduler(sched, other)


def test_a_chain_of_morphs_equals_transferring_after_each() -> None:
    parent = mlp_parent()
    opt = torch.optim.SGD(parent.parameters(), lr=0.1, momentum=0.9)
    trained(parent, opt, in_features=8)
    before = snapshot(opt)
    once = widen(parent, "fc1", 8, scheme="net2net", input_shape=[8, 8])
    twice = widen(once, "fc1", 10, scheme="net2net", seed=1, input_shape=[8, 8])
    direct = transfer_optimizer(opt, parent, twice, rule=SCALED)
    stepwise = transfer_optimizer(transfer_optimizer(opt, parent, once, rule=SCALED), once,
                                  twice, rule=SCALED)
    for p in twice.parameters():
        torch.testing.assert_close(direct.state[p]["momentum_buffer"],
                                   stepwise.state[p]["momentum_buffer"], rtol=0, atol=0)
    assert_untouched(opt, before)


def test_refuses_a_child_not_morphed_from_the_parent() -> None:
    parent = mlp_parent()
    opt = torch.optim.SGD(parent.parameters(), lr=0.1, momentum=0.9)
    trained(parent, opt, in_features=8)
    before = snapshot(opt)
    child = widen(parent, "fc1", 8, input_shape=[8, 8])
    with pytest.raises(ValueError, match="parent has 0 morph records, the child 0"):
        transfer_optimizer(opt, parent, mlp_parent())
    with pytest.raises(ValueError, match="parent has 1 morph records, the child 0"):
        transfer_optimizer(opt, child, parent)
    assert_untouched(opt, before)


def test_lbfgs_is_refused_up_front() -> None:
    parent = Tiny()
    opt = torch.optim.LBFGS(parent.parameters(), lr=0.1)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(parent(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert "prev_flat_grad" in opt.state[parent.fc1.weight]  # flat state under one parameter
    with pytest.raises(ValueError, match=r"LBFGS keeps one flat state over all parameters \(d, "
                                         r"prev_flat_grad"):
        transfer_optimizer(opt, parent, hand_widened(parent))


def test_unknown_state_on_unchanged_parameters_is_copied() -> None:
    parent = mlp_parent(2)
    opt = Custom(parent.parameters(), lr=0.1)
    trained(parent, opt, steps=1, in_features=8)
    child = deepen(parent, "head", input_shape=[8, 8], step_rule=False)  # fc1, fc2 unchanged
    new = transfer_optimizer(opt, parent, child)
    torch.testing.assert_close(new.state[child.fc1.weight]["trace"],
                               opt.state[parent.fc1.weight]["trace"], rtol=0, atol=0)
    fresh = dict(child.named_parameters())["head.first.weight"]
    assert fresh not in new.state  # fresh: no state to map the unknown key from


def with_lr_scale(child: nn.Module, names: dict[str, float]) -> nn.Module:
    param_map = child._stablemorph_history[-1].report.param_map
    for name, scale in names.items():
        param_map[name].lr_scale = scale
    return child


def test_lr_scale_puts_parameters_into_their_own_groups() -> None:
    parent = mlp_parent(4)
    opt = torch.optim.AdamW([{"params": [p for p in parent.parameters() if p.dim() > 1]},
                             {"params": [p for p in parent.parameters() if p.dim() == 1],
                              "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1)
    trained(parent, opt, steps=2, in_features=8)
    child = with_lr_scale(deepen(parent, "fc2", input_shape=[8, 8], step_rule=False),
                          {"fc2.first.weight": 0.1, "fc2.second.weight": 0.1,
                           "fc2.first.bias": 0.25})
    new = transfer_optimizer(opt, parent, child)

    names = {id(p): n for n, p in child.named_parameters()}
    got = [(g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
           for g in new.param_groups]
    assert got[2:] == [(pytest.approx(1e-3), 0.1, ["fc2.first.weight", "fc2.second.weight"]),
                       (pytest.approx(2.5e-3), 0.0, ["fc2.first.bias"])]
    assert "fc2.first.weight" not in got[0][2] and "fc2.second.bias" in got[1][2]
    assert [g["lr"] for g in new.param_groups[:2]] == [1e-2, 1e-2]
    # the scaled parameters take steps of lr * scale (Adam's first step: about lr)
    before = child.fc2.first.weight.detach().clone()
    trained(child, new, steps=1, in_features=8)
    step = (child.fc2.first.weight.detach() - before).abs().max()
    assert 0.5e-3 < float(step) <= 1.2e-3  # lr * 0.1 (and weight decay), not lr = 1e-2


def test_scheduler_follows_lr_scale_groups() -> None:
    parent = mlp_parent(5)
    opt = torch.optim.SGD(parent.parameters(), lr=0.1, momentum=0.9)
    warm = LambdaLR(opt, lambda s: (s + 1) / 3)
    decay = StepLR(opt, step_size=2, gamma=0.5)
    sched = SequentialLR(opt, [warm, decay], milestones=[3])
    for _ in range(2):
        trained(parent, opt, steps=1, in_features=8)
        sched.step()
    child = with_lr_scale(deepen(parent, "fc1", input_shape=[8, 8], step_rule=False),
                          {"fc1.first.weight": 0.1})
    new_opt = transfer_optimizer(opt, parent, child)
    new_sched = transfer_scheduler(sched, new_opt)
    assert len(new_opt.param_groups) == 2
    assert [s.base_lrs for s in new_sched._schedulers] == [pytest.approx([0.1, 0.01])] * 2
    for _ in range(4):
        trained(parent, opt, steps=1, in_features=8)
        sched.step()
        trained(child, new_opt, steps=1, in_features=8)
        new_sched.step()
        lr = sched.get_last_lr()[0]
        assert new_sched.get_last_lr() == pytest.approx([lr, 0.1 * lr])
        assert [g["lr"] for g in new_opt.param_groups] == pytest.approx([lr, 0.1 * lr])


def test_a_recorded_stand_in_chooses_group_and_borrowed_state() -> None:
    parent = mlp_parent(6)
    opt = torch.optim.Adam([{"params": [parent.fc1.weight, parent.fc1.bias]},
                            {"params": [parent.fc2.weight, parent.fc2.bias, parent.head.weight,
                                        parent.head.bias], "lr": 1e-3}], lr=1e-2)
    trained(parent, opt, steps=3, in_features=8)
    child = deepen(parent, "fc1", input_shape=[8, 8], step_rule=False)
    param_map = child._stablemorph_history[-1].report.param_map
    param_map["fc1.first.weight"].stand_in = "fc2.weight"  # by name it would be fc1.weight
    new = transfer_optimizer(opt, parent, child,
                             rule=TransferRule(scaled=frozenset(), fresh_state="borrow"))
    p = child.fc1.first.weight
    assert any(p is q for q in new.param_groups[1]["params"])
    src = opt.state[parent.fc2.weight]
    torch.testing.assert_close(new.state[p]["exp_avg_sq"],
                               torch.full_like(p, float(src["exp_avg_sq"].mean())))
    assert (new.state[p]["exp_avg"] == 0).all() and float(new.state[p]["step"]) == 3.0


def test_refuses_an_optimiser_over_other_tensors() -> None:
    parent = Tiny()
    stray = nn.Parameter(torch.zeros(5, 7))
    opt = torch.optim.SGD([*parent.parameters(), stray], lr=0.1)
    with pytest.raises(ValueError, match=r"holds a \(5, 7\) tensor that is not a parameter"):
        transfer_optimizer(opt, parent, hand_widened(parent))


class Custom(torch.optim.SGD):
    """An SGD keeping an extra per-entry state whose mapping transfer cannot know."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["trace"] = p.grad.clone()
        return super().step(closure)


def test_refuses_unknown_per_entry_state() -> None:
    parent = Tiny()
    opt = Custom(parent.parameters(), lr=0.1)
    trained(parent, opt, steps=1)
    before = snapshot(opt)
    with pytest.raises(ValueError,
                       match=r"Custom keeps a per-entry state 'trace' \(4, 3\) for 'fc1"):
        transfer_optimizer(opt, parent, hand_widened(parent))
    assert_untouched(opt, before)


def test_refuses_a_record_with_wrong_shapes() -> None:
    parent = Tiny()
    opt = torch.optim.SGD(parent.parameters(), lr=0.1)
    child = hand_widened(parent)
    child._stablemorph_history[-1].report.param_map["fc2.bias"] = ParamOrigin("fc1.bias")
    with pytest.raises(ValueError, match=r"'fc2.bias' \(2,\) does not match its origin "
                                         r"'fc1.bias' \(4,\)"):
        transfer_optimizer(opt, parent, child)


def test_the_default_rule_is_the_measured_one() -> None:
    """benchmarks/results/optim_rule.md: momentum scaled like the weights, Adam's moments
    copied, fresh parameters borrow their stand-in's statistics."""
    assert RULE == TransferRule(scaled=frozenset({"momentum_buffer"}), fresh_state="borrow")
    parent = Tiny()
    adam = torch.optim.Adam(parent.parameters(), lr=1e-2)
    trained(parent, adam, steps=2)
    child = hand_widened(parent)
    st = transfer_optimizer(adam, parent, child).state[child.fc2.weight]
    old = adam.state[parent.fc2.weight]
    torch.testing.assert_close(st["exp_avg"][:, 4], old["exp_avg"][:, 1], rtol=0, atol=0)
    torch.testing.assert_close(st["exp_avg_sq"][:, 4], old["exp_avg_sq"][:, 1], rtol=0, atol=0)

    parent = mlp_parent(8)
    adam = torch.optim.Adam(parent.parameters(), lr=1e-2)
    trained(parent, adam, steps=3, in_features=8)
    child = deepen(parent, "fc2", input_shape=[8, 8], step_rule=False)
    fresh = child.fc2.first.weight
    st = transfer_optimizer(adam, parent, child).state[fresh]
    src = adam.state[parent.fc2.weight]  # its stand-in, by name
    assert float(st["step"]) == 3.0 and (st["exp_avg"] == 0).all()
    torch.testing.assert_close(st["exp_avg_sq"],
                               torch.full_like(fresh, float(src["exp_avg_sq"].mean())))
    with pytest.raises(ValueError, match="fresh_state must be 'none' or 'borrow', got 'zero'"):
        TransferRule(scaled=frozenset(), fresh_state="zero")
    with pytest.raises(ValueError, match=r"unknown state keys \['velocity'\]"):
        TransferRule(scaled=frozenset({"velocity"}), fresh_state="none")
