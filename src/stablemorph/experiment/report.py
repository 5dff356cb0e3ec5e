"""Write an experiment's results: curves (CSV and JSON), a plot (PNG) and a Markdown report.

The plot has one column per learning-rate regime; rows show test accuracy and test loss
against the step after the morph (step 0 is the morph), one curve per arm: the mean over
seeds with a band from the lowest to the highest seed.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import statistics
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from stablemorph.experiment.stability import Arm, ExperimentConfig, summarise

COLOURS = {
    "stable": "tab:green",
    "netmorph": "tab:orange",
    "net2net": "tab:blue",
    "parent": "black",
    "scratch": "tab:gray",
}


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def write_curves(arms: list[Arm], out: Path) -> tuple[Path, Path]:
    csv_path, json_path = out / "curves.csv", out / "curves.json"
    fields = ["seed", "regime", "arm", "step", "test_acc", "test_loss", "train_loss", "lr"]
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for a in arms:
            for r in a.records:
                w.writerow({"seed": a.seed, "regime": a.regime, "arm": a.arm, **r})
    json_path.write_text(json.dumps([asdict(a) for a in arms]))
    return csv_path, json_path


def _grouped(arms: list[Arm]) -> dict[tuple[str, str], list[Arm]]:
    groups: dict[tuple[str, str], list[Arm]] = defaultdict(list)
    for a in arms:
        groups[(a.regime, a.arm)].append(a)
    return groups


def plot(arms: list[Arm], cfg: ExperimentConfig, out: Path) -> Path:
    regimes = list(dict.fromkeys(a.regime for a in arms))
    fig, axes = plt.subplots(2, len(regimes), figsize=(6.5 * len(regimes), 8), squeeze=False)
    groups = _grouped(arms)
    for col, regime in enumerate(regimes):
        for row, key in enumerate(("test_acc", "test_loss")):
            ax = axes[row][col]
            for arm in [*cfg.schemes, *cfg.baselines]:
                runs = groups.get((regime, arm))
                if not runs:
                    continue
                steps = [r["step"] for r in runs[0].records]
                series = [[r[key] for r in run.records] for run in runs]
                mean = [statistics.mean(v) for v in zip(*series, strict=True)]
                lo = [min(v) for v in zip(*series, strict=True)]
                hi = [max(v) for v in zip(*series, strict=True)]
                ax.plot(steps, mean, label=arm, color=COLOURS.get(arm), lw=1.6)
                ax.fill_between(steps, lo, hi, color=COLOURS.get(arm), alpha=0.15)
            parent = statistics.mean(
                (a.parent_acc if key == "test_acc" else a.parent_loss)
                for a in arms
                if a.regime == regime
            )
            ax.axhline(parent, color="black", ls=":", lw=1, label="parent at morph")
            ax.axvline(0, color="red", ls="--", lw=1, label="morph")
            ax.set_xlabel("optimiser steps after the morph")
            ax.set_ylabel("test accuracy" if key == "test_acc" else "test loss")
            if key == "test_acc":
                worst = min(
                    min(r["test_acc"] for r in a.records)
                    for a in arms
                    if a.regime == regime and a.arm != "scratch"
                )
                ax.set_ylim(max(0.0, worst - 0.05), min(1.0, parent + 0.05))
                ax.set_title(f"lr after morph: {regime} ({cfg.lr_after(regime):g})")
            else:
                best = max(
                    max(r["test_loss"] for r in a.records)
                    for a in arms
                    if a.regime == regime and a.arm != "scratch"
                )
                ax.set_ylim(0, best * 1.1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(
        f"{cfg.morph} {cfg.model} on {cfg.dataset}: mean over {cfg.seeds} seeds, band = min..max"
    )
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(arms: list[Arm], cfg: ExperimentConfig) -> tuple[list[str], dict[str, Any]]:
    """Markdown table rows and the summary dict behind them."""
    groups = _grouped(arms)
    lines = [
        f"| lr regime | arm | drop depth (first {cfg.drop_window} steps) | loss rise | steps to "
        f"recover | final accuracy | final loss | zeros in new params | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, Any] = {}
    for regime in cfg.regimes:
        for arm in [*cfg.schemes, *cfg.baselines]:
            runs = groups.get((regime, arm))
            if not runs:
                continue
            s = [summarise(a, cfg.drop_window) for a in runs]
            rec = [x["recover"] for x in s]
            never = sum(r is None for r in rec)
            rec_txt = (
                _mean_sd([float(r) for r in rec if r is not None]) if never < len(rec) else "never"
            )
            if 0 < never < len(rec):
                rec_txt += f" ({never} never)"
            if arm == "scratch":
                drop_txt = rise_txt = rec_txt = "n/a"
            else:
                drop_txt = _mean_sd([x["drop"] for x in s])
                rise_txt = _mean_sd([x["loss_rise"] for x in s])
            zeros = [x["zeros"] for x in s if x["zeros"] is not None]
            final_acc = _mean_sd([x["final_acc"] for x in s])
            final_loss = _mean_sd([x["final_loss"] for x in s])
            zeros_txt = _mean_sd(zeros) if zeros else "-"
            seconds = statistics.mean(x["seconds"] for x in s)
            lines.append(
                f"| {regime} | {arm} | {drop_txt} | {rise_txt} | {rec_txt} | {final_acc} | "
                f"{final_loss} | {zeros_txt} | {seconds:.1f} |"
            )
            summary[f"{regime}/{arm}"] = s
    return lines, summary


def write_report(
    arms: list[Arm], cfg: ExperimentConfig, out: Path, command: str, data_note: str
) -> Path:
    out = Path(out)
    csv_path, json_path = write_curves(arms, out)
    png = plot(arms, cfg, out)
    rows, summary = table(arms, cfg)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    load = os.getloadavg()[0]
    text = "\n".join(
        [
            f"# Stability after a morph: {cfg.morph} {cfg.model} on {cfg.dataset}",
            "",
            f"Command: `{command}`",
            "",
            f"Data: {data_note}",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, "
            f"torch {torch.__version__}, {cfg.threads} threads; date "
            f"{datetime.date.today().isoformat()}; load average when the report was written: "
            f"{load:.2f}.",
            "",
            "## Settings",
            "",
            f"- parent: {cfg.model} {cfg.model_kwargs or ''}, {cfg.parent_steps} steps of "
            f"{cfg.optimizer} (lr {cfg.lr}, momentum {cfg.momentum}, weight decay "
            f"{cfg.weight_decay}, batch {cfg.batch_size}), lr divided by 10 at 2/3 of the steps;",
            f"- morph: `{cfg.morph}` of {cfg.targets or 'every conv'} with {cfg.morph_kwargs}; the "
            f"same child architecture for every scheme; optimiser state carried across the morph "
            f"by `stablemorph.optim.transfer_optimizer` for every scheme (untouched layers keep "
            f"their momentum, new factors start with none); the parent arm keeps its state; the "
            f"scratch arm is the child architecture re-initialised (activations plain);",
            f"- after the morph: {cfg.child_steps} steps, identical batches for every arm, lr "
            + ", ".join(f"{r} = {cfg.lr_after(r):g}" for r in cfg.regimes)
            + f"; evaluated at step 0, every {cfg.dense_every} steps to {cfg.dense_until}, then "
            f"every {cfg.every}; seeds 0..{cfg.seeds - 1};",
            f"- drop depth: parent accuracy minus the worst accuracy in the first "
            f"{cfg.drop_window} steps; loss rise: worst test loss in that window minus the "
            f"parent's; steps to recover: first evaluation after the worst point at or above the "
            f"parent's accuracy (0 without a drop). Mean ± standard deviation over seeds.",
            "",
            "## Results",
            "",
            *rows,
            "",
            f"![curves]({png.name})",
            "",
            f"Curves: `{csv_path.name}`, `{json_path.name}`; per-seed figures: `summary.json`.",
            "",
        ]
    )
    path = out / "report.md"
    path.write_text(text)
    return path
