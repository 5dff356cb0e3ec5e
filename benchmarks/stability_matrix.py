"""The stability matrix (issue 9): every cell is one experiment of the one driver
(:mod:`stablemorph.experiment.stability`), data set x model x morph x optimiser, each with the
learning-rate regimes ``same``, ``raised`` and ``warmup`` after the morph and the arms

- ``stable``: the stable scheme with its default rule (``STABLE_RULE`` in
  experiment/stability.py, experiment/rules.py: pointwise pairs re-factored with an orthogonal
  second factor, the parent layer's optimiser state mapped onto the factors, and the
  learning-rate multiplier ``1 / first-step amplification`` measured on the probe, under
  Adam times the parent layer's own typical step ``mean |m_hat| / sqrt(v_hat)``,
  ``adamn``: under Adam every other new entry starts at its stand-in's typical step, and
  ``wlr``: under SGD a widen's channel group takes the learning-rate multiplier
  ``1 / first-step amplification`` of the group, measured on the probe);
- ``netmorph``, ``net2net``: the baselines as published;
- ``netmorph+state+dlr+adamr``, ``net2net+state+dlr+adamr``: the baselines offered the same
  optimiser state mapping and multiplier (deepen, insert_subnet); ``netmorph+wlr``,
  ``net2net+wlr``: the baselines offered the widen multiplier (widen under SGD);
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
import subprocess
import sys
import time
from dataclasses import asdict, replace
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
# the widen rule offered to the baselines: an SGD multiplier (under AdamW these arms would
# repeat the published ones); the GPT growths' SGD rule is recorded the same way
# (transformer/sgd_rule.py) and offered in the GPT SGD cells
WIDEN_ARMS = ["netmorph+wlr", "net2net+wlr"]
BASELINES = ("netmorph", "net2net")
REGIMES = ["same", "raised", "warmup"]
LR = {"sgd": 0.05, "adamw": 0.003}
# A Fashion-MNIST arm takes ~40 s on the shared 2-core machine, a 54-run cell ~40 min: only
# this cell offers the baselines the stable rule ("+state+dlr+adamr"); the other Fashion-MNIST
# cells run the published arms and the parent (36 runs), as every widen cell does
FULL_FMNIST = "fmnist-cnn16-32-deepen-sgd"


def _cfg(dataset: str, model: str, model_kwargs: dict, morph: str, morph_kwargs: dict,
         optimizer: str, seeds: int, **extra: Any) -> ExperimentConfig:
    # the multiplier only concerns factor pairs (deepen, insert_subnet): elsewhere the "+dlr"
    # arms would repeat the published ones
    arms = ARMS if morph in ("deepen", "insert_subnet") else ARMS[:3]
    if morph in ("widen", "depth", "width") and optimizer == "sgd":
        arms = ARMS[:3] + WIDEN_ARMS
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
        # the issue: 5 seeds where a run takes under a minute (digits and GPT runs take
        # seconds), else 3 (Fashion-MNIST: 20-70 min a cell on the shared cores)
        cnn = {"widths": [16, 32]}
        out[f"digits-cnn-deepen-{opt}"] = ("cheap", _cfg(
            "digits", "cnn", cnn, "deepen", {"kernel_size": 3}, opt, 5))
        out[f"digits-cnn-widen-{opt}"] = ("cheap", _cfg(
            "digits", "cnn", cnn, "widen", {"factor": 2}, opt, 5))
        out[f"digits-cnn-subnet-{opt}"] = ("cheap", _cfg(
            "digits", "cnn", cnn, "insert_subnet", {}, opt, 5))
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
                name = f"fmnist-cnn{tag}-{morph}-{opt}"
                cfg = _cfg("fashion-mnist", "cnn", {"widths": widths}, morph, kw, opt, 3,
                           limit_train=12_000, limit_test=2_000, parent_steps=600)
                if name != FULL_FMNIST:
                    cfg = replace(cfg, schemes=ARMS[:3] + (
                        WIDEN_ARMS if morph == "widen" and opt == "sgd" else []))
                out[name] = ("costly", cfg)
        gpt = {"d_model": 32, "n_layer": 2, "n_head": 4, "head_dim": 8, "d_mlp": 128,
               "block_size": 32}
        for morph in ("depth", "width"):
            out[f"text-gpt-{morph}-{opt}"] = ("gpt", _cfg(
                "text", "gpt", gpt, morph, {}, opt, 5, limit_train=300_000, limit_test=128,
                parent_steps=300, child_steps=100, batch_size=16, dense_until=50,
                dense_every=5, every=25, drop_window=50, warmup_steps=25,
                lr=LR[opt] if opt == "adamw" else 0.1, weight_decay=0.0))
    return out


class MatrixError(RuntimeError):
    """A run folder or results file that cannot be read; the message names the file."""


JSON_FORMAT = 2


def expected_runs(cfg: ExperimentConfig) -> int:
    """How many run files a finished cell has."""
    return cfg.seeds * len(cfg.regimes) * (len(cfg.schemes) + len(cfg.baselines))


def finished(cfg: ExperimentConfig, folder: Path) -> bool:
    """Whether every run of the cell is on disk."""
    return len(list((folder / "runs").glob("*.json"))) >= expected_runs(cfg)


def _now() -> str:
    return f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(Path(__file__).parent), *args],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_commit() -> str | None:
    """The checked-out commit, with ``+changes`` when the library or this script differ
    from it (the code a run or report used)."""
    head = _git("rev-parse", "--short", "HEAD")
    if head and _git("status", "--porcelain", "--", ":/src", ":/benchmarks/stability_matrix.py"):
        head += "+changes"
    return head


def run_cell(name: str, cfg: ExperimentConfig, work: Path) -> list[Arm]:
    """Runs (resumes) one cell in ``work/name`` and appends what this invocation was
    (argv, start, end, load average, commit, machine) to the folder's ``invocations.jsonl``."""
    started, t0, load = _now(), time.time(), _loadavg()
    arms = Experiment(cfg, work / name, progress=False,
                      log=lambda m: print(f"[{name}] {m}", flush=True)).run()
    record = {"argv": sys.argv, "start": started, "end": _now(),
              "seconds": round(time.time() - t0, 1), "load_start": load,
              "load_end": _loadavg(), "commit": code_commit(), "machine": _machine()}
    with open(work / name / "invocations.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return arms


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise MatrixError(f"{path} cannot be read as JSON ({type(err).__name__}: {err})") from None


def _config(stored: Any, where: str) -> ExperimentConfig:
    if not isinstance(stored, dict):
        raise MatrixError(f"{where}: the config is not a JSON object")
    try:
        # a folder written before the stable rule was recorded ran the published scheme
        return ExperimentConfig(**{"stable_rule": [], **stored})
    except TypeError as err:
        raise MatrixError(f"{where}: not an experiment config ({err})") from None


def read_folder(folder: Path) -> tuple[ExperimentConfig, list[Arm]] | None:
    """The config a cell's folder ran and every run finished in it (trains nothing);
    ``None`` when the folder has no ``config.json``."""
    path = folder / "config.json"
    if not path.exists():
        return None
    cfg = _config(_read_json(path), str(path))
    arms = []
    for run in sorted((folder / "runs").glob("*.json")):
        try:
            arms.append(Arm(**_read_json(run)))
        except TypeError as err:
            raise MatrixError(f"{run} is not a run record ({err})") from None
    return cfg, arms


def _invocations(folder: Path) -> list[dict[str, Any]]:
    path = folder / "invocations.jsonl"
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as err:
        raise MatrixError(f"{path} has a line that is not JSON ({err})") from None


def folder_entry(folder: Path, cfg: ExperimentConfig, arms: list[Arm]) -> dict[str, Any]:
    """One cell's record for the report and the JSON, built from its run folder."""
    times = [p.stat().st_mtime for p in (folder / "runs").glob("*.json")]

    def stamp(t: float) -> str:
        return f"{datetime.datetime.fromtimestamp(t, datetime.UTC):%Y-%m-%d %H:%M} UTC"

    return {"config": json.loads(json.dumps(asdict(cfg))),
            "summary": cell_summary(cfg, arms), "runs": len(arms),
            "expected": expected_runs(cfg),
            "source": {"folder": str(folder), "first_run": stamp(min(times)),
                       "last_run": stamp(max(times)), "read_by_commit": code_commit(),
                       "read_on": _now(), "invocations": _invocations(folder)}}


def _runs_in(summary: dict[str, Any]) -> int:
    return sum(len(per) for reg in summary.values() for per in reg["arms"].values())


def _check_summary(summary: Any, where: str) -> None:
    keys = ("drop", "loss_rise", "final_acc", "final_loss")
    try:
        for reg in summary.values():
            for per in reg["arms"].values():
                for fig in per.values():
                    missing = [k for k in keys if k not in fig]
                    if missing:
                        raise MatrixError(f"{where}: a per-seed record lacks {missing}")
            reg["paired"].values()
    except (AttributeError, KeyError, TypeError) as err:
        raise MatrixError(f"{where}: not a cell summary (regime -> arms -> seed -> figures, "
                          f"and paired; {type(err).__name__}: {err})") from None


def load_results(path: Path, table: dict[str, tuple[str, ExperimentConfig]]) -> dict[str, Any]:
    """The cells a previous report recorded in ``path`` (``{}`` when it does not exist).

    Format 2 (``{"format": 2, "cells": {name: {config, summary, runs, expected, source}}}``)
    is read as is; format 1 (``{name: summary}``, before configs were stored) takes each
    cell's config from ``table`` and, as its source, the commit that last wrote the file.
    A file that is not one of these raises :class:`MatrixError` naming it."""
    if not path.exists():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise MatrixError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if "format" in data and data["format"] != JSON_FORMAT:
        raise MatrixError(f"{path}: unknown format {data['format']!r} (this script writes "
                          f"{JSON_FORMAT})")
    if "format" not in data:
        last = _git("log", "-1", "--format=%h of %cI", "--", str(path.resolve()))
        data = {"cells": {name: {
            "config": (json.loads(json.dumps(asdict(table[name][1]))) if name in table
                       else None),
            "summary": summary, "runs": None, "expected": None,
            "source": {"json_format_1": True, "json_commit": last,
                       "note": "config not stored by format 1: the cell's definition in "
                               "cells()"}} for name, summary in data.items()}}
    cells_ = data.get("cells")
    if not isinstance(cells_, dict):
        raise MatrixError(f"{path}: 'cells' is missing or not an object")
    for name, entry in cells_.items():
        where = f"{path}, cell {name!r}"
        if not isinstance(entry, dict) or "summary" not in entry or "source" not in entry:
            raise MatrixError(f"{where}: expected an object with 'summary' and 'source'")
        _check_summary(entry["summary"], where)
        if entry.get("config") is not None:
            _config(entry["config"], where)
        if entry.get("runs") is None:
            entry["runs"] = _runs_in(entry["summary"])
            cfg = table.get(name, (None, None))[1]
            entry["expected"] = expected_runs(cfg) if cfg else entry["runs"]
    return cells_


def collect(table: dict[str, tuple[str, ExperimentConfig]], work: Path,
            previous: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every cell with results: from its run folder when that holds at least as many runs
    as the previous JSON recorded (``origin: folder``), else from the JSON (``origin:
    json``); the folder's own ``config.json`` is the config of record."""
    out: dict[str, dict[str, Any]] = {}
    for name in [*table, *(n for n in previous if n not in table)]:
        got = read_folder(work / name)
        old = previous.get(name)
        if got is not None and got[1] and (old is None or len(got[1]) >= old["runs"]):
            out[name] = {**folder_entry(work / name, *got), "origin": "folder"}
        elif old is not None:
            note = (f"; its run folder holds only {len(got[1])} runs and was not used"
                    if got is not None and got[1] else "")
            out[name] = {**old, "origin": "json" + note}
        if name in out and name in table and out[name].get("config"):
            now = json.loads(json.dumps(asdict(table[name][1])))
            out[name]["stale"] = sorted(k for k in now if out[name]["config"].get(k) != now[k])
    return out


def cell_summary(cfg: ExperimentConfig, arms: list[Arm]) -> dict[str, Any]:
    """Per regime and arm: per-seed figures; per regime: paired differences."""
    out: dict[str, Any] = {}
    order = [*cfg.schemes, *cfg.baselines]
    arms = sorted(arms, key=lambda a: (order.index(a.arm) if a.arm in order else len(order),
                                       a.seed))
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


def _ms(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _mean(per: dict[Any, dict[str, Any]], key: str) -> float:
    vals = [v[key] for v in per.values() if v[key] is not None]
    return statistics.mean(vals) if vals else float("nan")


# a baseline "drops more than the parent" when its mean drop exceeds the parent's by more
# than one digits test image (1/360) or, for the language model, 0.005 nats of loss rise
TOLERANCE = {"drop": 0.003, "loss_rise": 0.005}


def judge(reg: dict[str, Any], metric: str = "drop") -> dict[str, Any] | None:
    """The tests of one cell/regime on ``metric`` (drop depth; loss rise for the language
    model); ``None`` when stable or a published baseline is missing.

    - ``judged``: the better published baseline's mean exceeds the parent's by more than
      :data:`TOLERANCE` (otherwise there is no drop to halve);
    - ``issue``: the issue's test, stable ≤ 0.5 × the better baseline;
    - ``excess``: the same on the excess over the parent trained on at the same rate,
      (stable − parent) ≤ 0.5 × (better baseline − parent);
    - ``stretch``: stable ≤ 2 × parent (+ :data:`TOLERANCE`);
    - ``worse``: ``{baseline: paired differences}`` where stable is worse than that published
      baseline beyond the paired spread (mean difference > its sd);
    - ``final_ok``: stable's final accuracy (language model: loss) at least the baselines';
    - ``final_behind``: ``{baseline: paired differences}`` where stable's final accuracy
      (loss) is behind that published baseline's beyond the paired spread.
    """
    arms = reg["arms"]
    if "stable" not in arms or not all(b in arms for b in BASELINES):
        return None
    stable = _mean(arms["stable"], metric)
    best = min(_mean(arms[b], metric) for b in BASELINES)
    parent = _mean(arms["parent"], metric) if "parent" in arms else 0.0
    final, sign = ("final_acc", -1.0) if metric == "drop" else ("final_loss", 1.0)
    worse = _behind(reg, metric, 1.0)
    final_behind = _behind(reg, final, sign)
    if metric == "drop":
        final_ok = _mean(arms["stable"], "final_acc") >= max(
            _mean(arms[b], "final_acc") for b in BASELINES) - 1e-12
    else:
        final_ok = _mean(arms["stable"], "final_loss") <= min(
            _mean(arms[b], "final_loss") for b in BASELINES) + 1e-12
    judged = best > parent + TOLERANCE[metric]
    return {"stable": stable, "best": best, "parent": parent, "judged": judged,
            "issue": judged and stable <= 0.5 * best,
            "excess": judged and stable - parent <= 0.5 * (best - parent),
            "stretch": stable <= 2 * parent + TOLERANCE[metric], "worse": worse,
            "final_ok": final_ok, "final_behind": final_behind,
            "ratio": stable / best if best > 0 else None,
            "excess_ratio": (stable - parent) / (best - parent) if judged else None}


def _behind(reg: dict[str, Any], key: str, sign: float) -> dict[str, list[float]]:
    """``{published baseline: paired differences stable − baseline on key}`` where
    ``sign`` × the mean difference exceeds its sd (stable worse beyond the paired spread;
    ``sign`` +1 where larger is worse, −1 where smaller is)."""
    out = {}
    for b in BASELINES:
        d = reg["paired"].get(b, {}).get(key, [])
        if len(d) > 1 and sign * statistics.mean(d) > statistics.stdev(d):
            out[b] = d
    return out


def verdict(reg: dict[str, Any], metric: str = "drop") -> tuple[str, float | None]:
    """The issue's verdict as text, and stable's value over the better baseline's."""
    j = judge(reg, metric)
    if j is None:
        return "incomplete", None
    notes = [f"worse than {b} beyond the paired spread" for b in j["worse"]]
    notes.append("final ≥ baselines" if j["final_ok"] else "final below a baseline")
    if not j["judged"]:
        head = (f"not judged: baselines ≈ parent (stable {j['stable']:.3f}, parent "
                f"{j['parent']:.3f})")
    else:
        head = ("**holds**" if j["issue"] else "fails") + (
            f" ({j['stable']:.3f} vs 0.5 × {j['best']:.3f}; parent {j['parent']:.3f})")
    return head + "; " + "; ".join(notes), j["ratio"]


def second_view(reg: dict[str, Any], metric: str = "drop") -> str:
    """The excess-over-parent test and the stretch goal as text."""
    j = judge(reg, metric)
    if j is None:
        return "incomplete"
    ex_s, ex_b = j["stable"] - j["parent"], j["best"] - j["parent"]
    head = ("not judged" if not j["judged"] else
            ("**holds**" if j["excess"] else "fails") + f" (+{ex_s:.3f} vs 0.5 × +{ex_b:.3f})")
    head = head.replace("+-", "−")
    stretch = ("stretch **holds**" if j["stretch"] else "stretch fails") + (
        f" ({j['stable']:.3f} vs 2 × {j['parent']:.3f})")
    return f"{head}; {stretch}"


def _metric(name: str, entry: dict[str, Any]) -> str:
    dataset = (entry.get("config") or {}).get("dataset")
    text = dataset == "text" if dataset else name.startswith("text-")
    return "loss_rise" if text else "drop"


def tallies(entries: dict[str, dict[str, Any]]) -> tuple[list[str], list[str], list[str]]:
    """The top of the report: counts under each view, every place stable is worse than a
    published baseline beyond the paired spread, and every place its final accuracy (loss)
    is behind one beyond the paired spread."""
    counts = {k: [0, 0] for k in ("issue", "excess", "stretch", "stretch_all", "final_ok",
                                  "final_spread")}
    judged = unjudged = parent_too = 0
    worse: list[str] = []
    behind: list[str] = []
    for name, entry in entries.items():
        metric = _metric(name, entry)
        for regime in REGIMES:
            reg = entry["summary"].get(regime)
            j = judge(reg, metric) if reg else None
            if j is None:
                continue
            judged += j["judged"]
            unjudged += not j["judged"]
            for key in ("issue", "excess", "stretch"):
                if j["judged"]:
                    counts[key][0 if j[key] else 1] += 1
            counts["stretch_all"][0 if j["stretch"] else 1] += 1
            parent_too += j["judged"] and not j["issue"] and j["parent"] > 0.5 * j["best"]
            counts["final_ok"][0 if j["final_ok"] else 1] += 1
            counts["final_spread"][1 if j["final_behind"] else 0] += 1
            for b, d in j["worse"].items():
                worse.append(f"{_label(name, entry)} / {regime}: stable − {b} = {_ms(d)} "
                             f"({metric})")
            final = "final_acc" if metric == "drop" else "final_loss"
            for b, d in j["final_behind"].items():
                behind.append(f"{_label(name, entry)} / {regime}: stable − {b} = "
                              f"{_ms(d, 4)} ({final})")
    table = [
        f"Over the {judged + unjudged} cell × regime pairs with stable and both published "
        f"baselines ({judged} judged: the better baseline's drop / loss rise exceeds the "
        f"parent's by more than {TOLERANCE['drop']} / {TOLERANCE['loss_rise']} nats; "
        f"{unjudged} not judged):", "",
        "| view | holds | fails |", "|---|---|---|",
        "| the issue's test: stable ≤ 0.5 × better baseline (judged pairs) | "
        f"{counts['issue'][0]} | {counts['issue'][1]} |",
        "| excess over the parent: (stable − parent) ≤ 0.5 × (better baseline − parent) "
        f"(judged pairs) | {counts['excess'][0]} | {counts['excess'][1]} |",
        f"| stretch: stable ≤ 2 × parent (+ tolerance) (judged pairs) | "
        f"{counts['stretch'][0]} | {counts['stretch'][1]} |",
        f"| stretch, every pair | {counts['stretch_all'][0]} | {counts['stretch_all'][1]} |",
        f"| stable's final accuracy (GPT: loss) at least the baselines' (every pair) | "
        f"{counts['final_ok'][0]} | {counts['final_ok'][1]} |",
        "| stable's final accuracy (GPT: loss) not behind a published baseline beyond the "
        f"paired spread (every pair) | {counts['final_spread'][0]} | "
        f"{counts['final_spread'][1]} |", "",
        f"In {parent_too} of the {counts['issue'][1]} pairs failing the issue's test the parent "
        "trained on at the same rate drops more than half the better baseline's drop itself: "
        "a child that trained exactly like its parent would fail them too.",
    ]
    return table, worse, behind


def _label(name: str, entry: dict[str, Any]) -> str:
    """The cell's name, with ``(partial n/N runs)`` while it is unfinished."""
    if entry["runs"] >= entry["expected"]:
        return name
    return f"{name} (partial {entry['runs']}/{entry['expected']} runs)"


def _describe(entry: dict[str, Any]) -> str:
    c = entry.get("config")
    if not c:
        return "config not recorded."
    return (f"{c['dataset']}, {c['model']} {c['model_kwargs']}, `{c['morph']}` "
            f"{c['morph_kwargs']}, {c['optimizer']} lr {c['lr']} (parent {c['parent_steps']} "
            f"steps, lr/10 at 2/3), {c['child_steps']} steps after the morph, batch "
            f"{c['batch_size']}, {c['seeds']} seeds, drop window {c['drop_window']}, warm-up "
            f"{c['warmup_steps']} steps, train/test limit {c['limit_train']}/"
            f"{c['limit_test']}, stable rule {c['stable_rule']}.")


def _provenance(name: str, entry: dict[str, Any]) -> str:
    src, origin = entry["source"], entry["origin"]
    state = ("complete" if entry["runs"] >= entry["expected"]
             else f"**partial: {entry['runs']}/{entry['expected']} runs**")
    if src.get("json_format_1"):
        if entry.get("stale"):
            state += (f"; **ran an older definition** (differs from `cells()` now in "
                      f"{', '.join(entry['stale'])})")
        return (f"| {name} | committed JSON (format 1) | {state} | run before commit "
                f"{src.get('json_commit') or '(unknown)'}, which wrote that JSON; run folder "
                "lost, config = the cell's definition | - | - |")
    inv = src.get("invocations", [])
    wall = f"{sum(i['seconds'] for i in inv) / 60:.1f} min in {len(inv)} invocation(s)" if inv \
        else "not recorded"
    loads = "; ".join(f"{i['load_start']} → {i['load_end']}" for i in inv) or "-"
    commits = ", ".join(dict.fromkeys(str(i.get("commit")) for i in inv)) or "-"
    where = "run folder" if origin == "folder" else f"committed JSON ({origin[4:].lstrip('; ')})"
    where = where.replace(" ()", "")
    if entry.get("stale"):
        state += (f"; **ran an older definition** (differs from `cells()` now in "
                  f"{', '.join(entry['stale'])})")
    return (f"| {name} | {where} | {state} | `{src['folder']}`, runs {src['first_run']} … "
            f"{src['last_run']}, run at commit {commits}, summarised at "
            f"{src['read_by_commit']} | {wall} | {loads} |")


def _cell_section(name: str, entry: dict[str, Any]) -> list[str]:
    summary = entry["summary"]
    lines = ["", f"## {_label(name, entry)}", "", _describe(entry), "",
             "| regime | arm | drop | loss rise | recover | final acc | final loss | zeros | "
             "moved |", "|---|---|---|---|---|---|---|---|---|"]
    for regime, reg in summary.items():
        for arm, seeds in reg["arms"].items():
            per = list(seeds.values())
            rec = [p["recover"] for p in per]
            never = sum(r is None for r in rec)
            rec_txt = _ms([float(r) for r in rec if r is not None], 0)
            if never:
                rec_txt += f" ({never} never)"
            lines.append(
                f"| {regime} | {arm} | {_ms([p['drop'] for p in per])} | "
                f"{_ms([p['loss_rise'] for p in per])} | {rec_txt} | "
                f"{_ms([p['final_acc'] for p in per])} | {_ms([p['final_loss'] for p in per])} | "
                f"{_ms([p.get('zeros') for p in per if p.get('zeros') is not None])} | "
                f"{_ms([p.get('moved') for p in per if p.get('moved') is not None])} |")
    lines += ["", "Paired differences, stable minus arm (negative drop / rise: stable "
              "better; positive final acc: stable better):", "",
              "| regime | arm | Δ drop | Δ loss rise | Δ final acc | Δ final loss |",
              "|---|---|---|---|---|---|"]
    for regime, reg in summary.items():
        for arm, d in reg["paired"].items():
            lines.append(f"| {regime} | {arm} | {_ms(d['drop'])} | {_ms(d['loss_rise'])} | "
                         f"{_ms(d['final_acc'])} | {_ms(d['final_loss'])} |")
    return lines


def write_report(entries: dict[str, dict[str, Any]], planned: list[str], command: str,
                 started: float, load_start: str, results: Path = RESULTS) -> Path:
    """Writes ``stability_matrix.{json,md,png}`` into ``results`` from ``entries``
    (:func:`collect`)."""
    results.mkdir(parents=True, exist_ok=True)
    commit = code_commit()
    meta = {"command": command, "written": _now(), "commit": commit, "machine": _machine(),
            "load_start": load_start, "load_end": _loadavg()}
    stored = {name: {k: v for k, v in e.items() if k not in ("origin", "stale")}
              for name, e in entries.items()}
    (results / "stability_matrix.json").write_text(json.dumps(
        {"format": JSON_FORMAT, "report": meta, "cells": stored}, indent=1, default=str))
    counts, worse, behind = tallies(entries)
    missing = [n for n in planned if n not in entries]
    lines = [
        "# The stability matrix", "",
        f"Report: `{command}` at commit {commit}, {meta['written']}; {meta['machine']}; "
        f"load average {load_start} at the start, {meta['load_end']} at the end (the 2 cores "
        f"are shared with other agents); {(time.time() - started) / 60:.0f} min for this "
        "invocation.  ",
        "Cells are run with `PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 5 python "
        "benchmarks/stability_matrix.py --cells CELL --work runs/stability_matrix` (or "
        "`run_cell(CELL, cells()[CELL][1], Path('runs/stability_matrix'))` from `python -c`, "
        "one cell per process: argv `-c CELL` below; each cell in `runs/stability_matrix/CELL`, "
        "resumed where stopped, every invocation recorded in its `invocations.jsonl`); the "
        "report is rebuilt "
        "with `--report-only`: a cell's run folder is used when present, otherwise its "
        "per-seed figures and config come from the committed `stability_matrix.json` "
        "(provenance table below).", "",
        "## Summary", "", *counts, "",
        "Stable worse than a published baseline beyond the paired spread (mean paired "
        "difference > its sd): " + ("; ".join(worse) if worse else "nowhere") + ".", "",
        "Stable's final accuracy (GPT: loss) behind a published baseline beyond the paired "
        "spread: " + ("; ".join(behind) if behind else "nowhere") + ".", "",
        f"Cells with results: {len(entries)}; planned without results: "
        f"{', '.join(missing) or 'none'}.", "",
        f"Cells that ran an older definition than `cells()` holds now (the table below names "
        f"the fields): {sum(bool(e.get('stale')) for e in entries.values())} of "
        f"{len(entries)}.", "",
        "## Where each cell's figures come from", "",
        "| cell | from | runs | run | wall time | load average (start → end) |",
        "|---|---|---|---|---|---|",
        *[_provenance(n, e) for n, e in entries.items()], "",
        "Arms: `stable` = stable scheme + its default rule (`STABLE_RULE`: pointwise pairs "
        "re-factored with an orthogonal second factor, the parent layer's optimiser state "
        "mapped onto the factors, learning-rate multiplier 1/first-step amplification on the "
        "probe, under Adam times the parent layer's typical step, since `adamn` under "
        "Adam every other new entry (fresh parameters, new units of widened tensors) "
        "starting at its stand-in's typical step, and since `wlr` under SGD a widen's whole "
        "channel group (producer rows, norm entries, consumer columns) at the learning-rate "
        "multiplier 1/first-step amplification of the group on the probe, and since the "
        "`gptsgd` branch (g) under SGD a GPT growth's every parameter at 1/the whole "
        "model's first-step amplification at the logits on the probe; a cell's "
        "`stable_rule` is in its provenance row; the research log is "
        "`stability_research.md`); `netmorph`, "
        "`net2net` as published; `+state+dlr+adamr` = the same state "
        "mapping and multipliers offered to a baseline (for widen, where there is no factor "
        "pair, these arms are left out); `+wlr` = the widen multiplier offered to a baseline "
        "(widen and the GPT growths under SGD; a no-op under AdamW); `parent` = the parent "
        "trained on. Drop = parent accuracy minus the worst accuracy "
        "in the first `drop_window` steps; loss rise = worst test loss in that window minus "
        "the parent's; recover = steps until the parent's accuracy is regained; moved = "
        "||Δθ||/||θ₀|| of the morph's new parameters at the end. Mean ± sd over seeds; paired "
        "= stable minus the arm, per seed (same batches), mean ± sd.", "",
        "## Verdicts: the issue's test (stable's drop, loss rise for the GPT, ≤ 0.5 × the "
        "better published baseline's, where a baseline drops more than the parent by over "
        f"{TOLERANCE['drop']} / {TOLERANCE['loss_rise']} nats)", "",
        "| cell | " + " | ".join(REGIMES) + " |", "|---|" + "---|" * len(REGIMES),
    ]
    for name, entry in entries.items():
        row = [verdict(entry["summary"][r], _metric(name, entry))[0]
               if r in entry["summary"] else "-" for r in REGIMES]
        lines.append(f"| {_label(name, entry)} | " + " | ".join(row) + " |")
    lines += ["", "## Verdicts: excess over the parent trained on at the same rate, and the "
              "stretch goal", "",
              "Where the parent itself drops (rises) almost as much as the baselines, the "
              "issue's test asks the child to be stabler than its own parent. This view "
              "judges the growth's own share: (stable − parent) ≤ 0.5 × (better baseline − "
              "parent), on the same judged pairs; stretch: stable ≤ 2 × parent (+ the "
              "tolerance above), on every pair.", "",
              "| cell | " + " | ".join(REGIMES) + " |", "|---|" + "---|" * len(REGIMES)]
    for name, entry in entries.items():
        row = [second_view(entry["summary"][r], _metric(name, entry))
               if r in entry["summary"] else "-" for r in REGIMES]
        lines.append(f"| {_label(name, entry)} | " + " | ".join(row) + " |")
    for name, entry in entries.items():
        lines += _cell_section(name, entry)
    research = RESULTS / "stability_research.md"
    if research.exists():
        lines += ["", research.read_text().strip()]
    path = results / "stability_matrix.md"
    path.write_text("\n".join(lines) + "\n")
    heatmap(entries, results)
    return path


def readme_table(entries: dict[str, dict[str, Any]], regimes: tuple[str, ...] = ("raised",
                 "warmup")) -> list[str]:
    """The README's table (mean over seeds per cell and regime): stable's drop (loss rise for
    the language model), the published baselines', the baselines offered the rule's
    optimiser parts, the parent trained on, and final accuracy (loss) of stable and of the
    better published baseline."""
    rows = ["| cell (seeds) | lr after | stable: drop (GPT: loss rise, nats) | netmorph | "
            "net2net | netmorph / net2net + rule's optimiser parts | parent trained on | "
            "final acc (GPT: loss) stable / best published |", "|---|---|---|---|---|---|---|---|"]
    for name, entry in entries.items():
        metric = _metric(name, entry)
        final, best = ("final_loss", min) if metric == "loss_rise" else ("final_acc", max)
        seeds = (entry.get("config") or {}).get("seeds", "?")
        for regime in regimes:
            arms = entry["summary"].get(regime, {}).get("arms", {})
            if "stable" not in arms:
                continue

            def m(arm: str, key: str = metric, arms: dict = arms) -> str:
                return f"{_mean(arms[arm], key):.3f}" if arm in arms else "-"

            offered = [next((a for a in arms if a.startswith(f"{b}+")), "") for b in BASELINES]
            rule = " / ".join(m(a) for a in offered) if all(offered) else "-"
            published = [_mean(arms[b], final) for b in BASELINES if b in arms]
            rows.append(f"| {name} ({seeds}) | {regime} | **{m('stable')}** | {m('netmorph')} "
                        f"| {m('net2net')} | {rule} | {m('parent')} | {m('stable', final)} / "
                        f"{best(published):.3f} |")
    return rows


def heatmap(entries: dict[str, dict[str, Any]], results: Path) -> None:
    """Two panels per cell and regime: stable over the better published baseline, and
    stable's excess over the parent over the baseline's excess (log2 colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(entries)
    if not names:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.4 * len(names) + 1.8), sharey=True)
    for ax, key, title in (
            (axes[0], "ratio", "stable / better baseline\n(issue's test: < 0.5)"),
            (axes[1], "excess_ratio", "(stable − parent) / (baseline − parent)\n(excess "
                                      "view: < 0.5; '-' = baselines ≈ parent)")):
        data = []
        for n in names:
            row = []
            for r in REGIMES:
                reg = entries[n]["summary"].get(r)
                j = judge(reg, _metric(n, entries[n])) if reg else None
                row.append(j[key] if j else None)
            data.append(row)
        grid = [[math.log2(max(v, 1 / 16)) if v is not None else float("nan") for v in row]
                for row in data]
        im = ax.imshow(grid, cmap="RdYlGn_r", vmin=-4, vmax=4, aspect="auto")
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if v is None else f"{v:.2f}", ha="center", va="center",
                        fontsize=7)
        ax.set_xticks(range(len(REGIMES)), REGIMES)
        ax.set_title(title, fontsize=9)
    axes[0].set_yticks(range(len(names)), [_label(n, entries[n]) for n in names], fontsize=7)
    fig.suptitle("stable's drop (GPT: loss rise), log2 colour", fontsize=10)
    fig.colorbar(im, ax=axes, label="log2 ratio")
    fig.savefig(results / "stability_matrix.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=["cheap"],
                        help="cells to run: names, or a cost class: cheap, gpt, costly, all")
    parser.add_argument("--work", type=Path, default=Path("runs/stability_matrix"),
                        help="experiment folders (resumed)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where stability_matrix.{md,json,png} are written; the JSON "
                        "already there supplies the cells whose run folder is absent")
    parser.add_argument("--list", action="store_true", help="list the cells and exit")
    parser.add_argument("--readme-table", action="store_true",
                        help="print the README's table from the committed JSON and exit")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: rebuild the report from the run folders and the "
                        "committed JSON")
    args = parser.parse_args(argv)
    table = cells()
    if args.readme_table:
        path = args.results / "stability_matrix.json"
        try:
            if not path.is_file():
                raise MatrixError(f"{path} does not exist: nothing to build the table from")
            stored = load_results(path, table)
        except MatrixError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print("\n".join(readme_table({n: stored[n] for n in table if n in stored})))
        return 0
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
    started, load_start = time.time(), _loadavg()
    torch.set_num_threads(1)
    command = "python benchmarks/stability_matrix.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        previous = load_results(args.results / "stability_matrix.json", table)
        for name in [] if args.report_only else list(dict.fromkeys(wanted)):
            try:
                run_cell(name, table[name][1], args.work)
            except Exception as err:  # a missing data set must not stop the other cells
                print(f"[{name}] skipped: {type(err).__name__}: {err}", flush=True)
            write_report(collect(table, args.work, previous), list(table), command, started,
                         load_start, args.results)
        path = write_report(collect(table, args.work, previous), list(table), command,
                            started, load_start, args.results)
    except MatrixError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
