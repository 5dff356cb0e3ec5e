"""The stability matrix (issue 9): every cell is one experiment of the one driver
(:mod:`stablemorph.experiment.stability`), data set x model x morph x optimiser, each with the
learning-rate regimes ``same``, ``raised`` and ``warmup`` after the morph and the arms

- ``stable``: the stable scheme with its default rule (``STABLE_RULE`` in
  experiment/stability.py, experiment/rules.py: pointwise pairs re-factored with an orthogonal
  second factor, the parent layer's optimiser state mapped onto the factors, and the
  learning-rate multiplier ``1 / first-step amplification`` measured on the probe, under
  Adam times the parent layer's own typical step ``mean |m_hat| / sqrt(v_hat)``);
- ``netmorph``, ``net2net``: the baselines as published;
- ``netmorph+state+dlr+adamr``, ``net2net+state+dlr+adamr``: the baselines offered the same
  optimiser state mapping and multiplier;
- ``parent``: the parent trained on at the same rate.

Resumable: each cell's experiment lives in ``--work/<cell>`` and resumes where it stopped;
the report is rebuilt from whatever has finished.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/stability_matrix.py --cells cheap
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/stability_matrix.py --cells all
    python benchmarks/stability_matrix.py --list

Writes ``benchmarks/results/stability_matrix.md`` (every cell: drop depth, loss rise, steps to
recover, final accuracy and loss of every arm, mean ± sd over seeds; paired differences stable
minus each baseline per seed, mean ± sd; whether the new parameters moved),
``stability_matrix.json`` and ``stability_matrix.png`` (stable's drop over the better
published baseline's, per cell and regime).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from stablemorph.experiment.stability import (
    Arm,
    Experiment,
    ExperimentConfig,
    summarise,
)

RESULTS = Path(__file__).parent / "results"
ARMS = ["stable", "netmorph", "net2net", "netmorph+state+dlr+adamr", "net2net+state+dlr+adamr"]
BASELINES = ("netmorph", "net2net")
REGIMES = ["same", "raised", "warmup"]
LR = {"sgd": 0.05, "adamw": 0.003}


def _cfg(dataset: str, model: str, model_kwargs: dict, morph: str, morph_kwargs: dict,
         optimizer: str, seeds: int, **extra: Any) -> ExperimentConfig:
    # the multiplier only concerns factor pairs (deepen, insert_subnet): elsewhere the "+dlr"
    # arms would repeat the published ones
    arms = ARMS if morph in ("deepen", "insert_subnet") else ARMS[:3]
    base = ExperimentConfig(
        dataset=dataset, model=model, model_kwargs=model_kwargs, morph=morph,
        morph_kwargs=morph_kwargs, schemes=list(arms), baselines=["parent"], seeds=seeds,
        optimizer=optimizer, lr=LR[optimizer], parent_steps=300, child_steps=200,
        regimes=list(REGIMES), warmup_steps=50, dense_until=100, dense_every=10, every=25,
        drop_window=100, threads=1, batch_size=64)
    return replace(base, **extra)


def cells() -> dict[str, tuple[str, ExperimentConfig]]:
    """``{name: (cost class, config)}``; cost ``cheap`` runs in minutes on one core."""
    out: dict[str, tuple[str, ExperimentConfig]] = {}
    for opt in ("sgd", "adamw"):
        # a digits CNN arm takes 10-40 s on the shared 2-core machine, a cell over an hour
        # with 5 seeds: 3 seeds
        cnn = {"widths": [16, 32]}
        out[f"digits-cnn-deepen-{opt}"] = ("cheap", _cfg(
            "digits", "cnn", cnn, "deepen", {"kernel_size": 3}, opt, 3))
        out[f"digits-cnn-widen-{opt}"] = ("cheap", _cfg(
            "digits", "cnn", cnn, "widen", {"factor": 2}, opt, 3))
        out[f"digits-cnn-subnet-{opt}"] = ("cheap", _cfg(
            "digits", "cnn", cnn, "insert_subnet", {}, opt, 3))
        mlp = {"hidden": [64, 64]}
        out[f"digits-mlp-deepen-{opt}"] = ("cheap", _cfg(
            "digits", "mlp", mlp, "deepen", {}, opt, 5))
        out[f"digits-mlp-widen-{opt}"] = ("cheap", _cfg(
            "digits", "mlp", mlp, "widen", {"factor": 2}, opt, 5))
        out[f"digits-mlp-subnet-{opt}"] = ("cheap", _cfg(
            "digits", "mlp", mlp, "insert_subnet", {}, opt, 5))
        for widths in ([16, 32], [32, 64]):
            tag = f"{widths[0]}-{widths[1]}"
            for morph, kw in (("deepen", {"kernel_size": 3}), ("widen", {"factor": 2}),
                              ("insert_subnet", {})):
                out[f"fmnist-cnn{tag}-{morph}-{opt}"] = ("costly", _cfg(
                    "fashion-mnist", "cnn", {"widths": widths}, morph, kw, opt, 3,
                    limit_train=12_000, limit_test=2_000, parent_steps=600))
        gpt = {"d_model": 32, "n_layer": 2, "n_head": 4, "head_dim": 8, "d_mlp": 128,
               "block_size": 32}
        for morph in ("depth", "width"):
            out[f"text-gpt-{morph}-{opt}"] = ("gpt", _cfg(
                "text", "gpt", gpt, morph, {}, opt, 3, limit_train=300_000, limit_test=128,
                parent_steps=300, child_steps=100, batch_size=16, dense_until=50,
                dense_every=5, every=25, drop_window=50, warmup_steps=25,
                lr=LR[opt] if opt == "adamw" else 0.1, weight_decay=0.0))
    return out


def finished(cfg: ExperimentConfig, folder: Path) -> bool:
    """Whether every run of the cell is on disk."""
    expected = cfg.seeds * len(cfg.regimes) * (len(cfg.schemes) + len(cfg.baselines))
    return len(list((folder / "runs").glob("*.json"))) >= expected


def run_cell(name: str, cfg: ExperimentConfig, work: Path) -> list[Arm]:
    return Experiment(cfg, work / name, progress=False,
                      log=lambda m: print(f"[{name}] {m}", flush=True)).run()


def _ms(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def cell_summary(cfg: ExperimentConfig, arms: list[Arm]) -> dict[str, Any]:
    """Per regime and arm: per-seed figures; per regime: paired differences."""
    out: dict[str, Any] = {}
    for regime in cfg.regimes:
        per: dict[str, dict[int, dict[str, Any]]] = {}
        for a in arms:
            if a.regime == regime:
                per.setdefault(a.arm, {})[a.seed] = summarise(a, cfg.drop_window)
        paired: dict[str, dict[str, list[float]]] = {}
        for base in [b for b in per if b != "stable"]:
            seeds = sorted(set(per.get("stable", {})) & set(per[base]))
            paired[base] = {k: [per["stable"][s][k] - per[base][s][k] for s in seeds]
                            for k in ("drop", "loss_rise", "final_acc", "final_loss")}
        out[regime] = {"arms": per, "paired": paired}
    return out


def _mean(per: dict[int, dict[str, Any]], key: str) -> float:
    vals = [v[key] for v in per.values() if v[key] is not None]
    return statistics.mean(vals) if vals else float("nan")


# a baseline "drops more than the parent" when its mean drop exceeds the parent's by more
# than one digits test image (1/360) or, for the language model, 0.005 nats of loss rise
TOLERANCE = {"drop": 0.003, "loss_rise": 0.005}


def verdict(reg: dict[str, Any], metric: str = "drop") -> tuple[str, float | None]:
    """The issue's test for one cell/regime on ``metric`` (drop depth; loss rise for the
    language model): stable's at most half the better published baseline's where that
    baseline's exceeds the parent's (:data:`TOLERANCE`); stable never worse than a published
    baseline beyond the paired seed spread; final accuracy (language model: final loss) at
    least the baselines'. Returns the text and stable's value over the better baseline's."""
    arms = reg["arms"]
    if "stable" not in arms or not all(b in arms for b in BASELINES):
        return "incomplete", None
    stable = _mean(arms["stable"], metric)
    best = min(_mean(arms[b], metric) for b in BASELINES)
    parent = _mean(arms["parent"], metric) if "parent" in arms else 0.0
    ratio = stable / best if best > 0 else None
    notes = []
    for b in BASELINES:
        d = reg["paired"].get(b, {}).get(metric, [])
        if len(d) > 1 and statistics.mean(d) > statistics.stdev(d):
            notes.append(f"worse than {b} beyond the paired spread")
    if metric == "drop":
        final = _mean(arms["stable"], "final_acc") >= max(
            _mean(arms[b], "final_acc") for b in BASELINES) - 1e-12
    else:
        final = _mean(arms["stable"], "final_loss") <= min(
            _mean(arms[b], "final_loss") for b in BASELINES) + 1e-12
    notes.append("final ≥ baselines" if final else "final below a baseline")
    if best <= parent + TOLERANCE[metric]:
        head = f"not judged: baselines ≈ parent (stable {stable:.3f}, parent {parent:.3f})"
    else:
        head = ("**holds**" if stable <= 0.5 * best else "fails") + (
            f" ({stable:.3f} vs 0.5 × {best:.3f}; parent {parent:.3f})")
    return head + "; " + "; ".join(notes), ratio


def write_report(results: dict[str, tuple[ExperimentConfig, list[Arm]]], planned: list[str],
                 command: str, started: float) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {name: cell_summary(cfg, arms) for name, (cfg, arms) in results.items()}
    (RESULTS / "stability_matrix.json").write_text(json.dumps(summary, indent=1, default=str))
    lines = [
        "# The stability matrix",
        "",
        f"Command: `{command}`  ",
        "Runs: `PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/stability_matrix.py --cells "
        "CELL...` (several invocations side by side, each cell in `runs/stability_matrix/CELL`, "
        "resumed where stopped); this file is rebuilt from the finished folders with "
        "`--report-only --cells all`.  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs "
        f"(load average {os.getloadavg()[0]:.1f} at the end), torch {torch.__version__}, one "
        f"thread; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"{(time.time() - started) / 60:.0f} min for this invocation.",
        "",
        f"Cells run: {', '.join(results) or 'none'}.  ",
        "Cells planned but not run here: "
        f"{', '.join(n for n in planned if n not in results) or 'none'}.",
        "",
        "Arms: `stable` = stable scheme + its default rule (`STABLE_RULE`: pointwise pairs "
        "re-factored with an orthogonal second factor, the parent layer's optimiser state "
        "mapped onto the factors, learning-rate multiplier 1/first-step amplification on the "
        "probe, under Adam times the parent layer's typical step; see the research log "
        "below); `netmorph`, `net2net` as published; `+state+dlr+adamr` = the same state "
        "mapping and multipliers offered to a baseline (for widen, where there is no factor "
        "pair, the rule does nothing and these arms are left out); `parent` = the parent "
        "trained on. Drop = parent accuracy minus the worst accuracy "
        "in the first `drop_window` steps; loss rise = worst test loss in that window minus "
        "the parent's; recover = steps until the parent's accuracy is regained; moved = "
        "||Δθ||/||θ₀|| of the morph's new parameters at the end. Mean ± sd over seeds; paired "
        "= stable minus the arm, per seed (same batches), mean ± sd.",
        "",
        "## Verdicts (stable's drop, loss rise for the GPT, ≤ 0.5 × the better published "
        "baseline's, where a baseline drops more than the parent by over 0.003 / 0.005 nats)",
        "",
        "| cell | " + " | ".join(REGIMES) + " |",
        "|---|" + "---|" * len(REGIMES),
    ]
    for name in results:
        metric = "loss_rise" if results[name][0].dataset == "text" else "drop"
        row = [verdict(summary[name][r], metric)[0] if r in summary[name] else "-"
               for r in REGIMES]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    for name, (cfg, _) in results.items():
        lines += ["", f"## {name}", "",
                  f"{cfg.dataset}, {cfg.model} {cfg.model_kwargs}, `{cfg.morph}` "
                  f"{cfg.morph_kwargs}, {cfg.optimizer} lr {cfg.lr} (parent {cfg.parent_steps} "
                  f"steps, lr/10 at 2/3), {cfg.child_steps} steps after the morph, "
                  f"{cfg.seeds} seeds, drop window {cfg.drop_window}.", "",
                  "| regime | arm | drop | loss rise | recover | final acc | final loss | "
                  "zeros | moved |", "|---|---|---|---|---|---|---|---|---|"]
        for regime in cfg.regimes:
            arms = summary[name][regime]["arms"]
            for arm in [*cfg.schemes, *cfg.baselines]:
                if arm not in arms:
                    continue
                per = list(arms[arm].values())
                rec = [p["recover"] for p in per]
                never = sum(r is None for r in rec)
                rec_txt = _ms([float(r) for r in rec if r is not None], 0)
                if never:
                    rec_txt += f" ({never} never)"
                lines.append(
                    f"| {regime} | {arm} | {_ms([p['drop'] for p in per])} | "
                    f"{_ms([p['loss_rise'] for p in per])} | {rec_txt} | "
                    f"{_ms([p['final_acc'] for p in per])} | "
                    f"{_ms([p['final_loss'] for p in per])} | "
                    f"{_ms([p['zeros'] for p in per if p['zeros'] is not None])} | "
                    f"{_ms([p.get('moved') for p in per if p.get('moved') is not None])} |")
        lines += ["", "Paired differences, stable minus arm (negative drop / rise: stable "
                  "better; positive final acc: stable better):", "",
                  "| regime | arm | Δ drop | Δ loss rise | Δ final acc | Δ final loss |",
                  "|---|---|---|---|---|---|"]
        for regime in cfg.regimes:
            for arm, d in summary[name][regime]["paired"].items():
                lines.append(f"| {regime} | {arm} | {_ms(d['drop'])} | {_ms(d['loss_rise'])} | "
                             f"{_ms(d['final_acc'])} | {_ms(d['final_loss'])} |")
    research = RESULTS / "stability_research.md"
    if research.exists():
        lines += ["", research.read_text().strip()]
    path = RESULTS / "stability_matrix.md"
    path.write_text("\n".join(lines) + "\n")
    heatmap(summary, list(results), {n: ("loss_rise" if c.dataset == "text" else "drop")
                                     for n, (c, _) in results.items()})
    return path


def heatmap(summary: dict[str, Any], names: list[str], metrics: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not names:
        return
    data = [[(verdict(summary[n][r], metrics[n])[1] if r in summary[n] else None)
             for r in REGIMES] for n in names]
    grid = [[math.log2(max(v, 1 / 16)) if v is not None else float("nan") for v in row]
            for row in data]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.5))
    im = ax.imshow(grid, cmap="RdYlGn_r", vmin=-4, vmax=4, aspect="auto")
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if v is None else f"{v:.2f}", ha="center", va="center",
                    fontsize=8)
    ax.set_xticks(range(len(REGIMES)), REGIMES)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title("stable's drop (GPT: loss rise) / better published baseline's\n(log2 "
                 "colour; < 0.5 is the goal; '-' = no baseline drop)", fontsize=9)
    fig.colorbar(im, ax=ax, label="log2 ratio")
    fig.tight_layout()
    fig.savefig(RESULTS / "stability_matrix.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=["cheap"],
                        help="cell names, or a cost class: cheap, gpt, costly, all")
    parser.add_argument("--work", type=Path, default=Path("runs/stability_matrix"),
                        help="experiment folders (resumed)")
    parser.add_argument("--list", action="store_true", help="list the cells and exit")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: rebuild the report from the cells whose runs "
                        "have all finished")
    args = parser.parse_args(argv)
    table = cells()
    if args.list:
        for name, (cost, _) in table.items():
            print(f"{cost:7s} {name}")
        return 0
    wanted: list[str] = []
    for c in args.cells:
        if c == "all":
            wanted += list(table)
        elif c in ("cheap", "gpt", "costly"):
            wanted += [n for n, (cost, _) in table.items() if cost == c]
        elif c in table:
            wanted.append(c)
        else:
            parser.error(f"unknown cell {c!r}; see --list")
    wanted = list(dict.fromkeys(wanted))
    started = time.time()
    torch.set_num_threads(1)
    results: dict[str, tuple[ExperimentConfig, list[Arm]]] = {}
    command = "python benchmarks/stability_matrix.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    for name in wanted:
        cfg = table[name][1]
        if args.report_only and not finished(cfg, args.work / name):
            continue
        try:
            results[name] = (cfg, run_cell(name, cfg, args.work))
        except Exception as err:  # a missing data set must not stop the other cells
            print(f"[{name}] skipped: {type(err).__name__}: {err}", flush=True)
        if not args.report_only:
            write_report(results, wanted, command, started)
    path = write_report(results, wanted, command, started)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
