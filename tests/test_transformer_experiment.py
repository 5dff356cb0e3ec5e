"""The growth experiment end to end, at toy size (seconds)."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from stablemorph.transformer.experiment import (
    GPTExperimentConfig,
    child_eval_steps,
    main,
    run_gpt_experiment,
)
from stablemorph.transformer.train import OptimConfig

TOY = GPTExperimentConfig(d_model=8, n_head=2, head_dim=4, d_mlp=16, block_size=8,
                          max_chars=40_000, val_windows=4, eval_every=2, rise_window=2,
                          optim=OptimConfig(warmup_steps=2, batch_size=4))


def test_toy_run_writes_report_plot_and_data(tmp_path: Path) -> None:
    report = run_gpt_experiment(tmp_path, parent_steps=4, child_steps=3, seeds=(0,),
                                widths=(2.0, 1.5), config=TOY, command="toy", progress=False)
    assert report == tmp_path / "transformer.md"
    for name in ("transformer.png", "transformer_curves.csv", "transformer_summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    text = report.read_text()
    assert "Command: `toy`" in text and "![validation loss against step](transformer.png)" in text
    assert "net2net x1.5: grow_d_model: scheme 'net2net' is exact" in text

    data = json.loads((tmp_path / "transformer_summary.json").read_text())
    arms = {(e["width"], e["arm"]) for e in data["summary"]}
    assert arms == {(None, "trained on"), (2.0, "net2net"), (2.0, "netmorph"), (2.0, "stable"),
                    (2.0, "stable-full"), (2.0, "scratch"), (1.5, "stable"),
                    (1.5, "stable-full"), (1.5, "scratch")}
    assert set(data["skipped"]) == {"net2net x1.5", "netmorph x1.5"}
    for e in data["summary"]:
        if e["arm"] == "scratch":  # the same steps cost more than parent + child steps
            assert e["tflop"] > e["grown_tflop"] and e["equal_compute_step"] < 7
    full = {g["op"]: g for g in data["growths"] if g["arm"] == "stable-full"}
    assert full.keys() == {"grow_mlp", "grow_heads", "grow_d_model", "insert_block"}
    assert all(g["max_rel"] <= 1e-5 for g in data["growths"])
    # Exact growth: every child starts from the parent's validation loss.
    at_growth = {e["arm"]: e["at_growth"] for e in data["summary"] if "at_growth" in e}
    for arm, value in at_growth.items():
        assert value == pytest.approx(at_growth["trained on"], rel=1e-5), arm

    with (tmp_path / "transformer_curves.csv").open() as f:
        rows = list(csv.DictReader(f))
    scratch = [r for r in rows if r["arm"] == "scratch" and r["width"] == "2.0"]
    assert int(scratch[-1]["total_step"]) == 7
    assert {r["step"] for r in rows if r["arm"] == "stable"} == {"0", "1", "2", "3"}


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--parent-steps", "2", "--child-steps", "1",
                 "--seeds", "0", "--widths", "2", "--arms", "stable", "--d-model", "8",
                 "--block-size", "8", "--batch-size", "2", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "transformer.md")
    text = (tmp_path / "transformer.md").read_text()
    assert "python -m stablemorph.transformer.experiment --out" in text


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"unknown arms \['copy'\]"):
        run_gpt_experiment("unused", arms=("copy",), config=TOY)
    with pytest.raises(ValueError, match="need parent_steps >= 1"):
        run_gpt_experiment("unused", parent_steps=0, config=TOY)


def test_eval_steps_are_dense_after_growth() -> None:
    assert child_eval_steps(120, 50) == [0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40,
                                         50, 100, 120]
    assert child_eval_steps(3, 2) == [0, 1, 2, 3]
    assert replace(TOY, d_model=16).child_sizes(1.5) == {"d_model": 24, "n_head": 3,
                                                         "d_mlp": 24, "n_layer": 4}
