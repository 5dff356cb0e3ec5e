"""The progressive-growth benchmark's machinery on a tiny configuration."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stablemorph.experiment.progressive import (
    ProgressiveConfig,
    random_blocks,
    run,
    stack_blocks,
)
from stablemorph.experiment.progressive_tasks import Stage, make_task
from stablemorph.transformer.model import GPT


def _tiny(**kw) -> ProgressiveConfig:
    base = dict(d_model=16, n_head=2, block_size=16, batch_size=4, layers=(1, 2, 4),
                budget_steps=30, stage_fractions=(0.2, 0.4), timing=((0.5, 0.7),),
                warmup_steps=5, eval_every=5, eval_windows=8, spike_window=10, seeds=(0,),
                max_chars=30_000, arms=("scratch", "stable", "stack", "random", "plateau"))
    return ProgressiveConfig(**{**base, **kw})


def test_run_writes_report_and_spends_the_same_budget(tmp_path):
    summary = run(_tiny(), tmp_path, command="stablemorph progressive ...")
    assert {"scratch", "stable", "stack", "random", "plateau", "stable@0.5,0.7"} <= set(summary)
    text = (tmp_path / "progressive.md").read_text()
    assert "| stable |" in text and "stablemorph progressive ..." in text
    assert (tmp_path / "progressive.png").stat().st_size > 0
    import json

    runs = json.loads((tmp_path / "progressive.json").read_text())["runs"]
    budget = runs["scratch/0"]["points"][-1][1]
    for key, curve in runs.items():
        flops = curve["points"][-1][1]
        assert budget <= flops < budget * 1.1, key  # every arm stops at the same budget
    assert [n for _, n in runs["stable/0"]["growths"]] == ["2L x1", "4L x1"]
    # Exact growth: the loss at the growth step is the loss just before it.
    assert summary["stable"]["spike"][0] >= 0.0
    again = run(_tiny(), tmp_path)  # resumed: nothing re-run, same summary
    assert again["stable"]["final"] == summary["stable"]["final"]
    ran: list[str] = []
    more = run(_tiny(arms=("scratch", "stable", "net2net")), tmp_path, log=ran.append)
    assert [line.split(":")[0] for line in ran] == ["net2net/0"]  # only the new arm trains
    assert more["stable"]["final"] == summary["stable"]["final"]
    assert "stack" not in more


def test_anchors_are_not_exact_but_keep_the_parent_blocks():
    torch.manual_seed(0)
    cfg = _tiny()
    parent = GPT(make_task(dataclasses.replace(cfg, layers=(2, 4), stage_fractions=(0.2,),
                                               timing=()))
                 .config(Stage(2, 1.0)))
    x = torch.randint(0, 97, (2, 16))
    stacked = stack_blocks(parent, 4)
    torch.testing.assert_close(stacked.blocks[2].attn.q.weight, parent.blocks[0].attn.q.weight)
    rand = random_blocks(parent, 4, seed=1)
    assert not torch.allclose(rand(x), parent(x))
    with pytest.raises(ValueError, match="not a multiple"):
        stack_blocks(parent, 5)


def test_config_refuses_bad_schedules():
    with pytest.raises(ValueError, match="layers must grow"):
        _tiny(layers=(4, 2))
    with pytest.raises(ValueError, match="stage fractions"):
        _tiny(stage_fractions=(0.4, 0.2))
    with pytest.raises(ValueError, match="budget_steps must be >= 1, got 0"):
        _tiny(budget_steps=0)


def test_short_runs_spend_their_fraction_of_the_budget(tmp_path):
    cfg = _tiny(arms=("scratch", "stable"), timing=(), budget_fractions=(0.5,),
                short_arms=("scratch", "stable"), lr_schedule="cosine")
    summary = run(cfg, tmp_path)
    assert {"scratch~0.5", "stable~0.5"} <= set(summary)
    import json

    runs = json.loads((tmp_path / "progressive.json").read_text())["runs"]
    full = runs["scratch/0"]["points"][-1][1]
    for arm in ("scratch~0.5", "stable~0.5"):
        assert 0.5 * full <= runs[f"{arm}/0"]["points"][-1][1] < 0.6 * full, arm
    assert runs["scratch~0.5/0"]["points"][-1][0] == 15
    assert [s for s, _ in runs["stable~0.5/0"]["growths"]] == [3, 6]  # stages scaled too
    with pytest.raises(ValueError, match=r"short arms \['plateau'\] are not among"):
        _tiny(arms=("scratch",), timing=(), budget_fractions=(0.5,))


def test_the_loop_keeps_the_step_rules_multipliers(monkeypatch):
    """The loop sets one rate per step; the groups transfer_optimizer adds for the stable
    scheme's new blocks keep their multiplier (``lr_scale``) on top of it."""
    from stablemorph.experiment.progressive import run_arm
    from stablemorph.flops import FlopMeter

    seen: list[list[tuple[float, float]]] = []
    step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append([(g["lr"], g.get("lr_scale", 1.0)) for g in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    cfg = _tiny(arms=("stable",))
    task = make_task(cfg)
    x, _ = task.batch(0, 0)
    budget = FlopMeter().per_step(task.build(0, final=True), x) * cfg.budget_steps
    run_arm(cfg, task, "stable", 0, budget)
    scaled = [groups for groups in seen if any(s != 1.0 for _, s in groups)]
    assert scaled, "no multiplier group after the growths"
    for groups in scaled:
        rate = groups[0][0]
        assert rate > 0
        assert [lr for lr, _ in groups] == pytest.approx([rate * s for _, s in groups])
