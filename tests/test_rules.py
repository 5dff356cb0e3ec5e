"""The stability experiment's arms (experiment/stability.py ``grow``): ``stable`` is the
library's step rule (test_stable_rule.py tests the rule itself), the baselines get it only on
request, and every research option of experiment/rules.py that re-factors keeps the function."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stablemorph.equation import sparsity
from stablemorph.experiment import rules
from stablemorph.experiment.stability import (
    STABLE_RULE,
    ExperimentConfig,
    ExperimentError,
    grow,
    new_parameters,
    plan_arm,
)
from stablemorph.experiment.train import TrainConfig, make_optimizer
from stablemorph.morphs.first_step import block_input, step_amplification
from stablemorph.zoo import build_model

torch.set_num_threads(1)


def parent(kind: str) -> tuple[torch.nn.Module, ExperimentConfig, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "cnn":
        model = build_model("cnn", widths=[4, 8], image_size=8, in_channels=1, num_classes=10)
        cfg = ExperimentConfig(model="cnn", morph_kwargs={"kernel_size": 3})
        x = torch.randn(16, 1, 8, 8)
    else:
        model = build_model("mlp", hidden=[12, 12], in_features=20, num_classes=10)
        cfg = ExperimentConfig(model="mlp", morph_kwargs={})
        x = torch.randn(16, 20)
    y = torch.randint(0, 10, (16,))
    opt = make_optimizer(model, TrainConfig(lr=0.05))
    for _ in range(3):  # a parent with momentum state
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, cfg, x, y


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_stable_with_its_rule_is_exact_dense_and_scales_only_the_factors(kind: str) -> None:
    assert "dlr" in STABLE_RULE
    model, cfg, x, _ = parent(kind)
    opt = make_optimizer(model, TrainConfig(lr=0.05))
    child, child_opt, zeros = grow(model, opt, cfg, "stable", 0, x[:8])
    ref = outputs(model, x)
    assert (outputs(child, x) - ref).abs().max() <= 1e-6 * ref.abs().max()
    params = dict(child.named_parameters())
    exact, near = sparsity(*[params[n] for n in new_parameters(child)])
    assert zeros == exact == 0.0 and near < 0.01
    pairs = rules.factor_pairs(child)
    assert [p.target for p in pairs] == (
        ["features.conv1", "features.conv2"] if kind == "cnn" else ["fc1", "fc2"])
    name_of = {id(p): n for n, p in child.named_parameters()}
    scaled = {name_of[id(p)]: g["lr_scale"] for g in child_opt.param_groups
              for p in g["params"] if g["lr_scale"] != pytest.approx(1.0)}
    modules = dict(child.named_modules())
    for pair in pairs:
        amp = step_amplification(modules[pair.target],
                                 block_input(child, modules[pair.first], x[:8]), pair.kernel,
                                 adaptive=False)
        for layer in (pair.first, pair.second):
            for suffix in ("weight", "bias"):
                assert scaled[f"{layer}.{suffix}"] == pytest.approx(1 / amp)
    assert all(".first." in n or ".second." in n for n in scaled)
    unscaled = {name_of[id(p)] for g in child_opt.param_groups for p in g["params"]
                if g["lr_scale"] == pytest.approx(1.0)}
    assert unscaled | set(scaled) == set(params)


def test_the_baselines_and_raw_stable_get_no_multiplier() -> None:
    model, cfg, x, _ = parent("mlp")
    opt = make_optimizer(model, TrainConfig(lr=0.05))
    for arm in ("netmorph", "net2net", "stable+raw"):
        _, child_opt, _ = grow(model, opt, cfg, arm, 0, x[:8])
        assert all(g["lr_scale"] == 1.0 for g in child_opt.param_groups)
    _, child_opt, _ = grow(model, opt, cfg, "netmorph+dlr", 0, x[:8])
    assert sum(g["lr_scale"] != 1.0 for g in child_opt.param_groups) == 2


@pytest.mark.parametrize(("arm", "message"), [
    ("stable+raw+dlr", r"\['dlr'\] need the stable step rule's gauge \(orth2\)"),
    ("netmorph+orth2", "orth2 is the stable scheme's gauge"),
    ("stable+gauge", r"\['gauge'\] re-gauge after the morph: combine them with \+raw only"),
])
def test_arms_the_library_path_cannot_express_are_refused(arm: str, message: str) -> None:
    with pytest.raises(ExperimentError, match=message):
        plan_arm(arm)
    plan = plan_arm("netmorph+state+dlr+adamr")
    assert plan.step_rule and plan.rule.lr_advice and plan.rule.factor_state
    assert not plan_arm("stable+raw").step_rule and plan_arm("stable").step_rule


def test_random_gradient_amplification_of_a_linear_pair_matches_its_closed_form() -> None:
    """For a Linear pair and i.i.d. gradients U, E||J^T U||^2 / E||U||^2 =
    ||F2||^2 / C_out + ||F1||^2 / C_in."""
    model, cfg, x, _ = parent("mlp")
    child, _, _ = grow(model, make_optimizer(model, TrainConfig()), cfg, "stable+raw", 0, x[:8])
    pair = rules.factor_pairs(child)[0]
    m = dict(child.named_modules())
    F1, F2 = m[pair.first].weight.detach(), m[pair.second].weight.detach()
    expected = float(F2.pow(2).sum() / F2.shape[0] + F1.pow(2).sum() / F1.shape[1])
    assert rules.amplification(child, pair, "sgd", samples=3000) == pytest.approx(
        expected, rel=0.05)


@pytest.mark.parametrize("option", ["regauge_", "isometric_gauge_", "shrink_first_bias_"])
@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_every_refactoring_option_keeps_the_function(kind: str, option: str) -> None:
    model, cfg, x, _ = parent(kind)
    child, _, _ = grow(model, make_optimizer(model, TrainConfig()), cfg, "stable+raw", 0, x[:8])
    ref = outputs(child, x)
    before = {n: p.detach().clone() for n, p in child.named_parameters()}
    fn = getattr(rules, option)
    fn(child, 0.01) if option == "shrink_first_bias_" else fn(child)
    assert (outputs(child, x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert any(not torch.equal(p, before[n]) for n, p in child.named_parameters())
