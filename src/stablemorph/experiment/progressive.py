"""Progressive growth against training the large model from scratch: compute to reach its loss.

Per seed, on one cell (:mod:`stablemorph.experiment.progressive_tasks`: the char-level GPT, a
Hugging Face Llama, the Fashion-MNIST CNN), every arm trains under the SAME FLOPs budget: the
FLOPs the large model spends in ``budget_steps`` steps from scratch. Growing arms start at
the first size and grow at the steps ``stage_fractions * budget_steps`` to the next sizes in
place (:func:`stablemorph.progressive.grow_in_place`: the same model and AdamW objects,
state mapped), then train on until their FLOPs reach the budget (cheaper steps: more of
them). Every arm sees the batches of the same global steps; AdamW with a linear warm-up,
then a constant rate, or a cosine to 0 over the FLOPs budget (the same for every arm).

Arms (:data:`ARMS`):
- ``stable``, ``net2net``, ``netmorph``: exact growth with that scheme;
- ``stack``: G_stack-style copy of the whole stack of blocks (not function-preserving);
- ``random``: new parts randomly initialised (not function-preserving);
- ``scratch``: the large model from step 0.
Growth timing: ``stable@f1,f2`` arms grow at other fractions of ``budget_steps``; ``plateau``
grows when the evaluation loss stops improving
(:class:`stablemorph.progressive.PlateauTrigger`). Compute-matched short runs:
``ARM~f`` trains ``ARM`` on the fraction ``f`` of the budget (its stages and its cosine
scaled to it), so "reaches scratch's final loss with 40% of its FLOPs" is tested with a
schedule that ends there, not read off the middle of a longer one.

Figures (per arm, mean ± sd over seeds): final loss; FLOPs and seconds to first reach the
scratch arm's final loss (same seed; losses are the mean of the last 3 evaluations, so one
lucky evaluation counts for nothing), as % saved against what the scratch arm needed to reach
it; the same for accuracy; the paired difference to stable; the largest evaluation-loss rise
within ``spike_window`` steps after a growth.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from stablemorph.experiment.progressive_tasks import (
    ANCHORS,
    EXACT,
    TASKS,
    Task,
    block_slots,
    check_stages,
    make_task,
)
from stablemorph.experiment.train import loss_fn
from stablemorph.flops import FlopMeter
from stablemorph.progressive import PlateauTrigger, grow_in_place
from stablemorph.transformer.train import OptimConfig, make_adamw

ARMS = ("scratch", *EXACT, *ANCHORS, "plateau")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class ProgressiveConfig:
    """Task, sizes, budget and schedule of the comparison (defaults: minutes on 2 CPU cores).

    ``layers`` and ``widths`` give the model at the start and after each growth (depth; width
    multiplier of the start model, ``None``: depth only); see
    :mod:`stablemorph.experiment.progressive_tasks`."""

    task: str = "gpt"
    d_model: int = 48
    n_head: int = 4
    block_size: int = 48
    batch_size: int = 16
    layers: tuple[int, ...] = (2, 4, 8)
    widths: tuple[float, ...] | None = None
    budget_steps: int = 1200
    stage_fractions: tuple[float, ...] = (0.15, 0.3)
    timing: tuple[tuple[float, ...], ...] = ((0.3, 0.5), (0.45, 0.7))
    lr: float = 3e-3
    warmup_steps: int = 50
    eval_every: int = 40
    eval_windows: int = 64
    spike_window: int = 80
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ARMS
    max_chars: int = 400_000
    plateau_patience: int = 3
    lr_schedule: str = "constant"
    cnn_widths: tuple[int, ...] = (8, 16)
    dataset: str = "fashion-mnist"
    limit_test: int | None = 2000
    budget_fractions: tuple[float, ...] = ()
    short_arms: tuple[str, ...] = ("scratch", "plateau")

    def __post_init__(self) -> None:
        for name in ("budget_steps", "eval_every", "batch_size", "d_model", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        if self.widths is None and list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must grow strictly, e.g. (2, 4, 8); got {self.layers}")
        check_stages(self.layers, self.widths or (1.0,) * len(self.layers))
        for fr in (self.stage_fractions, *self.timing):
            if len(fr) != len(self.layers) - 1 or list(fr) != sorted(fr) or not 0 < fr[0] \
                    or fr[-1] >= 1:
                raise ValueError(f"stage fractions {fr} must be increasing, in (0, 1), one per "
                                 f"growth ({len(self.layers) - 1})")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got "
                             f"{self.lr_schedule!r}")
        unknown = set(self.arms) - set(ARMS) - {_timing_name(t) for t in self.timing}
        if unknown:
            raise ValueError(f"unknown arms {sorted(unknown)}; choose from {list(ARMS)}")
        if any(not 0 < f < 1 for f in self.budget_fractions):
            raise ValueError(f"budget fractions must be in (0, 1), got {self.budget_fractions}")
        base = [*self.arms, *(_timing_name(t) for t in self.timing)]
        if self.budget_fractions and set(self.short_arms) - set(base):
            raise ValueError(f"short arms {sorted(set(self.short_arms) - set(base))} are not "
                             f"among the arms {base}")

    def all_arms(self) -> list[str]:
        base = [*self.arms, *(_timing_name(t) for t in self.timing)]
        return base + [f"{a}~{f:g}" for f in self.budget_fractions for a in self.short_arms]


def split_arm(arm: str) -> tuple[str, float]:
    """``"plateau~0.5"`` -> ``("plateau", 0.5)``; an arm without ``~`` has the whole budget."""
    base, _, fraction = arm.partition("~")
    return base, float(fraction) if fraction else 1.0


def lr_factor(schedule: str, step: int, warmup: int, spent: float) -> float:
    """The rate's multiplier at global step ``step`` after spending the fraction ``spent`` of
    the FLOPs budget: a linear warm-up over ``warmup`` steps, then 1 (``"constant"``) or a
    cosine from 1 to 0 over the budget (``"cosine"``). The cosine runs on FLOPs, not steps,
    so that every arm, whatever its step cost, ends its schedule at the same budget."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "constant":
        return warm
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, spent))))


def _timing_name(fractions: Sequence[float]) -> str:
    return "stable@" + ",".join(f"{f:g}" for f in fractions)


def stack_blocks(model: nn.Module, n_layer: int, seed: int = 0) -> nn.Module:
    """G_stack on the project's GPT: the parent's blocks repeated in order until ``n_layer``
    (a multiple)."""
    from stablemorph.experiment.progressive_tasks import _rebuild_gpt

    return _rebuild_gpt(model, block_slots(model.config.n_layer, n_layer, "stack"), "stack",
                        seed)


def random_blocks(model: nn.Module, n_layer: int, seed: int = 0) -> nn.Module:
    """New randomly initialised GPT blocks at the places the exact schemes insert theirs."""
    from stablemorph.experiment.progressive_tasks import _rebuild_gpt

    return _rebuild_gpt(model, block_slots(model.config.n_layer, n_layer, "random"),
                        "random", seed)


# --- one run


@dataclass
class Curve:
    """Evaluations of one (arm, seed): step, cumulative FLOPs, seconds, evaluation loss,
    accuracy (per token for the language models)."""

    arm: str
    seed: int
    points: list[tuple[int, int, float, float, float]] = field(default_factory=list)
    growths: list[tuple[int, str]] = field(default_factory=list)  # (step, sizes after)


def _stages_of(cfg: ProgressiveConfig, arm: str, fraction: float = 1.0
               ) -> tuple[dict[int, int], PlateauTrigger | None]:
    """Global step -> stage index of the fixed schedule (on ``fraction`` of the budget), or
    the plateau trigger."""
    if arm == "scratch":
        return {}, None
    if arm == "plateau":
        trigger = PlateauTrigger(list(range(1, len(cfg.layers))),
                                 patience=cfg.plateau_patience, min_delta=0.01)
        return {}, trigger
    fractions = cfg.stage_fractions
    for t in cfg.timing:
        if arm == _timing_name(t):
            fractions = t
    return {round(f * fraction * cfg.budget_steps): i + 1 for i, f in enumerate(fractions)}, None


def run_arm(cfg: ProgressiveConfig, task: Task, arm: str, seed: int, budget: int) -> Curve:
    """Train one arm until its FLOPs reach ``budget`` (``ARM~f``: ``f * budget``)."""
    base, fraction = split_arm(arm)
    budget = round(budget * fraction)
    model = task.build(seed, final=base == "scratch")
    optimizer = make_adamw(model, OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                              batch_size=cfg.batch_size))
    stages, trigger = _stages_of(cfg, base, fraction)
    meter, curve = FlopMeter(), Curve(arm, seed)
    seconds = 0.0  # training and growth time; evaluations are not counted
    step, grown = 0, 0

    def grow(stage: int) -> None:
        for growth in task.growths(base, model, stage, seed):
            grow_in_place(model, growth, optimizer)
        s = task.stages[stage]
        curve.growths.append((step, f"{s.layers}L x{s.width:g}"))

    while True:
        spent = meter.total >= budget
        if step % cfg.eval_every == 0 or spent:
            loss, acc = task.evaluate(model)
            curve.points.append((step, meter.total, seconds, loss, acc))
            if trigger is not None and grown < len(task.stages) - 1:
                fired = trigger.observe(loss)
                if fired is not None:
                    stages[step] = int(fired)
        if spent:
            break
        started = time.perf_counter()
        if step in stages:
            grown = stages[step]
            grow(grown)
        rate = cfg.lr * lr_factor(cfg.lr_schedule, step, cfg.warmup_steps, meter.total / budget)
        for group in optimizer.param_groups:  # keeping the multipliers growth recorded
            group["lr"] = rate * group.get("lr_scale", 1.0)
        x, y = task.batch(step, seed)
        loss_t = loss_fn(task.logits(model, x), y)
        optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        optimizer.step()
        seconds += time.perf_counter() - started
        meter.add(model, x)
        step += 1
    return curve


SMOOTH = 3  # evaluations averaged: single evaluations wobble by about 0.01 nats
LOSS, ACC = 3, 4  # columns of Curve.points


def _smoothed(curve: Curve, col: int = LOSS) -> list[tuple[int, float, float]]:
    """(FLOPs, seconds, mean of column ``col`` over the last ``SMOOTH`` evaluations) at each
    evaluation."""
    values = [p[col] for p in curve.points]
    return [(p[1], p[2], statistics.fmean(values[max(0, i - SMOOTH + 1):i + 1]))
            for i, p in enumerate(curve.points)]


def _target(scratch: Curve, col: int = LOSS) -> float:
    """The scratch arm's final loss (accuracy): the mean of its last ``SMOOTH`` evaluations."""
    return _smoothed(scratch, col)[-1][2]


def _reach(curve: Curve, target: float, col: int = LOSS) -> tuple[int, float] | None:
    """FLOPs and seconds at the first evaluation whose smoothed loss is at or below
    ``target`` (accuracy: at or above)."""
    for flops, seconds, value in _smoothed(curve, col):
        if (value <= target) if col == LOSS else (value >= target):
            return flops, seconds
    return None


def _spike(curve: Curve, window: int) -> float:
    """Largest evaluation-loss rise within ``window`` steps after any growth (0 if none)."""
    worst = 0.0
    for g_step, _ in curve.growths:
        at = [p[LOSS] for p in curve.points if p[0] <= g_step]
        after = [p[LOSS] for p in curve.points if g_step < p[0] <= g_step + window]
        if at and after:
            worst = max(worst, max(after) - at[-1])
    return worst


def run(cfg: ProgressiveConfig, out_dir: Path, command: str = "",
        log: Callable[[str], None] = print) -> dict:
    """Every (arm, seed); write ``progressive.md``, ``progressive.png``, ``progressive.json``
    to ``out_dir``; return the summary. Finished runs in ``progressive.json`` are reused.

    Refuses, before any training, a plan the task cannot grow: each arm's growths are run
    once on a start model (:meth:`stablemorph.progressive.GrowthSchedule.check`'s rule)."""
    task = make_task(cfg)
    task.check([split_arm(a)[0] for a in cfg.all_arms()])
    _dry_run(cfg, task)
    load_at_start, commit = _loadavg(), _commit()
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "progressive.json"
    done: dict[str, dict] = {}
    if store.exists():
        saved = json.loads(store.read_text())
        if _run_defining(saved.get("config", {})) == _run_defining(_config_json(cfg)):
            done = saved["runs"]
    x, _ = task.batch(0, 0)
    budget = FlopMeter().per_step(task.build(0, final=True), x) * cfg.budget_steps
    for seed in cfg.seeds:
        for arm in cfg.all_arms():
            key = f"{arm}/{seed}"
            if key in done:
                continue
            t0 = time.perf_counter()
            curve = run_arm(cfg, task, arm, seed, budget)
            done[key] = dataclasses.asdict(curve)
            store.write_text(json.dumps({"config": _config_json(cfg), "runs": done}))
            log(f"{key}: final loss {curve.points[-1][LOSS]:.4f}, accuracy "
                f"{curve.points[-1][ACC]:.4f}, {len(curve.points)} evals, "
                f"{time.perf_counter() - t0:.0f}s")
    curves = {k: Curve(**v) for k, v in done.items()}
    summary = summarise(cfg, curves)
    write_report(cfg, task, summary, curves, out_dir, command,
                 provenance=f"commit {commit}; load average (1/5/15 min) at the start "
                            f"{load_at_start}, at the end {_loadavg()}")
    return summary


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _dry_run(cfg: ProgressiveConfig, task: Task) -> None:
    """Grow a start model through every stage with each arm's growths (one arm per growth
    kind), so that a plan the model cannot take fails before training, naming the stage."""
    kinds = {"stable" if a == "plateau" or a.startswith("stable@") else a
             for a in (split_arm(b)[0] for b in cfg.all_arms()) if a != "scratch"}
    for arm in sorted(kinds):
        model = task.build(0, final=False)
        for stage in range(1, len(task.stages)):
            try:
                for growth in task.growths(arm, model, stage, 0):
                    model = growth(model)
            except Exception as err:
                raise ValueError(f"{task.name}: arm {arm}, growth {stage} (to "
                                 f"{task.stages[stage]}): the model cannot take it: "
                                 f"{type(err).__name__}: {err}") from err


def _config_json(cfg: ProgressiveConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# Which arms and seeds run does not change any one run: a rerun with more (or fewer) of them
# reuses the finished runs it still wants.
_SELECTION = ("arms", "seeds", "timing", "budget_fractions", "short_arms")


def _run_defining(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _SELECTION}


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _saved(curve: Curve, scratch: Curve, col: int) -> tuple[float, float] | None:
    """% FLOPs and % seconds saved by ``curve`` to reach scratch's final value of ``col``,
    against what scratch needed to reach it; ``None`` if ``curve`` never reaches it."""
    target = _target(scratch, col)
    hit, base = _reach(curve, target, col), _reach(scratch, target, col)
    if hit is None or base is None:
        return None
    return 100 * (1 - hit[0] / base[0]), 100 * (1 - hit[1] / base[1])


def summarise(cfg: ProgressiveConfig, curves: dict[str, Curve]) -> dict:
    """Per arm: final loss and accuracy, % FLOPs / time saved to reach scratch's final loss
    (and accuracy), the paired difference of FLOPs saved against stable, spike."""
    out: dict[str, dict] = {}
    for arm in cfg.all_arms():
        row: dict[str, list[float]] = {k: [] for k in (
            "final", "final_acc", "flops_saved", "time_saved", "acc_flops_saved",
            "acc_time_saved", "spike", "vs_stable")}
        reached = acc_reached = seeds = 0
        for seed in cfg.seeds:
            curve, scratch = curves.get(f"{arm}/{seed}"), curves.get(f"scratch/{seed}")
            if curve is None or scratch is None:
                continue
            seeds += 1
            row["final"].append(curve.points[-1][LOSS])
            row["final_acc"].append(curve.points[-1][ACC])
            row["spike"].append(_spike(curve, cfg.spike_window))
            saved = _saved(curve, scratch, LOSS)
            if saved is not None:
                reached += 1
                row["flops_saved"].append(saved[0])
                row["time_saved"].append(saved[1])
                stable = curves.get(f"stable/{seed}")
                base = _saved(stable, scratch, LOSS) if stable is not None else None
                if base is not None:
                    row["vs_stable"].append(saved[0] - base[0])
            saved = _saved(curve, scratch, ACC)
            if saved is not None:
                acc_reached += 1
                row["acc_flops_saved"].append(saved[0])
                row["acc_time_saved"].append(saved[1])
        out[arm] = {k: _mean_sd(v) for k, v in row.items()}
        out[arm].update(reached=reached, acc_reached=acc_reached, seeds=seeds,
                        per_seed_flops_saved=row["flops_saved"])
    return out


def write_report(cfg: ProgressiveConfig, task: Task, summary: dict, curves: dict[str, Curve],
                 out_dir: Path, command: str = "", provenance: str = "") -> None:
    """``progressive.md`` (table, settings, machine) and ``progressive.png`` (loss and
    accuracy against FLOPs, loss against seconds, mean over seeds per arm)."""
    _plot(cfg, task, curves, out_dir / "progressive.png")

    def fmt(ms: tuple[float, float], digits: int = 3) -> str:
        m, s = ms
        return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"

    sizes = " -> ".join(f"{s.layers}L x{s.width:g}" for s in task.stages)
    lines = [
        f"# Progressive growth vs the large model from scratch ({task.name})", "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s), torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}"
        f"{'; ' + provenance if provenance else ''}.", "",
        f"{task.describe()}; sizes {sizes} (layers, width multiplier); budget: the FLOPs of "
        f"{cfg.budget_steps} steps of the largest model; growth at "
        f"{', '.join(f'{f:g}' for f in cfg.stage_fractions)} of {cfg.budget_steps} steps; "
        f"AdamW lr {cfg.lr}, warm-up {cfg.warmup_steps}, then {cfg.lr_schedule}"
        f"{' to 0 over the FLOPs budget' if cfg.lr_schedule == 'cosine' else ''}; "
        f"seeds {list(cfg.seeds)}. Loss and accuracy: {task.metric} (accuracy per token for "
        f"the language models).", "",
        "| arm | final loss | final accuracy | FLOPs saved to scratch's final loss | time saved "
        "| seeds reaching it | FLOPs saved minus stable's (paired) | FLOPs saved to scratch's "
        "final accuracy | largest rise after a growth |", "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, row in summary.items():
        lines.append(
            f"| {arm} | {fmt(row['final'])} | {fmt(row['final_acc'])} | "
            f"{fmt(row['flops_saved'], 1)} % | {fmt(row['time_saved'], 1)} % | "
            f"{row['reached']}/{row['seeds']} | {fmt(row['vs_stable'], 1)} | "
            f"{fmt(row['acc_flops_saved'], 1)} % ({row['acc_reached']}/{row['seeds']}) | "
            f"{fmt(row['spike'])} |")
    if command:
        lines += ["", "Command:", "", f"    {command}"]
    (out_dir / "progressive.md").write_text("\n".join(lines) + "\n")


def _plot(cfg: ProgressiveConfig, task: Task, curves: dict[str, Curve], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ((1, LOSS, "training FLOPs", task.metric), (2, LOSS, "seconds", task.metric),
              (1, ACC, "training FLOPs", "accuracy"))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for arm in cfg.all_arms():
        runs = [curves[f"{arm}/{s}"] for s in cfg.seeds if f"{arm}/{s}" in curves]
        if not runs:
            continue
        n = min(len(r.points) for r in runs)
        for ax, (xcol, ycol, _, _) in zip(axes, panels, strict=True):
            xs = [statistics.fmean(r.points[i][xcol] for r in runs) for i in range(n)]
            ys = [statistics.fmean(r.points[i][ycol] for r in runs) for i in range(n)]
            ax.plot(xs, ys, label=arm, lw=2 if arm in ("stable", "scratch") else 1)
    for ax, (_, ycol, xlabel, ylabel) in zip(axes, panels, strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        finals = [c.points[-1][ycol] for k, c in curves.items()
                  if k.rpartition("/")[0] in cfg.all_arms()]
        if finals and ycol == LOSS:
            ax.set_ylim(min(finals) - 0.05, max(finals) + 0.6)
        elif finals:
            ax.set_ylim(max(0.0, min(finals) - 0.15), max(finals) + 0.02)
        ax.legend(fontsize=7)
    fig.suptitle(f"progressive growth ({task.name}), mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser) -> None:
    """The options of ``stablemorph progressive`` (an ``argparse`` sub-parser)."""
    d = ProgressiveConfig()
    parser.add_argument("--task", choices=TASKS, default=d.task,
                        help="gpt: the project's char-level GPT; llama: a tiny HF "
                             "LlamaForCausalLM on the same text; cnn: the zoo CNN on "
                             "Fashion-MNIST (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/progressive"))
    parser.add_argument("--layers", type=int, nargs="+", default=list(d.layers),
                        help="depth at the start, after each growth (cnn: convolutions; "
                             "default: %(default)s)")
    parser.add_argument("--widths", type=float, nargs="+", default=None,
                        help="width multiplier at the start (1) and after each growth, e.g. "
                             "1 1 2 (default: depth only)")
    parser.add_argument("--stages", type=float, nargs="+", default=list(d.stage_fractions),
                        help="growth steps as fractions of --budget-steps (default: "
                             "%(default)s)")
    parser.add_argument("--budget-steps", type=int, default=d.budget_steps,
                        help="FLOPs budget: this many steps of the largest model "
                             "(default: %(default)s)")
    parser.add_argument("--d-model", type=int, default=d.d_model)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--cnn-widths", type=int, nargs="+", default=list(d.cnn_widths),
                        help="cnn: channels of the start model's convolutions "
                             "(default: %(default)s)")
    parser.add_argument("--dataset", default=d.dataset,
                        help="cnn: the data set (default: %(default)s; digits if absent)")
    parser.add_argument("--limit-test", type=int, default=d.limit_test,
                        help="cnn: test images evaluated (class-balanced; default: "
                             "%(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("--seeds", type=int, default=len(d.seeds))
    parser.add_argument("--arms", nargs="+", default=None, choices=ARMS,
                        help="default: every arm the task has")
    parser.add_argument("--timing", nargs="*", default=[",".join(map(str, t)) for t in d.timing],
                        help="extra stable arms growing at other fractions, e.g. 0.3,0.5 "
                             "(default: %(default)s)")
    parser.add_argument("--budget-fractions", type=float, nargs="*", default=[],
                        help="compute-matched short runs: the --short-arms again on these "
                             "fractions of the budget, e.g. 0.4 0.6 (default: none)")
    parser.add_argument("--short-arms", nargs="+", default=list(d.short_arms),
                        help="arms of the short runs (default: %(default)s)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                        help="after the warm-up: constant, or a cosine to 0 over the FLOPs "
                             "budget for every arm (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1)


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(f) for f in text.split(","))
    except ValueError:
        raise ValueError(f"--timing {text!r}: give fractions separated by commas, e.g. "
                         f"0.3,0.5") from None


def _default_arms(task: str) -> tuple[str, ...]:
    return tuple(a for a in ARMS if not (task == "cnn" and a == "stack"))


def run_from_args(args) -> int:
    """``stablemorph progressive``: run, write the report, print its table."""
    import shlex
    import sys

    from stablemorph.experiment.data import default_dataset_name

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    dataset = args.dataset
    if args.task == "cnn" and dataset == "fashion-mnist" and default_dataset_name() == "digits":
        print("Fashion-MNIST is not installed: running on scikit-learn's 8x8 digits "
              "(apt-get install dataset-fashion-mnist for the real cell)", flush=True)
        dataset = "digits"
    torch.set_num_threads(args.threads)
    cfg = ProgressiveConfig(task=args.task, layers=tuple(args.layers),
                            widths=None if args.widths is None else tuple(args.widths),
                            stage_fractions=tuple(args.stages),
                            budget_steps=args.budget_steps, d_model=args.d_model,
                            batch_size=args.batch_size, cnn_widths=tuple(args.cnn_widths),
                            dataset=dataset, limit_test=args.limit_test, lr=args.lr,
                            eval_every=args.eval_every,
                            seeds=tuple(range(args.seeds)),
                            arms=tuple(args.arms or _default_arms(args.task)),
                            timing=tuple(_fractions(t) for t in args.timing),
                            lr_schedule=args.lr_schedule,
                            budget_fractions=tuple(args.budget_fractions),
                            short_arms=tuple(args.short_arms))
    prog = sys.argv[0] if sys.argv[0].endswith("benchmarks/progressive.py") else "stablemorph"
    run(cfg, args.out, " ".join([prog, *(shlex.quote(a) for a in sys.argv[1:])]))
    print((args.out / "progressive.md").read_text())
    return 0
