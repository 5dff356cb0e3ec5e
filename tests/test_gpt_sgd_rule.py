"""The GPT growths' SGD step rule (issue 9, :mod:`stablemorph.transformer.sgd_rule`): a
stable growth stays exact, measures on its probe how much the whole model's first SGD step
moves the logits and records ``1 / amplification`` on every child parameter
(``ParamOrigin.width_advice``), which ``transfer_optimizer`` applies under SGD and not under
AdamW; the baselines record it only when asked (``step_rule=True``)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from stablemorph.morphs import MorphError
from stablemorph.morphs.first_step import SAMPLES, SEED
from stablemorph.optim import RULE, transfer_optimizer
from stablemorph.record import history, last_report
from stablemorph.transformer.depth import insert_block
from stablemorph.transformer.heads import grow_heads
from stablemorph.transformer.mlp_width import grow_mlp
from stablemorph.transformer.model import GPT, GPTConfig
from stablemorph.transformer.stream import grow_d_model

torch.set_num_threads(1)
LR = 0.1


def parent(dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig.uniform(vocab_size=11, block_size=8, d_model=8, n_layer=2, n_head=2,
                                  head_dim=4, d_mlp=12)).to(dtype)
    with torch.no_grad():  # a trained model's biases are not zero
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    return model


def probe() -> torch.Tensor:
    return torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(5))


GROWTHS = {
    "depth": lambda m, **kw: insert_block(m, 1, **kw),
    "mlp": lambda m, **kw: grow_mlp(m, 20, **kw),
    "heads": lambda m, **kw: grow_heads(m, 3, **kw),
    "stream": lambda m, **kw: grow_d_model(m, 12, **kw),
}


def lr_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> float:
    return next(g["lr"] for g in opt.param_groups if any(q is p for q in g["params"]))


@pytest.mark.parametrize("growth", sorted(GROWTHS))
def test_stable_growth_stays_exact_and_records_one_multiplier_for_every_parameter(
        growth: str) -> None:
    model, x = parent(), probe()
    child = GROWTHS[growth](model, probe=x)
    without = GROWTHS[growth](model, probe=x, step_rule=False)
    with torch.no_grad():
        torch.testing.assert_close(child(x), model(x), rtol=1e-5, atol=1e-6)
    for (n, p), (m, q) in zip(child.named_parameters(), without.named_parameters(), strict=True):
        assert n == m
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # the rule changes no value
    report, plain = last_report(child), last_report(without)
    assert report.max_rel == plain.max_rel  # the self-check's deviation is unchanged
    assert report.changed == plain.changed  # zeros counted over the same parameters
    assert report.zero_fraction == plain.zero_fraction
    advice = {n: o.width_advice for n, o in report.param_map.items()}
    assert set(advice) == {n for n, _ in child.named_parameters()}
    (value,) = set(advice.values())
    assert 0.2 < value < 1.0  # the new parameters add first-step energy
    assert any("SGD lr multiplier" in note for note in report.notes)
    assert all(o.width_advice is None for o in plain.param_map.values())


@pytest.mark.parametrize("scheme", ["netmorph", "net2net"])
def test_baselines_record_nothing_by_default_and_the_rule_when_offered(scheme: str) -> None:
    model, x = parent(), probe()
    plain = insert_block(model, 1, scheme=scheme, probe=x)
    assert all(o.width_advice is None for o in last_report(plain).param_map.values())
    offered = insert_block(model, 1, scheme=scheme, probe=x, step_rule=True)
    values = {o.width_advice for o in last_report(offered).param_map.values()}
    assert len(values) == 1 and 0.2 < values.pop() < 1.0
    assert history(offered)[-1].kwargs["step_rule"] is True  # a replay offers it again
    assert "step_rule" not in history(plain)[-1].kwargs


def _reference_energy(model: nn.Module, x: torch.Tensor, eta: float = 1e-7) -> float:
    """Independent reference: take a real SGD step of size ``eta`` on ``<delta, logits>`` for
    each of the rule's seeded random ``delta`` and read how far ``<delta, logits>`` moved
    (first order: ``eta ||grad||^2``), averaged."""
    gen = torch.Generator().manual_seed(SEED)
    total = 0.0
    for _ in range(SAMPLES):
        m = copy.deepcopy(model).train()
        out = m(x)
        delta = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        opt = torch.optim.SGD(m.parameters(), lr=eta)
        (out * delta).sum().backward()
        opt.step()
        with torch.no_grad():
            moved = float(((out.detach() - m(x)) * delta).sum())
        total += moved / eta
    return total / SAMPLES


@pytest.mark.parametrize("growth", ["depth", "mlp"])
def test_the_multiplier_is_one_over_the_measured_first_step_amplification(growth: str) -> None:
    model, x = parent(torch.float64), probe()
    child = GROWTHS[growth](model, probe=x)
    (advice,) = {o.width_advice for o in last_report(child).param_map.values()}
    amp = _reference_energy(child, x) / _reference_energy(model, x)
    assert 1.0 / advice == pytest.approx(amp, rel=1e-5)


def test_transfer_optimizer_applies_the_multiplier_under_sgd_only() -> None:
    model, x = parent(), probe()
    child = insert_block(model, 1, probe=x)
    (advice,) = {o.width_advice for o in last_report(child).param_map.values()}
    sgd = transfer_optimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), model,
                             child)
    for n, p in child.named_parameters():
        assert lr_of(sgd, p) == pytest.approx(LR * advice, rel=1e-12), n
    off = transfer_optimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), model,
                             child, rule=dataclasses.replace(RULE, width_advice=False))
    assert {g["lr"] for g in off.param_groups} == {LR}
    # AdamW: the same optimiser as without the recorded advice (adamn sets its own rates)
    adam = torch.optim.AdamW(model.parameters(), lr=LR)
    model(x).sum().backward()
    adam.step()
    with_advice = transfer_optimizer(adam, model, child)
    without = transfer_optimizer(adam, model, child,
                                 rule=dataclasses.replace(RULE, width_advice=False))
    for n, p in child.named_parameters():
        assert lr_of(with_advice, p) == lr_of(without, p), n


def test_multipliers_compose_to_the_chains_amplification() -> None:
    """Two insertions, the optimiser transferred after each (as the experiment does): every
    parameter's rate is one over the final child's first-step energy over the first
    parent's (the steps' ratios telescope)."""
    model, x = parent(torch.float64), probe()
    mid = insert_block(model, 1, probe=x)
    child = insert_block(mid, 3, probe=x, seed=1)
    sgd = transfer_optimizer(torch.optim.SGD(model.parameters(), lr=LR), model, mid)
    sgd = transfer_optimizer(sgd, mid, child)
    amp = _reference_energy(child, x) / _reference_energy(model, x)
    assert amp > 1.01  # two new blocks add first-step energy
    for n, p in child.named_parameters():
        assert lr_of(sgd, p) == pytest.approx(LR / amp, rel=1e-5), n


def test_a_step_rule_that_is_not_a_bool_is_refused_naming_the_option() -> None:
    model = parent()
    with pytest.raises(MorphError, match=r"insert_block: step_rule must be True, False or "
                                         r"None .* got 'yes'"):
        insert_block(model, 1, step_rule="yes")  # type: ignore[arg-type]


def test_the_experiments_growth_steps_pass_the_arms_step_rule() -> None:
    """``--morph depth`` / ``width`` take ``step_rule`` (the experiment gives each arm its
    own): off for stable, on for a baseline."""
    from stablemorph.experiment.growth import morph_steps

    model, x = parent(), probe()
    for op, scheme, rule in (("depth", "stable", False), ("width", "netmorph", True)):
        child = model
        for j, step in enumerate(morph_steps(op, model, [], {"step_rule": rule})):
            child = step.run(child, scheme, j, x)
            recorded = {o.width_advice for o in last_report(child).param_map.values()}
            assert (recorded == {None}) is (not rule), (op, step.label, recorded)


def test_the_experiments_research_option_glr_computes_the_librarys_multiplier() -> None:
    """``stable+glr`` (computed after the growth from the final child) and the library's
    recorded advice are one figure (the matrix runs were bit for bit equal)."""
    from stablemorph.experiment.rules import growth_lr_scales

    model, x = parent(), probe()
    child = insert_block(model, 1, probe=x)
    (advice,) = {o.width_advice for o in last_report(child).param_map.values()}
    scales = growth_lr_scales(model, child, x)
    assert set(scales) == {n for n, _ in child.named_parameters()}
    assert list(scales.values()) == pytest.approx([advice] * len(scales), rel=1e-12)


def test_one_transfer_after_a_chained_grow_gives_every_parameter_the_chains_multiplier(
        ) -> None:
    """transformer.grow of several sizes: a block the last step inserts has no earlier
    source, so without the chain's carry it took only that step's multiplier while the
    parent's parameters took the product of all of them."""
    from stablemorph.transformer.grow import grow

    model, x = parent(), probe()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    child = grow(model, d_mlp=20, n_layer=3, probe=x)
    steps = history(child)[-2:]
    product = 1.0
    for record in steps:
        product *= next(o.width_advice for o in record.report.param_map.values()
                        if not o.is_fresh)
    assert product < 0.99  # the chain does slow the first step
    new = transfer_optimizer(opt, model, child)
    rates = {name: lr_of(new, p) for name, p in child.named_parameters()}
    for name, rate in rates.items():
        assert rate == pytest.approx(LR * product, rel=1e-9), name
    assert any(name.startswith("blocks.2.") for name in rates)  # the inserted block
