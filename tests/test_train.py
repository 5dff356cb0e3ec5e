"""The training loop: batches as a pure function of (seed, step), exact resumption,
determinism, schedules and evaluation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from stablemorph.experiment.data import Dataset, load_dataset
from stablemorph.experiment.train import (
    TrainConfig,
    batch_indices,
    eval_schedule,
    evaluate,
    lr_factor,
    make_optimizer,
    make_scheduler,
    seed_everything,
    steps_per_epoch,
    train,
)
from stablemorph.zoo import build_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", limit_train=400, limit_test=200)


def small_cnn() -> nn.Module:
    return build_model("cnn", widths=(4, 8), image_size=8)


def run(
    data: Dataset, cfg: TrainConfig, steps: int, **kwargs
) -> tuple[nn.Module, torch.optim.Optimizer, list[dict]]:
    seed_everything(cfg.seed)
    model = small_cnn()
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps)
    records = train(
        model, data, opt, steps=steps, seed=cfg.seed, batch_size=cfg.batch_size,
        scheduler=sched, **kwargs,
    )  # fmt: skip
    return model, opt, records


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_batch_indices_are_a_pure_function_of_seed_and_step() -> None:
    a = batch_indices(100, 32, seed=5, step=7)
    torch.testing.assert_close(a, batch_indices(100, 32, seed=5, step=7), rtol=0, atol=0)
    assert a.dtype == torch.int64 and a.shape == (32,)
    assert not torch.equal(a, batch_indices(100, 32, seed=6, step=7))
    # one epoch = 3 full batches of 32 out of 100: disjoint, drawn from one permutation
    epoch = torch.cat([batch_indices(100, 32, 5, s) for s in range(3)])
    assert epoch.unique().numel() == 96 and int(epoch.max()) < 100
    assert steps_per_epoch(100, 32) == 3
    # the next epoch is another permutation
    assert not torch.equal(batch_indices(100, 32, 5, 3), batch_indices(100, 32, 5, 0))
    # mutating a returned batch does not change later answers
    a.zero_()
    assert not torch.equal(batch_indices(100, 32, 5, 7), a)
    assert batch_indices(10, 32, 0, 4).shape == (10,)  # a batch larger than the data
    with pytest.raises(ValueError, match=r"step >= 0; got 100, 32, 5, -1"):
        batch_indices(100, 32, 5, -1)


def test_same_seed_gives_identical_records(digits: Dataset) -> None:
    cfg = TrainConfig(optimizer="sgd", lr=0.05, batch_size=32, schedule="cosine", seed=3)
    model_a, _, rec_a = run(digits, cfg, 30, eval_steps=[0, 10, 30])
    model_b, _, rec_b = run(digits, cfg, 30, eval_steps=[0, 10, 30])
    assert without_time(rec_a) == without_time(rec_b)
    for (name, a), b in zip(
        model_a.state_dict().items(), model_b.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [r["step"] for r in rec_a] == [0, 10, 30]
    assert rec_a[0]["train_loss"] is None and rec_a[1]["train_loss"] > 0
    assert rec_a[-1]["test_acc"] > rec_a[0]["test_acc"]  # it does learn
    _, _, rec_c = run(digits, TrainConfig(lr=0.05, batch_size=32, seed=4), 30, eval_steps=[30])
    assert rec_c[0]["test_loss"] != rec_a[-1]["test_loss"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_split_run_equals_unsplit_run(digits: Dataset, optimizer: str) -> None:
    cfg = TrainConfig(
        optimizer=optimizer, lr=0.01, weight_decay=1e-4, batch_size=64, schedule="cosine",
        warmup_steps=3, seed=1,
    )  # fmt: skip
    steps, k = 20, 8  # 400 / 64 = 6 steps an epoch: the split falls inside epoch 1
    schedule = [0, 4, 8, 12, 20]
    full_model, _, full_records = run(digits, cfg, steps, eval_steps=schedule)

    # the first part: the same schedule (built for `steps`), stopped after k steps
    seed_everything(cfg.seed)
    first_model = small_cnn()
    first_opt = make_optimizer(first_model, cfg)
    first_sched = make_scheduler(first_opt, cfg, steps)
    first_records = train(
        first_model, digits, first_opt, steps=k, seed=cfg.seed, batch_size=cfg.batch_size,
        scheduler=first_sched, eval_steps=schedule,
    )  # fmt: skip
    saved = (
        copy.deepcopy(first_model.state_dict()),
        copy.deepcopy(first_opt.state_dict()),
        copy.deepcopy(first_sched.state_dict()),
    )

    seed_everything(123)  # a different global RNG state must not matter
    model = small_cnn()
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps)
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    sched.load_state_dict(saved[2])
    rest = train(
        model, digits, opt, steps=steps, start_step=k, seed=cfg.seed,
        batch_size=cfg.batch_size, scheduler=sched, eval_steps=schedule,
    )  # fmt: skip

    assert without_time(first_records + rest) == without_time(full_records)
    assert [r["step"] for r in first_records] == [0, 4, 8]
    assert [r["step"] for r in rest] == [12, 20]
    for (name, a), b in zip(
        full_model.state_dict().items(), model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_resume_fixes_the_rate_a_new_scheduler_resets(digits: Dataset) -> None:
    """Loading the optimiser before creating the scheduler resets the rate to step 0's;
    train() takes the loaded scheduler's rate instead, so the resumed step is exact."""
    cfg = TrainConfig(lr=0.1, batch_size=64, schedule="step", milestones=(0.25,), seed=0)
    full_model, _, _ = run(digits, cfg, 5)

    seed_everything(cfg.seed)
    model = small_cnn()
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, 5)
    train(model, digits, opt, steps=4, seed=0, batch_size=64, scheduler=sched)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))

    resumed = small_cnn()
    resumed.load_state_dict(saved[0])
    opt2 = make_optimizer(resumed, cfg)
    opt2.load_state_dict(saved[1])
    sched2 = make_scheduler(opt2, cfg, 5)  # the trap: resets the rate to lr * factor(0)
    sched2.load_state_dict(saved[2])
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1)
    train(resumed, digits, opt2, steps=5, start_step=4, seed=0, batch_size=64, scheduler=sched2)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01)
    for (name, a), b in zip(
        full_model.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_after_step_and_on_eval_are_called(digits: Dataset) -> None:
    calls: list[int] = []
    seen: list[dict] = []
    cfg = TrainConfig(batch_size=32)
    _, _, records = run(
        digits, cfg, 7, eval_steps=[0, 3, 7, 99], after_step=lambda m: calls.append(1),
        on_eval=seen.append,
    )  # fmt: skip
    assert len(calls) == 7
    assert seen == records and [r["step"] for r in records] == [0, 3, 7]
    assert set(records[0]) == {"step", "test_acc", "test_loss", "train_loss", "lr", "seconds"}
    assert records[2]["seconds"] >= records[1]["seconds"] >= 0


def test_after_step_can_clamp_parameters(digits: Dataset) -> None:
    def clamp(model: nn.Module) -> None:
        with torch.no_grad():
            model.classifier.bias.clamp_(0.0, 0.001)

    cfg = TrainConfig(lr=0.5, batch_size=32)
    model, _, _ = run(digits, cfg, 5, after_step=clamp)
    bias = model.classifier.bias.detach()
    assert bool((bias >= 0).all()) and bool((bias <= torch.tensor(0.001)).all())


def test_lr_schedules() -> None:
    cosine = TrainConfig(schedule="cosine", warmup_steps=4)
    assert lr_factor(cosine, 0, 100) == pytest.approx(0.25 * 0.5 * (1 + math.cos(0)))
    assert lr_factor(cosine, 50, 100) == pytest.approx(0.5)
    assert lr_factor(cosine, 100, 100) == pytest.approx(0.0)
    step = TrainConfig(schedule="step", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_factor(step, s, 100) for s in (49, 50, 75)] == pytest.approx([1, 0.1, 0.01])
    assert lr_factor(TrainConfig(), 1000, 10) == 1.0
    model = nn.Linear(2, 2)
    opt = make_optimizer(model, TrainConfig(schedule="cosine", lr=0.2))
    sched = make_scheduler(opt, TrainConfig(schedule="cosine", lr=0.2), 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.2 * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)]
    assert lrs == pytest.approx(expected)


def test_optimizers() -> None:
    model = nn.Linear(3, 2)
    sgd = make_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1, momentum=0.8))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8
    adamw = make_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.01))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.01
    assert isinstance(make_optimizer(model, TrainConfig(optimizer="adam")), torch.optim.Adam)
    model.weight.requires_grad_(False)
    assert make_optimizer(model, TrainConfig()).param_groups[0]["params"] == [model.bias]


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"optimizer must be one of .*'rmsprop'"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match=r"schedule must be one of .*'linear'"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match=r"lr must be positive, got 0"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match=r"milestones must be fractions"):
        TrainConfig(milestones=(0.5, 2))


def test_bad_train_arguments_leave_the_model_untouched(digits: Dataset) -> None:
    model = small_cnn().eval()
    before = copy.deepcopy(model.state_dict())
    opt = make_optimizer(model, TrainConfig())
    other = make_optimizer(model, TrainConfig())
    with pytest.raises(ValueError, match=r"need 0 <= start_step <= steps, got start_step=5"):
        train(model, digits, opt, steps=3, start_step=5, seed=0, batch_size=8)
    with pytest.raises(ValueError, match=r"scheduler drives a different optimizer"):
        train(model, digits, opt, steps=3, seed=0, batch_size=8,
              scheduler=make_scheduler(other, TrainConfig(), 3))  # fmt: skip
    with pytest.raises(ValueError, match=r"scheduler is at step 0 but training starts at step 2"):
        train(model, digits, opt, steps=3, start_step=2, seed=0, batch_size=8,
              scheduler=make_scheduler(opt, TrainConfig(), 3))  # fmt: skip
    assert not model.training
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)


def test_evaluate_restores_modes_and_matches_a_direct_computation(digits: Dataset) -> None:
    model = small_cnn()
    model.train()
    model.features.bn1.eval()  # a mixed state must survive
    x, y = digits.x_test[:50], digits.y_test[:50]
    acc, loss = evaluate(model, x, y, batch_size=16)
    assert model.training and not model.features.bn1.training and model.features.bn2.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"need as many labels as inputs"):
        evaluate(model, x, y[:3])


def test_eval_schedule() -> None:
    assert eval_schedule(55, dense_until=20, dense_every=5, every=15) == [
        0, 5, 10, 15, 20, 30, 45, 55,
    ]  # fmt: skip
    assert eval_schedule(12, dense_until=300, dense_every=10) == [0, 10, 12]
    full = eval_schedule(1000)
    assert full[:3] == [0, 10, 20] and 300 in full and 310 not in full
    assert full[-3:] == [800, 900, 1000]
    with pytest.raises(ValueError, match=r"dense_every >= 1"):
        eval_schedule(10, dense_every=0)


def test_progress_bar_runs(digits: Dataset, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, records = run(digits, TrainConfig(batch_size=32), 3, eval_steps=[3], progress="arm")
    assert len(records) == 1
    assert "arm" in capsys.readouterr().err
