"""The stability experiment end to end on the embedded digits, at a tiny size."""

import json
from pathlib import Path

import pytest

from stablemorph.experiment.report import write_report
from stablemorph.experiment.stability import (
    Arm,
    Experiment,
    ExperimentConfig,
    ExperimentError,
    summarise,
)


def tiny(**overrides: object) -> ExperimentConfig:
    cfg = ExperimentConfig(
        dataset="digits",
        model_kwargs={"widths": [4, 8]},
        seeds=1,
        parent_steps=30,
        child_steps=12,
        dense_until=6,
        dense_every=3,
        every=6,
        drop_window=6,
        threads=1,
        batch_size=32,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, Path, list[Arm]]:
    out = tmp_path_factory.mktemp("exp")
    cfg = tiny()
    arms = Experiment(cfg, out, progress=False, log=lambda _: None).run()
    return cfg, out, arms


def test_every_arm_runs_and_children_start_at_the_parent(finished: tuple) -> None:
    cfg, _, arms = finished
    names = {(a.regime, a.arm) for a in arms}
    assert names == {(r, a) for r in cfg.regimes for a in [*cfg.schemes, *cfg.baselines]}
    for a in arms:
        steps = [r["step"] for r in a.records]
        assert steps[0] == 0 and steps[-1] == cfg.child_steps
        if a.arm != "scratch":
            assert a.records[0]["test_acc"] == pytest.approx(a.parent_acc, abs=1 / 360 + 1e-9)
            assert a.records[0]["test_loss"] == pytest.approx(a.parent_loss, rel=1e-4)
    zeros = {a.arm: a.zero_fraction for a in arms if a.arm in cfg.schemes}
    assert zeros["stable"] == 0.0
    assert zeros["net2net"] > 0.3 and zeros["netmorph"] > 0.3


def test_resume_reuses_finished_runs(finished: tuple) -> None:
    cfg, out, arms = finished
    again = Experiment(cfg, out, progress=False, log=lambda _: None).run()
    assert [a.records for a in again] == [a.records for a in arms]


def test_a_different_experiment_in_the_same_folder_is_refused(finished: tuple) -> None:
    _, out, _ = finished
    with pytest.raises(
        ExperimentError, match=r"holds a different experiment \(differs in \['seeds'\]\)"
    ):
        Experiment(tiny(seeds=2), out, progress=False)


def test_report_plot_and_curves_are_written(finished: tuple) -> None:
    cfg, out, arms = finished
    report = write_report(arms, cfg, out, "stablemorph experiment ...", "digits")
    text = report.read_text()
    assert "| same | stable |" in text and "| raised | scratch |" in text
    assert (out / "curves.png").stat().st_size > 10_000
    rows = (out / "curves.csv").read_text().splitlines()
    assert rows[0].startswith("seed,regime,arm,step,test_acc")
    assert len(rows) == 1 + sum(len(a.records) for a in arms)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {f"{r}/{a}" for r in cfg.regimes for a in [*cfg.schemes, *cfg.baselines]}


def test_summarise_drop_and_recovery() -> None:
    records = [
        {"step": s, "test_acc": acc, "test_loss": loss}
        for s, acc, loss in [
            (0, 0.9, 0.3),
            (10, 0.7, 0.9),
            (20, 0.85, 0.5),
            (30, 0.91, 0.29),
            (40, 0.92, 0.28),
        ]
    ]
    arm = Arm(0, "raised", "stable", records, 0.9, 0.3, 0.0, 1.0)
    s = summarise(arm, window=20)
    assert s["drop"] == pytest.approx(0.2)
    assert s["loss_rise"] == pytest.approx(0.6)
    assert s["recover"] == 30
    assert s["final_acc"] == 0.92
    never = Arm(0, "raised", "x", records[:3], 0.9, 0.3, None, 1.0)
    assert summarise(never, window=20)["recover"] is None


def test_unknown_regime_is_an_error() -> None:
    with pytest.raises(ExperimentError, match="unknown learning-rate regime 'huge'"):
        tiny().lr_after("huge")


def test_ddp_arms_match_single_process(tmp_path: Path) -> None:
    """--nproc 2 trains each arm with two gloo processes on the same global batches: the
    curves equal the single-process ones (an MLP: no BatchNorm, whose statistics are per rank)."""
    curves = {}
    for nproc in (1, 2):
        cfg = tiny(model="mlp", model_kwargs={"hidden": [16, 16]}, morph_kwargs={},
                   schemes=["stable"], baselines=["parent"], regimes=["raised"], nproc=nproc)
        arms = Experiment(cfg, tmp_path / str(nproc), progress=False, log=lambda _: None).run()
        curves[nproc] = {a.arm: [r["test_loss"] for r in a.records] for a in arms}
    assert curves[1].keys() == curves[2].keys() == {"stable", "parent"}
    for arm in curves[1]:
        assert curves[2][arm] == pytest.approx(curves[1][arm], rel=1e-5)


def test_a_folder_from_before_a_new_config_field_resumes(tmp_path: Path) -> None:
    cfg = tiny(schemes=["net2net"], baselines=[], regimes=["same"])
    Experiment(cfg, tmp_path, progress=False, log=lambda _: None)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["nproc"]  # written by an older version
    (tmp_path / "config.json").write_text(json.dumps(saved))
    Experiment(cfg, tmp_path, progress=False, log=lambda _: None)  # no error
    with pytest.raises(ExperimentError, match=r"differs in \['nproc'\]"):
        Experiment(tiny(schemes=["net2net"], baselines=[], regimes=["same"], nproc=2), tmp_path)


def test_arms_do_not_share_optimiser_state(tmp_path: Path) -> None:
    """The raised-lr parent arm is the same whether or not the same-lr arm ran before it
    (regression: a shared momentum buffer leaked one arm's steps into the next)."""
    curves = {}
    for regimes in (["same", "raised"], ["raised"]):
        cfg = tiny(schemes=["net2net"], baselines=["parent"], regimes=regimes)
        arms = Experiment(cfg, tmp_path / "_".join(regimes), progress=False,
                          log=lambda _: None).run()
        curves[len(regimes)] = {a.arm: [(r["test_acc"], r["test_loss"]) for r in a.records]
                                for a in arms if a.regime == "raised"}
    assert curves[2] == curves[1]
