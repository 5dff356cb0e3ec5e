"""benchmarks/stability_matrix.py: the report is rebuilt from run folders, falling back to the
committed JSON per cell, and judges each cell under the issue's test and the excess view."""

import importlib.util
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from stablemorph.experiment.stability import Arm

_SPEC = importlib.util.spec_from_file_location(
    "stability_matrix", Path(__file__).parents[1] / "benchmarks" / "stability_matrix.py")
matrix = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(matrix)

CELL = "digits-mlp-widen-sgd"
DROPS = {"stable": 1, "netmorph": 4, "net2net": 3, "netmorph+wlr": 4, "net2net+wlr": 2,
         "parent": 0}  # in units of `unit`


def _cfg():
    return replace(matrix.cells()[CELL][1], seeds=1)


def _arms(cfg, unit: float) -> list[Arm]:
    """One run per regime and arm: accuracy 0.9 at the morph, dipping by DROPS[arm] * unit
    at step 10, back at the end."""
    out = []
    for regime in cfg.regimes:
        for arm in [*cfg.schemes, *cfg.baselines]:
            d = DROPS[arm] * unit
            records = [{"step": 0, "test_acc": 0.9, "test_loss": 0.3},
                       {"step": 10, "test_acc": 0.9 - d, "test_loss": 0.3 + d},
                       {"step": 200, "test_acc": 0.91, "test_loss": 0.29}]
            out.append(Arm(0, regime, arm, records, 0.9, 0.3, 0.0, 1.0))
    return out


def _write_folder(work: Path, cfg, unit: float) -> None:
    folder = work / CELL
    (folder / "runs").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(asdict(cfg)))
    for a in _arms(cfg, unit):
        (folder / "runs" / f"seed0_{a.regime}_{a.arm}.json").write_text(json.dumps(asdict(a)))


def _write_json(results: Path, cfg, unit: float) -> None:
    results.mkdir(parents=True)
    entry = {"config": asdict(cfg), "summary": matrix.cell_summary(cfg, _arms(cfg, unit)),
             "runs": matrix.expected_runs(cfg), "expected": matrix.expected_runs(cfg),
             "source": {"folder": f"runs/stability_matrix/{CELL}", "first_run": "then",
                        "last_run": "later", "read_by_commit": "abc1234", "read_on": "now",
                        "invocations": []}}
    (results / "stability_matrix.json").write_text(
        json.dumps({"format": 2, "cells": {CELL: entry}}))


def _report(tmp_path: Path) -> tuple[int, dict, str]:
    results = tmp_path / "results"
    rc = matrix.main(["--report-only", "--work", str(tmp_path / "work"),
                      "--results", str(results)])
    data = json.loads((results / "stability_matrix.json").read_text())
    return rc, data, (results / "stability_matrix.md").read_text()


def _stable_drop(data: dict) -> float:
    return data["cells"][CELL]["summary"]["raised"]["arms"]["stable"]["0"]["drop"]


def test_missing_folder_falls_back_to_the_committed_json(tmp_path):
    _write_json(tmp_path / "results", _cfg(), unit=0.01)
    rc, data, md = _report(tmp_path)
    assert rc == 0
    assert _stable_drop(data) == pytest.approx(0.01)
    assert data["cells"][CELL]["config"]["seeds"] == 1
    row = next(line for line in md.splitlines() if line.startswith(f"| {CELL} | committed"))
    assert "abc1234" in row and "complete" in row


def test_a_present_folder_wins_over_the_json(tmp_path):
    _write_json(tmp_path / "results", _cfg(), unit=0.01)
    _write_folder(tmp_path / "work", _cfg(), unit=0.02)
    rc, data, md = _report(tmp_path)
    assert rc == 0
    assert _stable_drop(data) == pytest.approx(0.02)
    assert f"| {CELL} | run folder | complete; **ran an older definition** (differs from " \
           "`cells()` now in seeds)" in md
    assert data["cells"][CELL]["source"]["folder"] == str(tmp_path / "work" / CELL)


def test_a_partial_folder_does_not_replace_a_complete_json_entry(tmp_path):
    _write_json(tmp_path / "results", _cfg(), unit=0.01)
    _write_folder(tmp_path / "work", _cfg(), unit=0.02)
    next((tmp_path / "work" / CELL / "runs").glob("*.json")).unlink()
    rc, data, md = _report(tmp_path)
    assert rc == 0
    assert _stable_drop(data) == pytest.approx(0.01)
    assert f"holds only {matrix.expected_runs(_cfg()) - 1} runs and was not used" in md


def test_a_malformed_json_is_refused_by_name(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    path = results / "stability_matrix.json"
    path.write_text("{not json")
    with pytest.raises(matrix.MatrixError, match=r"stability_matrix\.json cannot be read as JSON"):
        matrix.load_results(path, matrix.cells())
    rc = matrix.main(["--report-only", "--work", str(tmp_path / "w"), "--results", str(results)])
    assert rc == 2
    assert str(path) in capsys.readouterr().err
    assert path.read_text() == "{not json"
    path.write_text(json.dumps({"format": 2, "cells": {CELL: {"summary": {"raised": {}},
                                                              "source": {}}}}))
    with pytest.raises(matrix.MatrixError, match=f"cell '{CELL}': not a cell summary"):
        matrix.load_results(path, matrix.cells())


def _regime(stable: float, netmorph: float, net2net: float, parent: float) -> dict:
    arms = {a: {s: {"drop": v + 0.001 * s, "final_acc": 0.9, "final_loss": 0.3}
                for s in range(3)}
            for a, v in (("stable", stable), ("netmorph", netmorph), ("net2net", net2net),
                         ("parent", parent))}
    paired = {b: {"drop": [arms["stable"][s]["drop"] - arms[b][s]["drop"] for s in range(3)]}
              for b in ("netmorph", "net2net", "parent")}
    return {"arms": arms, "paired": paired}


@pytest.mark.parametrize("values, issue, excess, stretch", [
    ((0.044, 0.050, 0.043, 0.037), False, False, True),   # GPT AdamW-like: parent drops too
    ((0.030, 0.060, 0.050, 0.020), False, True, True),    # only the growth's share halved
    ((0.020, 0.060, 0.050, 0.005), True, True, False),    # halved, yet 4x the parent
])
def test_the_two_views_and_the_stretch_goal(values, issue, excess, stretch):
    j = matrix.judge(_regime(*values))
    assert (j["judged"], j["issue"], j["excess"], j["stretch"]) == (True, issue, excess, stretch)
    assert j["excess_ratio"] == pytest.approx((values[0] - values[3]) / (values[2] - values[3]))


def test_stable_worse_beyond_the_paired_spread_is_named():
    j = matrix.judge(_regime(0.05, 0.01, 0.02, 0.0))
    assert set(j["worse"]) == {"netmorph", "net2net"}
    assert matrix.judge(_regime(0.0, 0.0, 0.001, 0.0))["judged"] is False


def test_final_accuracy_behind_beyond_the_paired_spread_is_named():
    regime = _regime(0.02, 0.06, 0.05, 0.01)
    regime["paired"]["netmorph"]["final_acc"] = [-0.004, -0.005, -0.003]  # behind, sd 0.001
    regime["paired"]["net2net"]["final_acc"] = [-0.004, 0.006, -0.005]   # inside its spread
    assert set(matrix.judge(regime)["final_behind"]) == {"netmorph"}
    for per in regime["arms"].values():  # a language model's cell: judged on loss rise
        for run in per.values():
            run["loss_rise"] = run["drop"]
    regime["paired"]["netmorph"]["final_loss"] = [0.01, 0.02, 0.01]  # loss: larger is behind
    assert set(matrix.judge(regime, "loss_rise")["final_behind"]) == {"netmorph"}
    table, _, behind = matrix.tallies({"c": {"summary": {"raised": regime}, "runs": 9,
                                             "expected": 9}})
    assert behind == ["c / raised: stable − netmorph = -0.0040 ± 0.0010 (final_acc)"]
    assert table[-1].startswith("In 0 of the 0 pairs failing the issue's test")
    failing = {"summary": {"raised": _regime(0.04, 0.06, 0.05, 0.035)}, "runs": 9,
               "expected": 9}  # stable 0.041 > 0.5 x 0.051, and so is the parent's 0.036
    table, _, _ = matrix.tallies({"d": failing})
    assert table[-1].startswith("In 1 of the 1 pairs failing the issue's test the parent")


def test_the_readme_table_is_built_from_the_stored_means():
    regime = _regime(0.02, 0.06, 0.05, 0.01)
    regime["arms"]["stable"][0]["final_acc"] = 0.93  # mean 0.91 over the three seeds
    regime["arms"]["net2net+state"] = regime["arms"]["parent"]
    regime["arms"]["netmorph+state"] = regime["arms"]["parent"]
    rows = matrix.readme_table({"c": {"config": {"seeds": 3}, "summary": {"raised": regime}}})
    assert rows[2] == ("| c (3) | raised | **0.021** | 0.061 | 0.051 | 0.011 / 0.011 | 0.011 "
                       "| 0.910 / 0.900 |")
    assert len(rows) == 3  # no warmup regime stored: no row


def test_the_readme_table_refuses_a_missing_or_malformed_json(tmp_path, capsys):
    assert matrix.main(["--readme-table", "--results", str(tmp_path)]) == 2
    assert "stability_matrix.json does not exist" in capsys.readouterr().err
    (tmp_path / "stability_matrix.json").write_text("{bad")
    assert matrix.main(["--readme-table", "--results", str(tmp_path)]) == 2
    assert "cannot be read as JSON" in capsys.readouterr().err
