"""Releasing the stable rule's learning-rate multipliers over time (issue 9, branch ramp).

Each cell is a stability-matrix cell (``benchmarks/stability_matrix.py``; same data, model,
morph, optimiser, steps, regimes, seeds) run with the arms

- ``stable``: the default rule (multipliers kept for the whole run; the paired reference),
- ``stable+relm``: multipliers ramped back to 1 over the optimiser's memory
  ``1 / (1 - beta)`` (Adam ``beta2``: 1000 steps; SGD momentum 0.9: 10 steps),
- ``stable+relw``: ramped back over the configured warm-up length (``warmup_steps``),
- ``netmorph``, ``net2net``: the published baselines,
- (``--arms``) ``stable+relt``: ramped back over the whole run after the morph
  (``child_steps``), run in its own folder with ``--reuse`` of the arms above,

plus cells not in the matrix (:func:`extra_cells`: other widths, another data set x model,
600 steps after the morph instead of 200), so the rule is not judged on the cells it is meant
to fix. ``--parents DIR`` copies the matrix's
trained parents (``DIR/<cell>/parents``) when the cell's parent config is the matrix's
(saves the parent training; the parents are deterministic functions of the config).

Per run it reads, over *all* evaluations after the morph (not only the drop window), the
worst accuracy (``drop_all`` = parent accuracy minus it) and the worst loss (``rise_all``),
and the final accuracy and loss; paired differences per seed, mean +- sd.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/ramp.py --cells digits-cnn-deepen-sgd \
        --work runs/ramp --parents /work/main/runs/stability_matrix
    python benchmarks/ramp.py --report --work runs/ramp   # tables only, from the folders

Writes ``benchmarks/results/ramp_tables.md`` and ``ramp.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from stability_matrix import _loadavg, _machine, _now, cells, code_commit

from stablemorph.experiment.stability import (
    Arm,
    Experiment,
    ExperimentConfig,
)

RESULTS = Path(__file__).parent / "results"
ARMS = ["stable", "stable+relm", "stable+relw", "netmorph", "net2net"]
REFERENCES = ["stable", "netmorph", "net2net"]


def extra_cells() -> dict[str, ExperimentConfig]:
    """Settings not in the matrix: other widths, another data set x model."""
    m = cells()
    return {
        "digits-mlp96-48-deepen-sgd": replace(m["digits-mlp-deepen-sgd"][1],
                                              model_kwargs={"hidden": [96, 48]}),
        "fmnist-mlp128-64-deepen-adamw": replace(
            m["digits-mlp-deepen-adamw"][1], dataset="fashion-mnist",
            model_kwargs={"hidden": [128, 64]}, limit_train=12_000, limit_test=2_000,
            parent_steps=600, seeds=3),
        "digits-cnn24-48-deepen-sgd": replace(m["digits-cnn-deepen-sgd"][1],
                                              model_kwargs={"widths": [24, 48]}),
        # three times the matrix's 200 steps after the morph: does a release pay once its
        # late drop has had time to recover?
        "digits-cnn-deepen-sgd-long": replace(m["digits-cnn-deepen-sgd"][1], child_steps=600),
        "digits-mlp-deepen-adamw-long": replace(m["digits-mlp-deepen-adamw"][1],
                                                child_steps=600),
    }


def all_cells() -> dict[str, ExperimentConfig]:
    out = {name: cfg for name, (_, cfg) in cells().items()}
    return {**out, **extra_cells()}


def config(name: str, arms: list[str] | None = None) -> ExperimentConfig:
    return replace(all_cells()[name], schemes=list(arms or ARMS), baselines=[])


def copy_parents(name: str, cfg: ExperimentConfig, parents: Path, work: Path) -> int:
    """Copy the matrix's trained parents of cell ``name`` when its parent config matches."""
    stored = parents / name / "config.json"
    if not stored.exists():
        return 0
    theirs = json.loads(stored.read_text())
    mine = json.loads(json.dumps(asdict(cfg)))
    keys = ("dataset", "limit_train", "limit_test", "model", "model_kwargs", "seeds",
            "optimizer", "lr", "momentum", "weight_decay", "batch_size", "parent_steps")
    if any(theirs.get(k) != mine[k] for k in keys):
        return 0
    (work / name / "parents").mkdir(parents=True, exist_ok=True)
    n = 0
    for f in sorted((parents / name / "parents").glob("seed*.pt")):
        target = work / name / "parents" / f.name
        if not target.exists():
            shutil.copy2(f, target)
            n += 1
    return n


def reuse_runs(name: str, cfg: ExperimentConfig, source: Path, work: Path) -> int:
    """Copy the finished runs of ``cfg``'s arms from ``source/<name>`` when that folder ran
    the same experiment but for its arms (the runs are deterministic functions of the config,
    seed, regime and arm: checked bit for bit against the matrix's on digits CNN deepen)."""
    stored = source / name / "config.json"
    if not stored.exists():
        return 0
    theirs = json.loads(stored.read_text())
    mine = json.loads(json.dumps(asdict(cfg)))
    if any(theirs.get(k) != v for k, v in mine.items() if k not in ("schemes", "baselines")):
        return 0
    (work / name / "runs").mkdir(parents=True, exist_ok=True)
    n = 0
    for f in sorted((source / name / "runs").glob("*.json")):
        arm = f.stem.split("_", 2)[2]
        target = work / name / "runs" / f.name
        if arm in cfg.schemes and not target.exists():
            shutil.copy2(f, target)
            n += 1
    return n


def figures(arm: Arm) -> dict[str, float]:
    after = [r for r in arm.records if r["step"] > 0]
    return {"drop_all": arm.parent_acc - min(r["test_acc"] for r in after),
            "rise_all": max(r["test_loss"] for r in after) - arm.parent_loss,
            "final_acc": after[-1]["test_acc"], "final_loss": after[-1]["test_loss"]}


def _ms(values: list[float]) -> dict[str, float]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


def summary(arms: list[Arm]) -> dict[str, Any]:
    """Per regime: per arm mean/sd of :func:`figures`; paired (same seed) differences of
    each released arm and ``stable`` against the references."""
    out: dict[str, Any] = {}
    for regime in sorted({a.regime for a in arms}):
        per = {a.arm: {} for a in arms if a.regime == regime}
        for a in arms:
            if a.regime == regime:
                per[a.arm][a.seed] = figures(a)
        entry: dict[str, Any] = {"arms": {}, "paired": {}}
        for arm, seeds in per.items():
            entry["arms"][arm] = {k: _ms([f[k] for f in seeds.values()])
                                  for k in ("drop_all", "rise_all", "final_acc", "final_loss")}
        for arm in [a for a in per if a.startswith("stable")]:
            for ref in REFERENCES:
                if arm == ref or arm not in per or ref not in per:
                    continue
                common = sorted(set(per[arm]) & set(per[ref]))
                entry["paired"][f"{arm} - {ref}"] = {
                    k: _ms([per[arm][s][k] - per[ref][s][k] for s in common])
                    for k in ("drop_all", "rise_all", "final_acc", "final_loss")}
        out[regime] = entry
    return out


def read_runs(folder: Path) -> list[Arm]:
    return [Arm(**json.loads(p.read_text())) for p in sorted((folder / "runs").glob("*.json"))]


def _fmt(x: dict[str, float], scale: float = 1.0, digits: int = 4) -> str:
    return f"{x['mean'] * scale:+.{digits}f} ± {x['sd'] * scale:.{digits}f}"


def overview(results: dict[str, Any]) -> list[str]:
    """One row per cell x regime: the final figure (accuracy; loss for the GPT cells) and
    the whole-run worst figure of each released arm, paired against ``stable`` and against
    the better published baseline of each seed."""
    lines = ["| cell | regime | arm | Δ final vs stable | Δ final vs better baseline | "
             "worst (drop_all / rise_all) | stable's worst | better baseline's worst |",
             "|---|---|---|---|---|---|---|---|"]
    for name, cell in results.items():
        gpt = "gpt" in name
        key, worst = ("final_loss", "rise_all") if gpt else ("final_acc", "drop_all")
        for regime, entry in cell["summary"].items():
            arms, paired = entry["arms"], entry["paired"]
            if {"stable", "netmorph", "net2net"} - set(arms):
                continue  # a cell still running
            better = "netmorph" if (arms["netmorph"][key]["mean"] < arms["net2net"][key]["mean"]
                                    ) == gpt else "net2net"
            for arm in ("stable", *(a for a in arms if a.startswith("stable+"))):
                if arm not in arms:
                    continue
                vs = "—" if arm == "stable" else _fmt(paired[f"{arm} - stable"][key])
                lines.append(
                    f"| {name} | {regime} | {arm} | {vs} | "
                    f"{_fmt(paired[f'{arm} - {better}'][key])} ({better}) | "
                    f"{arms[arm][worst]['mean']:.4f} | {arms['stable'][worst]['mean']:.4f} | "
                    f"{arms[better][worst]['mean']:.4f} |")
    return lines


def counts(results: dict[str, Any]) -> list[str]:
    """Per released arm, over the cell x regime pairs where it changed anything: final figure
    better / worse than ``stable`` beyond the paired spread (|mean| > sd), and whole-run worst
    figure above the worse published baseline's (mean over seeds)."""
    tally: dict[str, list[int]] = {}
    for name, cell in results.items():
        gpt = "gpt" in name
        key, worst = ("final_loss", "rise_all") if gpt else ("final_acc", "drop_all")
        sign = -1.0 if gpt else 1.0
        for entry in cell["summary"].values():
            arms, paired = entry["arms"], entry["paired"]
            if {"stable", "netmorph", "net2net"} - set(arms):
                continue
            for arm in (a for a in arms if a.startswith("stable+")):
                d = paired[f"{arm} - stable"]
                if all(abs(d[k]["mean"]) == 0.0 and d[k]["sd"] == 0.0 for k in d):
                    continue  # nothing to release: the arm is the stable one
                t = tally.setdefault(arm, [0, 0, 0, 0])
                t[0] += 1
                t[1] += sign * d[key]["mean"] > d[key]["sd"]
                t[2] += -sign * d[key]["mean"] > d[key]["sd"]
                t[3] += arms[arm][worst]["mean"] > max(arms[b][worst]["mean"]
                                                      for b in ("netmorph", "net2net"))
    lines = ["| arm | pairs where it changed anything | final better than stable beyond "
             "the spread | final worse beyond the spread | worst after the morph beyond "
             "both baselines' |", "|---|---|---|---|---|"]
    lines += [f"| {arm} | {t[0]} | {t[1]} | {t[2]} | {t[3]} |" for arm, t in tally.items()]
    return lines


def tables(results: dict[str, Any]) -> str:
    lines = ["# Multipliers released over time: tables (generated by benchmarks/ramp.py)", "",
             "Accuracy cells (GPT cells: loss is the figure that counts). drop_all: parent "
             "accuracy minus the worst accuracy over every evaluation after the morph; "
             "rise_all: worst loss minus the parent's. Mean ± sd over seeds; paired: per-seed "
             "differences (first arm minus second), mean ± sd. Better baseline: the published "
             "baseline with the better mean final figure in that cell and regime.", "",
             "## Counts", "", *counts(results), "", "## Overview", "", *overview(results),
             ""]
    for name, cell in results.items():
        lines += [f"## {name}", "", f"runs: {cell['runs']}; {cell['source']}", ""]
        lines += ["| regime | arm | drop_all | rise_all | final acc | final loss |",
                  "|---|---|---|---|---|---|"]
        for regime, entry in cell["summary"].items():
            for arm, f in entry["arms"].items():
                lines.append(f"| {regime} | {arm} | {_fmt(f['drop_all'])} | "
                             f"{_fmt(f['rise_all'])} | {_fmt(f['final_acc'])} | "
                             f"{_fmt(f['final_loss'])} |")
        lines += ["", "| regime | paired | Δ drop_all | Δ rise_all | Δ final acc | "
                  "Δ final loss |", "|---|---|---|---|---|---|"]
        for regime, entry in cell["summary"].items():
            for pair, f in entry["paired"].items():
                lines.append(f"| {regime} | {pair} | {_fmt(f['drop_all'])} | "
                             f"{_fmt(f['rise_all'])} | {_fmt(f['final_acc'])} | "
                             f"{_fmt(f['final_loss'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", nargs="*", default=[], help=f"of {sorted(all_cells())}")
    ap.add_argument("--work", type=Path, default=Path("runs/ramp"))
    ap.add_argument("--parents", type=Path, default=None,
                    help="the matrix's work folder, to copy its trained parents from")
    ap.add_argument("--arms", nargs="*", default=None, help=f"default {ARMS}")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="a work folder of this script whose finished runs of the same arms "
                         "are copied instead of run again")
    ap.add_argument("--tables", default="ramp", help="results file stem (default: ramp)")
    ap.add_argument("--report", action="store_true", help="only rebuild the tables")
    args = ap.parse_args(argv)
    unknown = [c for c in args.cells if c not in all_cells()]
    if unknown:
        ap.error(f"unknown cells {unknown}; choose from {sorted(all_cells())}")
    if not args.report:
        for name in args.cells:
            cfg = config(name, args.arms)
            if args.parents is not None:
                print(f"[{name}] {copy_parents(name, cfg, args.parents, args.work)} parents "
                      f"copied", flush=True)
            if args.reuse is not None:
                print(f"[{name}] {reuse_runs(name, cfg, args.reuse, args.work)} runs reused",
                      flush=True)
            start, load = _now(), _loadavg()
            Experiment(cfg, args.work / name, progress=False,
                       log=lambda m, n=name: print(f"[{n}] {m}", flush=True)).run()
            with open(args.work / name / "invocations.jsonl", "a") as f:
                f.write(json.dumps({"argv": sys.argv, "start": start, "end": _now(),
                                    "load_start": load, "load_end": _loadavg(),
                                    "commit": code_commit(), "machine": _machine()}) + "\n")
    results = {}
    for folder in sorted(p for p in args.work.glob("*") if (p / "config.json").exists()):
        arms = read_runs(folder)
        if arms:
            inv = (folder / "invocations.jsonl")
            last = json.loads(inv.read_text().splitlines()[-1]) if inv.exists() else {}
            results[folder.name] = {"runs": len(arms), "summary": summary(arms),
                                    "source": {k: last.get(k) for k in
                                               ("start", "end", "load_start", "load_end",
                                                "commit")}}
    (RESULTS / f"{args.tables}.json").write_text(json.dumps(results, indent=1))
    (RESULTS / f"{args.tables}_tables.md").write_text(tables(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
