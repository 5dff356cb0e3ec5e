"""Growth during training: in place, on a schedule or a plateau, with the optimiser carried."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import stablemorph as sm
from stablemorph.progressive import (
    GrowthError,
    GrowthSchedule,
    PlateauTrigger,
    ProgressiveGrowth,
    grow_in_place,
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3))


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> float:
    x, y = _batch(seed)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def test_grow_in_place_keeps_objects_function_and_state():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    for s in range(4):
        _train_step(model, opt, s)
        sched.step()
    x, _ = _batch(99)
    before = model(x).detach()
    momentum = opt.state[model[4].weight]["momentum_buffer"].clone()
    n_before = sum(p.numel() for p in model.parameters())

    same = grow_in_place(model, {"op": "deepen", "target": "2", "inputs": x}, opt, sched)

    assert same is model
    assert sum(p.numel() for p in model.parameters()) > n_before
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    torch.testing.assert_close(opt.state[model[4].weight]["momentum_buffer"], momentum)
    assert sm.history(model)[-1].op == "deepen"
    lr = opt.param_groups[0]["lr"]
    for s in (5, 6):  # training goes on with the same objects; the scheduler still drives it
        _train_step(model, opt, s)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr * 0.5)


def test_failed_growth_changes_nothing():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train_step(model, opt, 0)
    state = copy.deepcopy(model.state_dict())
    groups = [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(sm.MorphError, match="nope"):
        grow_in_place(model, {"op": "deepen", "target": "nope"}, opt)
    assert [list(g["params"]) for g in opt.param_groups] == groups
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_schedule_refuses_bad_input_before_training():
    with pytest.raises(GrowthError, match="strictly increasing"):
        GrowthSchedule([(10, {"layers": 4}), (5, {"layers": 8})])
    with pytest.raises(GrowthError, match="layers=3 does not grow past the previous stage's 4"):
        GrowthSchedule([(10, {"layers": 4}), (20, {"layers": 3})])
    with pytest.raises(GrowthError, match="unknown keys"):
        GrowthSchedule([(10, {"depth": 4})]).check(_mlp())
    model = _mlp()
    state = copy.deepcopy(model.state_dict())
    schedule = GrowthSchedule([(5, {"op": "deepen", "target": "2"}),
                               (9, {"op": "widen", "target": "7", "width": 20})])
    with pytest.raises(GrowthError, match=r"stage 1 \(step 9\): the model cannot take"):
        schedule.check(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_plateau_trigger_fires_in_order():
    first, second = {"op": "deepen", "target": "2"}, {"op": "deepen", "target": "0"}
    trigger = PlateauTrigger([first, second], patience=2, min_delta=0.01)
    fired = [trigger.observe(v) for v in (1.0, 0.9, 0.899, 0.898, 0.8, 0.8, 0.8)]
    assert fired == [None, None, None, first, None, None, second]
    with pytest.raises(GrowthError, match="patience"):
        PlateauTrigger([first], patience=0)


def test_loop_grows_on_schedule_and_loss_is_continuous():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = _batch(123)
    grower = ProgressiveGrowth(GrowthSchedule([
        (3, {"op": "deepen", "target": "2", "inputs": x}),
        (6, {"op": "widen", "target": "0", "width": 24, "inputs": x}),
    ]))
    grower.check(model)
    for step in range(1, 9):
        _train_step(model, opt, step)
        with torch.no_grad():
            before = nn.functional.cross_entropy(model(x), y)
        model = grower.step(step, model, opt)
        with torch.no_grad():
            after = nn.functional.cross_entropy(model(x), y)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert [(e.step, e.records[0].op) for e in grower.events] == [(3, "deepen"), (6, "widen")]
    assert grower.events[1].params_after > grower.events[0].params_after


def test_ddp_model_is_rewrapped(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdv", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(_mlp())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        _train_step(model, opt, 0)
        x, _ = _batch(7)
        before = model(x).detach()
        grown = grow_in_place(model, {"op": "deepen", "target": "2", "inputs": x}, opt)
        assert isinstance(grown, nn.parallel.DistributedDataParallel)
        assert grown.module is model.module
        torch.testing.assert_close(grown(x), before, rtol=1e-5, atol=1e-6)
        _train_step(grown, opt, 1)
    finally:
        dist.destroy_process_group()


def test_readme_growing_while_training_runs_as_written(capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Growing while training", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    scope: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), scope)  # our own README
    printed = capsys.readouterr().out.strip()
    assert printed in section  # the output the README quotes
    events = scope["grower"].events  # type: ignore[attr-defined]
    assert [e.step for e in events] == [50, 100]
