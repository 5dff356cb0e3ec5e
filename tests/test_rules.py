"""The stable scheme's default rule in experiments (experiment/rules.py): the factors of a
deepen or subnet get the learning-rate multiplier 1 / first-step amplification; the child
stays exact and dense; every research option that re-factors keeps the function."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from stablemorph.equation import sparsity
from stablemorph.experiment import rules
from stablemorph.experiment.stability import STABLE_RULE, ExperimentConfig, grow, new_parameters
from stablemorph.experiment.train import TrainConfig, make_optimizer
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
    for pair in pairs:
        amp = rules.data_amplification(child, pair, x[:8], "sgd")
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


@pytest.mark.parametrize("option", ["regauge_", "isometric_gauge_", "orthogonal_second_",
                                    "shrink_first_bias_"])
@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_every_refactoring_option_keeps_the_function(kind: str, option: str) -> None:
    model, cfg, x, _ = parent(kind)
    if option == "orthogonal_second_":
        cfg.morph_kwargs = {}  # pointwise second factors: the ones it re-factors
    child, _, _ = grow(model, make_optimizer(model, TrainConfig()), cfg, "stable+raw", 0, x[:8])
    ref = outputs(child, x)
    before = {n: p.detach().clone() for n, p in child.named_parameters()}
    fn = getattr(rules, option)
    fn(child, 0.01) if option == "shrink_first_bias_" else fn(child)
    assert (outputs(child, x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert any(not torch.equal(p, before[n]) for n, p in child.named_parameters())


def test_mapped_momentum_of_a_linear_pair_is_the_gradient_through_the_factors() -> None:
    model, cfg, x, y = parent("mlp")
    child, _, _ = grow(model, make_optimizer(model, TrainConfig()), cfg, "stable+raw", 0, x[:8])
    model, child = copy.deepcopy(model).eval(), copy.deepcopy(child).eval()
    popt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        popt.state[p]["momentum_buffer"] = p.grad.clone()
    copt = torch.optim.SGD(child.parameters(), lr=0.1, momentum=0.9)
    rules.carry_factor_state_(copt, child, popt, model)
    F.cross_entropy(child(x), y).backward()
    m = dict(child.named_modules())
    for pair in rules.factor_pairs(child):
        for layer in (pair.first, pair.second):
            for p in m[layer].parameters():
                torch.testing.assert_close(copt.state[p]["momentum_buffer"], p.grad,
                                           rtol=1e-5, atol=1e-7)


def test_adam_step_ratio_is_the_parent_layers_mean_normalised_step() -> None:
    model, cfg, x, y = parent("mlp")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    st = opt.state[model.fc1.weight]
    m, v = st["exp_avg"] / (1 - 0.9**4), st["exp_avg_sq"] / (1 - 0.999**4)
    expected = float((m.abs() / (v.sqrt() + 1e-8)).mean())
    assert rules.adam_step_ratio(opt, model, "fc1") == pytest.approx(expected)
    assert rules.adam_step_ratio(make_optimizer(model, TrainConfig()), model, "fc1") is None
    cfg.optimizer = "adamw"
    child, child_opt, _ = grow(model, opt, cfg, "stable", 0, x[:8])
    pair = rules.factor_pairs(child)[0]
    amp = rules.data_amplification(child, pair, x[:8], "adamw")
    name_of = {id(p): n for n, p in child.named_parameters()}
    scale = next(g["lr_scale"] for g in child_opt.param_groups
                 if any(name_of[id(p)] == f"{pair.first}.weight" for p in g["params"]))
    assert scale == pytest.approx(expected / amp)
