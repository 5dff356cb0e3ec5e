"""The parent's module calls replayed in the child's check (stablemorph.replay): the same
deviations as a full run, and no replay wherever the module, its input or the parent differ."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from stablemorph import replay
from stablemorph.morphs import deepen
from stablemorph.record import last_report
from stablemorph.verify import compare, reference

torch.set_num_threads(1)


def _net(inplace: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace)),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace)),
        nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _deviations(report: object) -> list[tuple[str, str, float, float]]:
    return [(t.mode, t.path, t.max_abs, t.max_rel) for t in report.tensors]


@pytest.mark.parametrize(("inplace", "dtype"), [(False, torch.float32), (True, torch.float32),
                                               (False, torch.float64)])
def test_a_replayed_check_measures_what_a_full_run_measures(inplace: bool, dtype: torch.dtype,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    model, x = _net(inplace).to(dtype), X.to(dtype)
    child = deepen(model, "0.0", kernel_size=3, inputs=x)
    grand = deepen(child, "2", kernel_size=3, inputs=x)
    replayed = last_report(grand)
    assert any("answered from the parent's run" in n for n in replayed.notes)
    monkeypatch.setattr(replay, "MAX_ELEMENTS", 0)  # nothing kept: every call runs
    child = deepen(model, "0.0", kernel_size=3, inputs=x)
    full = last_report(deepen(child, "2", kernel_size=3, inputs=x))
    assert not any("answered from the parent's run" in n for n in full.notes)
    assert (replayed.max_abs, replayed.max_rel) == (full.max_abs, full.max_rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_replayed_modules_are_those_before_the_change(dtype: torch.dtype) -> None:
    model = _net().to(dtype)
    x = X.to(dtype)
    ref = reference(model, x)
    child = copy.deepcopy(model)
    child[2] = nn.Conv2d(8, 8, 3, padding=1, dtype=dtype)
    plan = replay.Plan(model, child, ref.probe)
    assert plan.paths == ["0", "1", "2", "3", "4", "5"]  # alike; values checked when called
    with plan.mode("eval"), torch.no_grad():
        child.eval()
        child(x)
    assert plan.hits == {"0", "1"}  # "2" holds other weights, those after see other inputs
    report = compare(ref, child, model)
    assert report.replayed == 4  # "0", "1" in eval and train; those after see other inputs
    assert _deviations(report) == _deviations(compare(ref, child))


def _changed(model: nn.Module, how: str) -> nn.Module:
    child = copy.deepcopy(model)
    with torch.no_grad():
        if how == "attribute":
            child[0][1].eps = 0.5  # no parameter changes, the output does
        elif how == "parameter":
            child[0][0].weight[0, 0, 0, 0] += 0.1
        elif how == "buffer":
            child[0][1].running_mean += 0.1
        elif how == "hook":
            child[0][2].register_forward_hook(lambda m, a, out: out * 2)
    return child


@pytest.mark.parametrize("how", ["attribute", "parameter", "buffer", "hook"])
def test_a_changed_module_is_never_replayed(how: str) -> None:
    model = _net()
    ref = reference(model, X)
    child = _changed(model, how)
    report = compare(ref, child, model)
    assert report.max_rel > 1e-5  # the change is seen
    assert _deviations(report) == _deviations(compare(ref, child))
    plan = replay.Plan(model, child, ref.probe)
    with plan.mode("eval"):
        child.eval()
        child(X)
    assert plan.replayed > 0 or how != "attribute"  # the conv before the changed norm
    changed = {"attribute": "0.1", "parameter": "0.0", "buffer": "0.1", "hook": "0.2"}[how]
    assert not plan.hits & {"0", changed}


def test_no_replay_from_a_parent_changed_since_or_on_another_probe() -> None:
    model = _net()
    ref = reference(model, X)
    child = copy.deepcopy(model)
    assert compare(ref, child, model).replayed > 0
    other = reference(model, X + 1)  # records the other probe's run: none for X
    assert replay.Plan(model, child, ref.probe).paths == []
    assert compare(other, child, model).replayed > 0
    replay.forget(model)
    assert replay.Plan(model, child, other.probe).paths == []
    reference(model, X)
    assert replay.Plan(model, child, ref.probe).paths != []
    with torch.no_grad():
        model[0][0].weight.add_(0.0)  # an in-place write: the records are stale
    assert replay.Plan(model, child, ref.probe).paths == []


class Noise(nn.Module):
    """Adds random noise in train mode (draws from the global generator)."""

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.1 * torch.randn_like(x) if self.training else x


def test_a_module_drawing_random_numbers_falls_back_to_a_full_run() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Noise(), nn.Conv2d(8, 8, 3, padding=1),
                          Noise(), nn.Flatten(), nn.Linear(8 * 64, 4))
    ref = reference(model, X)
    child = copy.deepcopy(model)
    with torch.no_grad():
        child[2].weight.mul_(1 + 1e-6)  # "3" then sees another input and draws its own noise
    # replaying "1" skips its draw in train mode: the noise of "3" differs from the parent's
    replayed = compare(ref, child, model)
    assert replayed.replayed > 0 and replayed.per_mode["train"][1] > 1e-3
    assert compare(ref, child).per_mode["train"][1] < 1e-4
    # a morph re-runs such a miss without replay before judging it
    report = last_report(deepen(model, "2", kernel_size=3, inputs=X))
    assert report.max_rel < 1e-5


def test_a_run_over_the_limit_lets_go_of_its_records(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _net()
    monkeypatch.setattr(replay, "MAX_ELEMENTS", 2000)  # less than one activation of "0"
    recorder = replay.Recorder(model)
    with recorder.mode("eval"), torch.no_grad():
        model.eval()
        model(X)
    assert recorder.full and recorder.calls == {"eval": {}}
    recorder.keep((X,))
    assert replay.Plan(model, copy.deepcopy(model), (X,)).paths == []
