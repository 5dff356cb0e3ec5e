"""The stable scheme's widen rule (issue 9): a stable widen stays exact and dense, measures on
its probe how much the widened group's first SGD step moves the function
(:mod:`stablemorph.morphs.new_units`) and records ``1 / amplification`` as the group's SGD
learning-rate multiplier (``ParamOrigin.width_advice``), which ``transfer_optimizer`` applies
under SGD and not under Adam, unless switched off; the baselines record it only when asked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stablemorph.morphs import MorphError, widen
from stablemorph.morphs.first_step import SAMPLES, SEED
from stablemorph.optim import (
    RULE,
    TransferRule,
    morphs_param_map,
    transfer_optimizer,
    transfer_scheduler,
)
from stablemorph.record import last_report
from stablemorph.zoo import build_model

torch.set_num_threads(1)
LAYER = {"cnn": "features.conv1", "mlp": "fc1"}


def parent(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "cnn":
        model = build_model("cnn", widths=[4, 6], image_size=8, in_channels=1, num_classes=5)
        with torch.no_grad():  # a trained BN's values (a fresh one's bias is exactly 0)
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
        return model, torch.randn(12, 1, 8, 8)
    return build_model("mlp", hidden=[6, 5], in_features=7, num_classes=3), torch.randn(12, 7)


def lr_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> float:
    return next(g["lr"] for g in opt.param_groups if any(q is p for q in g["params"]))


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_stable_widen_stays_exact_and_dense_and_records_one_multiplier_for_its_group(
        kind: str) -> None:
    model, x = parent(kind)
    model.eval()
    child = widen(model, LAYER[kind], 10, inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(child(x), model(x), rtol=1e-5, atol=1e-6)
    report = last_report(child)
    assert report.zero_fraction == 0.0
    assert report.near_zero_fraction < 0.01
    advice = {n: o.width_advice for n, o in report.param_map.items() if o.index is not None}
    assert len(advice) >= 3  # producer weight and bias, consumer weight (and the BN)
    values = set(advice.values())
    assert len(values) == 1
    (value,) = values
    assert 0.2 < value < 1.0  # new dense units add first-step energy
    assert any("SGD lr multiplier" in note for note in report.notes)
    # parameters outside the group get nothing
    assert all(o.width_advice is None for n, o in report.param_map.items() if n not in advice)


@pytest.mark.parametrize("scheme, width", [("stable", 10), ("stable", 9), ("net2net", 10)])
def test_the_multiplier_is_one_over_the_groups_first_step_amplification(scheme: str,
                                                                        width: int) -> None:
    """Recomputed by hand: random output gradients ``delta`` at the consumer (fc2) from the
    rule's seeded generator; the amplification is the child's summed squared gradient over
    the group's parameters (fc1's weight and bias, fc2's weight) over the parent's (pairs;
    an odd count's split copy and net2net's copies change old units' shares)."""
    model, x = parent("mlp")
    child = widen(model, "fc1", width, scheme=scheme, inputs=x, step_rule=True)
    group = ("fc1.weight", "fc1.bias", "fc2.weight")

    def energy(m: nn.Module) -> float:
        params = dict(m.named_parameters())
        h = F.relu(m.fc1(m.flatten(x)) if hasattr(m, "flatten") else m.fc1(x))
        out = m.fc2(h)
        gen = torch.Generator().manual_seed(SEED)
        total = 0.0
        for _ in range(SAMPLES):
            delta = torch.randn(out.shape, generator=gen, dtype=torch.float64).float()
            grads = torch.autograd.grad(out, [params[n] for n in group], delta,
                                        retain_graph=True)
            total += sum(float(g.double().pow(2).sum()) for g in grads)
        return total

    amp = energy(child) / energy(model)
    recorded = last_report(child).param_map["fc1.weight"].width_advice
    assert recorded == pytest.approx(1.0 / amp, rel=1e-5)


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_transfer_applies_it_under_sgd_only_and_the_switch_turns_it_off(kind: str) -> None:
    model, x = parent(kind)
    child = widen(model, LAYER[kind], 10, inputs=x)
    advice = last_report(child).param_map[f"{LAYER[kind]}.weight"].width_advice
    params = dict(child.named_parameters())
    weight = params[f"{LAYER[kind]}.weight"]
    other = params["classifier.weight" if kind == "cnn" else "head.weight"]
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    new = transfer_optimizer(sgd, model, child)
    assert lr_of(new, weight) == pytest.approx(0.1 * advice)
    assert lr_of(new, other) == pytest.approx(0.1)
    off = TransferRule(RULE.scaled, RULE.fresh_state, width_advice=False)
    assert lr_of(transfer_optimizer(sgd, model, child, rule=off), weight) == pytest.approx(0.1)
    adam = torch.optim.AdamW(model.parameters(), lr=0.01)
    assert lr_of(transfer_optimizer(adam, model, child), weight) == pytest.approx(0.01)


@pytest.mark.parametrize("scheme", ["netmorph", "net2net"])
def test_baselines_record_it_only_when_asked(scheme: str) -> None:
    model, x = parent("mlp")
    plain = last_report(widen(model, "fc1", 10, scheme=scheme, inputs=x))
    assert all(o.width_advice is None for o in plain.param_map.values())
    asked = last_report(widen(model, "fc1", 10, scheme=scheme, inputs=x, step_rule=True))
    assert asked.param_map["fc1.weight"].width_advice is not None
    off = last_report(widen(model, "fc1", 10, inputs=x, step_rule=False))
    assert all(o.width_advice is None for o in off.param_map.values())


@pytest.mark.parametrize("bad", ["yes", 1, 0.5])
def test_a_step_rule_that_is_not_a_bool_is_refused_naming_the_option(bad: object) -> None:
    model, x = parent("mlp")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(MorphError, match=r"widen .fc1.: step_rule=.* must be True, False or "):
        widen(model, "fc1", 10, inputs=x, step_rule=bad)  # type: ignore[arg-type]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)


def test_two_widens_of_one_layer_compose_their_multipliers() -> None:
    model, x = parent("mlp")
    middle = widen(model, "fc1", 8, inputs=x)
    child = widen(middle, "fc1", 12, inputs=x)
    first = last_report(middle).param_map["fc1.weight"].width_advice
    second = last_report(child).param_map["fc1.weight"].width_advice
    composed = morphs_param_map(model, child)["fc1.weight"].width_advice
    assert composed == pytest.approx(first * second)


def test_a_scheduler_of_the_first_optimiser_follows_a_chain_of_transfers() -> None:
    """Each widen adds multiplier groups; the parent's scheduler, transferred once after two
    morphs, drives every group at its multiplier."""
    model, x = parent("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    middle = widen(model, "fc1", 10, inputs=x)
    opt1 = transfer_optimizer(opt, model, middle)
    child = widen(middle, "fc2", 8, inputs=x)
    opt2 = transfer_optimizer(opt1, middle, child)
    assert len(opt2.param_groups) > len(opt1.param_groups) > 1
    new = transfer_scheduler(sched, opt2)
    assert new.base_lrs == pytest.approx([g["lr"] for g in opt2.param_groups])
    for _ in range(2):
        new.step()
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx(
        [0.5 * lr for lr in new.base_lrs])
