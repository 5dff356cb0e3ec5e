"""The stable scheme's step rule (issue 9) as a library user gets it: ``deepen`` /
``insert_subnet`` with ``scheme="stable"`` stay exact and dense with an orthogonal pointwise
second factor and record first-step multipliers and the factorisation; ``transfer_optimizer``
applies them (SGD or adaptive figure by family, times the parent's typical Adam step) and
maps the parent layer's state onto the factors; the baselines get nothing unless asked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import StepLR

from stablemorph.checkpoint import load, save
from stablemorph.morphs import deepen, insert_subnet, widen
from stablemorph.morphs.first_step import block_input, step_amplification
from stablemorph.optim import (
    RULE,
    TransferRule,
    group_sources,
    transfer_optimizer,
    transfer_scheduler,
)
from stablemorph.record import last_report
from stablemorph.step_rule import adaptive_step_ratio, is_adaptive
from stablemorph.zoo import build_model

torch.set_num_threads(1)


def parent(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "cnn":
        model = build_model("cnn", widths=[4, 6], image_size=8, in_channels=1, num_classes=5)
        x = torch.randn(12, 1, 8, 8)
    else:
        model = build_model("mlp", hidden=[10, 8], in_features=7, num_classes=5)
        x = torch.randn(12, 7)
    return model, x, torch.randint(0, 5, (12,))


def trained(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
            steps: int = 3) -> None:
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


LAYER = {"cnn": "features.conv2", "mlp": "fc2"}


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@pytest.mark.parametrize("target, width, refactored", [
    ("2", None, False), ("2", 24, True),           # a 1x1 layer: width = its 16 outputs
    ("3", None, False), ("3", 32, True),           # an identity shortcut: width 17
])
def test_a_wider_first_kernel_keeps_its_outer_taps_dense(target, width, refactored) -> None:
    """insert_subnet's (3, 1) branch on a 1x1 layer or an identity: F1's outer taps must
    cancel through F2's null space; with no or one null direction the orthogonal re-factoring
    left 20-64% of the new entries near zero, so the pair keeps the published solve."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1),
                          _Residual(16))
    x = torch.randn(4, 3, 6, 6)
    child = insert_subnet(model, target, inputs=x, width=width)
    rep = last_report(child)
    assert rep.zero_fraction == 0.0 and rep.near_zero_fraction < 0.01
    assert rep.max_rel <= 1e-6
    notes = " ".join(rep.notes)
    assert ("re-factored with an orthogonal second factor" in notes) is refactored
    assert ("orthogonal second factor not used" in notes) is not refactored
    branch = "2.branch" if target == "2" else "3.shortcut.branch"
    first = child.get_submodule(f"{branch}.first").weight
    assert first[:, :, 0, 0].abs().min() > 1e-4 * first.abs().max()


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_stable_deepen_and_subnet_stay_exact_and_dense_with_an_orthogonal_second_factor(
        kind: str) -> None:
    model, x, _ = parent(kind)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    for grow, block in ((deepen, LAYER[kind]), (insert_subnet, f"{LAYER[kind]}.branch")):
        child = grow(model, LAYER[kind], inputs=x)
        rep = last_report(child)
        assert rep.max_rel <= 1e-6 and rep.zero_fraction == 0.0
        assert any("re-factored with an orthogonal second factor" in n for n in rep.notes)
        assert any(n.startswith("step rule: lr multipliers recorded") for n in rep.notes)
        assert rep.near_zero_fraction < 0.01
        with torch.no_grad():
            torch.testing.assert_close(child.eval()(x), ref, rtol=1e-5, atol=1e-6)
        second = child.get_submodule(block).second.weight.detach().double().flatten(1)
        # He-scaled orthonormal rows: F2 F2^T = 2 I
        torch.testing.assert_close(second @ second.T, 2 * torch.eye(second.shape[0],
                                                                    dtype=torch.float64))
        published = grow(model, LAYER[kind], inputs=x, step_rule=False)
        w = published.get_submodule(block).second.weight.detach().double().flatten(1)
        assert not torch.allclose(w @ w.T, 2 * torch.eye(w.shape[0], dtype=torch.float64),
                                  atol=0.1)
        assert all(o.lr_advice is None for o in last_report(published).param_map.values())


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_the_morph_records_the_multipliers_measured_on_its_probe(kind: str) -> None:
    model, x, _ = parent(kind)
    child = deepen(model, LAYER[kind], inputs=x)
    block = child.get_submodule(LAYER[kind])
    inp = block_input(child, block.first, x)
    kernel = 3 if kind == "cnn" else 0
    expected = {"sgd": 1 / step_amplification(block, inp, kernel, adaptive=False),
                "adaptive": 1 / step_amplification(block, inp, kernel, adaptive=True)}
    pmap = last_report(child).param_map
    advised = {n for n, o in pmap.items() if o.lr_advice is not None}
    prefix = LAYER[kind]
    assert advised == {f"{prefix}.{f}.{s}" for f in ("first", "second") for s in ("weight", "bias")}
    for n in advised:
        assert pmap[n].lr_advice == pytest.approx(expected)
        assert pmap[n].lr_reference == f"{prefix}.weight"
    assert 0.05 < expected["sgd"] < 20 and 0.05 < expected["adaptive"] < 20


def group_lr(opt: torch.optim.Optimizer, p: torch.Tensor) -> float:
    return next(g["lr"] for g in opt.param_groups if any(q is p for q in g["params"]))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_transfer_applies_the_familys_multiplier_and_the_scheduler_follows(
        optimizer: str) -> None:
    model, x, y = parent("mlp")
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=0.01))
    sched = StepLR(opt, step_size=1, gamma=0.5)
    trained(model, opt, x, y)
    child = deepen(model, "fc2", inputs=x)
    new = transfer_optimizer(opt, model, child)
    advice = last_report(child).param_map["fc2.first.weight"].lr_advice
    assert is_adaptive(new) == (optimizer == "adamw")
    if optimizer == "sgd":
        scale = advice["sgd"]
    else:
        st = opt.state[model.fc2.weight]
        m_hat, v_hat = st["exp_avg"] / (1 - 0.9**3), st["exp_avg_sq"] / (1 - 0.999**3)
        ratio = float((m_hat.abs() / (v_hat.sqrt() + 1e-8)).mean())
        assert adaptive_step_ratio(opt, model.fc2.weight) == pytest.approx(ratio)
        assert 0 < ratio < 1
        scale = advice["adaptive"] * ratio
    base = opt.param_groups[0]["lr"]
    for name in ("first.weight", "first.bias", "second.weight", "second.bias"):
        assert group_lr(new, child.get_parameter(f"fc2.{name}")) == pytest.approx(base * scale)
    for name in ("fc1.weight", "head.weight"):
        assert group_lr(new, child.get_parameter(name)) == base
    # the slope is a fresh parameter: under Adam its stand-in's typical step (below)
    slope = 1.0 if optimizer == "sgd" else adaptive_step_ratio(opt, model.fc2.bias)
    assert group_lr(new, child.fc2.act.a) == pytest.approx(base * slope)
    scales = [scale] if optimizer == "sgd" else [scale, slope]
    assert group_sources(new) == [(0, 1.0), *[(0, pytest.approx(s)) for s in scales]]
    # the groups say their multiplier, for loops that set every group's rate themselves
    assert [g.get("lr_scale", 1.0) for g in new.param_groups] == pytest.approx([1.0, *scales])
    new_sched = transfer_scheduler(sched, new)
    new.step()
    new_sched.step()
    assert [g["lr"] for g in new.param_groups] == pytest.approx(
        [base / 2, *[base * s / 2 for s in scales]])


def test_adam_without_state_takes_the_adaptive_figure_alone() -> None:
    model, x, _ = parent("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)  # never stepped: no state
    child = deepen(model, "fc1", inputs=x)
    advice = last_report(child).param_map["fc1.first.weight"].lr_advice
    new = transfer_optimizer(opt, model, child)
    assert group_lr(new, child.fc1.first.weight) == pytest.approx(0.01 * advice["adaptive"])


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_factor_state_is_the_parents_gradient_through_the_factors(kind: str) -> None:
    """Parent momentum = the parent's gradient M: the factors' mapped momentum is J^T M, what
    autograd gives the factors on the same loss (pointwise pairs: the composite's support is
    the parent kernel's)."""
    model, x, y = parent(kind)
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = p.grad.clone()
    child = deepen(model, LAYER[kind], inputs=x).eval()
    new = transfer_optimizer(opt, model, child)
    F.cross_entropy(child(x), y).backward()
    block = child.get_submodule(LAYER[kind])
    for layer in (block.first, block.second):
        for p in layer.parameters():
            torch.testing.assert_close(new.state[p]["momentum_buffer"], p.grad, rtol=1e-4,
                                       atol=1e-6)


def test_adam_factor_state_maps_both_moments_and_the_step() -> None:
    model, x, y = parent("mlp")
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    trained(model, opt, x, y, steps=4)
    child = deepen(model, "fc1", inputs=x)
    new = transfer_optimizer(opt, model, child)
    old = opt.state[model.fc1.weight]
    f1, f2 = child.fc1.first.weight.detach().double(), child.fc1.second.weight.detach().double()
    st1, st2 = new.state[child.fc1.first.weight], new.state[child.fc1.second.weight]
    torch.testing.assert_close(st1["exp_avg"].double(), f2.T @ old["exp_avg"].double())
    b1 = child.fc1.first.bias.detach().double()
    mb = opt.state[model.fc1.bias]["exp_avg"].double()
    # F2 also sees the constant b1: its gradient gains delta b1^T
    torch.testing.assert_close(st2["exp_avg"].double(),
                               old["exp_avg"].double() @ f1.T + mb[:, None] * b1[None, :])
    torch.testing.assert_close(new.state[child.fc1.second.bias]["exp_avg"].double(), mb)
    torch.testing.assert_close(st1["exp_avg_sq"].double(),
                               f2.square().T @ old["exp_avg_sq"].double())
    assert float(st1["step"]) == float(st2["step"]) == 4.0
    # the child trains on from it
    trained(child, new, x, y, steps=1)
    assert float(new.state[child.fc1.first.weight]["step"]) == 5.0


@pytest.mark.parametrize("scheme", ["netmorph", "net2net"])
def test_baselines_get_no_multiplier_or_state_mapping_unless_asked(scheme: str) -> None:
    model, x, y = parent("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trained(model, opt, x, y)
    for grow in (deepen, insert_subnet):
        child = grow(model, "fc1", scheme=scheme, inputs=x)
        pmap = last_report(child).param_map
        assert all(o.lr_advice is None and o.factor is None for o in pmap.values())
        new = transfer_optimizer(opt, model, child)
        assert len(new.param_groups) == 1
        if grow is deepen:  # fresh factors: zero momentum (the published transfer)
            assert (new.state[child.fc1.first.weight]["momentum_buffer"] == 0).all()
    offered = deepen(model, "fc1", scheme=scheme, inputs=x, step_rule=True)
    new = transfer_optimizer(opt, model, offered)
    advice = last_report(offered).param_map["fc1.first.weight"].lr_advice
    assert group_lr(new, offered.fc1.first.weight) == pytest.approx(0.1 * advice["sgd"])
    assert new.state[offered.fc1.first.weight]["momentum_buffer"].abs().sum() > 0


def test_a_chain_of_deepens_transfers_like_one_step_at_a_time() -> None:
    model, x, y = parent("cnn")
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    trained(model, opt, x, y)
    once = deepen(model, "features.conv1", inputs=x)
    twice = deepen(once, "features.conv2", inputs=x, seed=1)
    direct = transfer_optimizer(opt, model, twice)
    stepwise = transfer_optimizer(transfer_optimizer(opt, model, once), once, twice)
    for name, p in twice.named_parameters():
        assert group_lr(direct, p) == pytest.approx(group_lr(stepwise, p), rel=1e-12), name
        for key, value in stepwise.state[p].items():
            torch.testing.assert_close(direct.state[p][key], value, rtol=0, atol=0)
    # the original group, one per factor pair and (AdamW) one per PAct slope
    assert len(direct.param_groups) == 5
    # a chain's multipliers compose in the groups' lr_scale as in their rates
    for group in stepwise.param_groups:
        assert group["lr"] == pytest.approx(0.01 * group.get("lr_scale", 1.0), rel=1e-12)


def test_the_record_survives_a_checkpoint(tmp_path) -> None:
    model, x, y = parent("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trained(model, opt, x, y)
    child = deepen(model, "fc1", inputs=x)
    save(child, tmp_path / "child.pt")
    loaded = load(tmp_path / "child.pt")
    before = last_report(child).param_map["fc1.first.weight"]
    after = last_report(loaded).param_map["fc1.first.weight"]
    assert (after.lr_advice, after.lr_reference, after.factor) == (
        before.lr_advice, before.lr_reference, before.factor)


def test_new_entries_of_stable_morphs_start_at_their_stand_ins_typical_adam_step() -> None:
    """The stable scheme marks new entries (ParamOrigin.adaptive_new); under Adam the new
    units' second moments are divided by r^2 and a fresh parameter's rate (the PAct slope)
    is multiplied by r (r: the stand-in's typical Adam step); the baselines, SGD, and
    TransferRule(adaptive_new=False) are left as published."""
    model, x, y = parent("mlp")
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    trained(model, opt, x, y, steps=4)
    off = TransferRule(RULE.scaled, RULE.fresh_state, adaptive_new=False)
    wide = widen(model, "fc1", 14, inputs=x)
    assert last_report(wide).param_map["fc2.weight"].adaptive_new
    damped, plain = transfer_optimizer(opt, model, wide), transfer_optimizer(opt, model, wide,
                                                                              rule=off)
    r = adaptive_step_ratio(opt, model.fc2.weight)
    v0, v1 = (o.state[wide.fc2.weight]["exp_avg_sq"] for o in (plain, damped))
    torch.testing.assert_close(v1[:, :10], v0[:, :10], rtol=0, atol=0)  # the parent's units
    torch.testing.assert_close(v1[:, 10:], v0[:, 10:] / r**2)
    published = widen(model, "fc1", 14, scheme="netmorph", inputs=x)
    assert not any(o.adaptive_new for o in last_report(published).param_map.values())
    deep = deepen(model, "fc1", inputs=x)
    stand_in = adaptive_step_ratio(opt, model.fc1.bias)  # the slope's nearest parameter
    new = transfer_optimizer(opt, model, deep)
    assert group_lr(new, deep.fc1.act.a) == pytest.approx(0.01 * stand_in)
    assert group_lr(transfer_optimizer(opt, model, deep, rule=off), deep.fc1.act.a) == 0.01
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trained(model, sgd, x, y)
    deep = deepen(model, "fc1", inputs=x)
    assert group_lr(transfer_optimizer(sgd, model, deep), deep.fc1.act.a) == 0.1


def test_an_identity_shortcut_branch_takes_the_adaptive_figure_alone() -> None:
    """A subnet on a residual block's identity stands for no parent layer: multipliers
    recorded, no reference step and no state mapping."""
    torch.manual_seed(0)
    model = build_model("resnet", in_channels=1, num_classes=5, widths=[4, 8], layers=[1, 1])
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    trained(model, opt, x, y, steps=2)
    child = insert_subnet(model, "layer1.0", inputs=x)
    origin = last_report(child).param_map["layer1.0.shortcut.branch.first.weight"]
    assert origin.lr_advice is not None and origin.lr_reference is None
    assert origin.factor is None
    new = transfer_optimizer(opt, model, child)
    first = child.get_parameter("layer1.0.shortcut.branch.first.weight")
    assert group_lr(new, first) == pytest.approx(0.01 * origin.lr_advice["adaptive"])
    assert (new.state[first]["exp_avg"] == 0).all()  # the fresh parameter's borrowed state


def test_a_step_rule_that_is_not_a_bool_is_refused_and_the_model_kept() -> None:
    model, x, _ = parent("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"step_rule='yes' must be True, False or None"):
        deepen(model, "fc2", inputs=x, step_rule="yes")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
