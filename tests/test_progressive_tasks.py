"""The progressive benchmark's cells (CNN, HF Llama, GPT width): plans checked up front,
growth in place and exact, FLOPs as counted by PyTorch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stablemorph.experiment.progressive import ProgressiveConfig, lr_factor, run
from stablemorph.experiment.progressive_tasks import TaskError, make_task
from stablemorph.flops import step_flops
from stablemorph.progressive import grow_in_place
from stablemorph.transformer.train import OptimConfig, make_adamw


def _cnn(**kw) -> ProgressiveConfig:
    base = dict(task="cnn", layers=(2, 4, 4), widths=(1, 1, 2), cnn_widths=(4, 8),
                dataset="digits", batch_size=8, limit_test=None, budget_steps=12,
                stage_fractions=(0.2, 0.4), timing=(), warmup_steps=2, eval_every=4,
                seeds=(0,), arms=("scratch", "stable", "random"))
    return ProgressiveConfig(**{**base, **kw})


def _text(task: str, **kw) -> ProgressiveConfig:
    base = dict(task=task, d_model=16, n_head=2, block_size=16, batch_size=4, layers=(1, 2),
                stage_fractions=(0.3,), timing=(), budget_steps=8, warmup_steps=2,
                eval_every=4, eval_windows=4, seeds=(0,), max_chars=30_000,
                arms=("scratch", "stable"))
    return ProgressiveConfig(**{**base, **kw})


def _grow_all(task, arm: str):
    """Grow a start model in place through every stage; outputs before/after each growth."""
    model = task.build(0, final=False)
    optimizer = make_adamw(model, OptimConfig())
    x, _ = task.batch(0, 0)
    model.eval()
    pairs = []
    for stage in range(1, len(task.stages)):
        before = task.logits(model, x).detach()
        for growth in task.growths(arm, model, stage, 0):
            assert grow_in_place(model, growth, optimizer) is model
        pairs.append((before, task.logits(model, x).detach()))
    return model, optimizer, pairs


@pytest.mark.parametrize("arm", ["stable", "net2net", "netmorph"])
def test_cnn_grows_in_depth_and_width_in_place_exactly(arm):
    task = make_task(_cnn())
    model, optimizer, pairs = _grow_all(task, arm)
    for before, after in pairs:
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 8, 16]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters()}
    # The scratch model is the same architecture.
    scratch = task.build(0, final=True)
    assert [(n, p.shape) for n, p in scratch.named_parameters()] == [
        (n, p.shape) for n, p in model.named_parameters()]


def test_cnn_random_anchor_changes_the_function_keeps_old_values():
    task = make_task(_cnn(layers=(2, 2), widths=(1, 2), stage_fractions=(0.3,)))
    model, _, pairs = _grow_all(task, "random")
    before, after = pairs[0]
    assert not torch.allclose(before, after, atol=1e-3)
    parent = task.build(0, final=False)
    torch.testing.assert_close(model.features.conv1.weight[:4], parent.features.conv1.weight)


def test_cnn_step_flops_match_an_analytic_count():
    """FlopCounterMode's count equals 2 x MACs forward, twice that backward, with no input
    gradient for the first convolution."""
    task = make_task(_cnn())
    for final in (False, True):
        model = task.build(0, final=final)
        x, _ = task.batch(0, 0)
        macs: list[int] = []

        def hook(mod, inp, out, macs=macs):
            if isinstance(mod, nn.Conv2d):
                k = mod.kernel_size[0] * mod.kernel_size[1]
                macs.append(out.numel() * mod.in_channels // mod.groups * k)
            else:
                macs.append(out.numel() * mod.in_features)

        handles = [m.register_forward_hook(hook) for m in model.modules()
                   if isinstance(m, nn.Conv2d | nn.Linear)]
        model.eval()
        model(x)
        for h in handles:
            h.remove()
        forward = 2 * sum(macs)
        assert step_flops(model, x) == 3 * forward - 2 * macs[0]


def test_llama_grows_in_depth_and_width_exactly_anchors_do_not():
    task = make_task(_text("llama", layers=(1, 2, 2), widths=(1, 1, 2),
                           stage_fractions=(0.3, 0.5)))
    model, _, pairs = _grow_all(task, "stable")
    for before, after in pairs:
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 32)
    depth = make_task(_text("llama", layers=(2, 4)))
    for arm in ("stack", "random"):
        grown, _, [(before, after)] = _grow_all(depth, arm)
        assert grown.config.num_hidden_layers == 4
        assert not torch.allclose(before, after, atol=1e-3), arm


def test_gpt_grows_wider_exactly():
    task = make_task(_text("gpt", layers=(1, 2), widths=(1, 2)))
    model, _, [(before, after)] = _grow_all(task, "netmorph")
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert (model.config.n_layer, model.config.d_model) == (2, 32)


def test_bad_plans_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="growth 1: 4 -> 2 layers"):
        _cnn(layers=(4, 2), widths=(1, 1), stage_fractions=(0.3,))
    with pytest.raises(ValueError, match=r"width x2 -> x1: sizes must not shrink"):
        _cnn(layers=(2, 2, 2), widths=(1, 2, 1))
    with pytest.raises(TaskError, match="at most 4 after growing"):
        make_task(_cnn(layers=(2, 5, 5)))
    with pytest.raises(TaskError, match=r"no \['stack'\] anchor"):
        run(_cnn(arms=("scratch", "stack")), tmp_path / "a")
    with pytest.raises(TaskError, match="grows depth only"):
        run(_text("gpt", layers=(1, 1), widths=(1, 2), arms=("stack",)), tmp_path / "b")
    with pytest.raises(TaskError, match="random anchor grows depth only here"):
        run(_text("llama", layers=(1, 1), widths=(1, 2), arms=("random",)), tmp_path / "b")
    # x1.25 of 2 heads of 8 is no whole number of heads: found by the dry run, by stage.
    with pytest.raises(ValueError, match=r"arm stable, growth 1 .*20 is not 2 heads of 8"):
        run(_text("llama", layers=(1, 1), widths=(1, 1.25)), tmp_path / "c")
    assert not any(tmp_path.iterdir())  # nothing written, nothing trained


def test_cosine_schedule_decays_to_zero_over_the_budget():
    assert lr_factor("constant", 0, 10, 0.0) == pytest.approx(0.1)
    assert lr_factor("constant", 50, 10, 0.9) == 1.0
    assert lr_factor("cosine", 50, 10, 0.5) == pytest.approx(0.5)
    assert lr_factor("cosine", 500, 10, 1.0) == pytest.approx(0.0)
    assert lr_factor("cosine", 500, 10, 0.0) == 1.0


def test_cnn_cell_runs_and_scores_accuracy(tmp_path):
    summary = run(_cnn(), tmp_path)
    assert summary["stable"]["seeds"] == 1
    assert 0.0 <= summary["stable"]["final_acc"][0] <= 1.0
    text = (tmp_path / "progressive.md").read_text()
    assert "(cnn)" in text and "final accuracy" in text


def test_cli_refuses_a_bad_cell_before_training(tmp_path, capsys):
    from stablemorph.cli import main

    out = tmp_path / "out"
    code = main(["progressive", "--task", "cnn", "--dataset", "digits", "--layers", "2", "4",
                 "--stages", "0.3", "--timing", "--arms", "scratch", "stack", "--out", str(out)])
    assert code == 2
    assert "task cnn: no ['stack'] anchor (it has ['random'])" in capsys.readouterr().err
    assert not out.exists()
