"""Progressive growth against training the large model from scratch: compute to reach its loss.

Per seed, on the character-level text (:mod:`stablemorph.transformer.text`), every arm trains
a GPT under the SAME FLOPs budget: the FLOPs the large model (``layers[-1]`` blocks) spends in
``budget_steps`` steps from scratch. Growing arms start at ``layers[0]`` blocks and grow at
the steps ``stage_steps`` to ``layers[1]``, ``layers[2]``, ... in place
(:func:`stablemorph.progressive.grow_in_place`: the same model and AdamW objects, state
mapped), then train on until their FLOPs reach the budget (cheaper steps: more of them).
Every arm sees the batches of the same global steps; AdamW with a linear warm-up, then a
constant rate (no decay, so no arm is favoured by where its schedule ends).

Arms (:data:`ARMS`):
- ``stable``, ``net2net``, ``netmorph``: exact growth (:func:`stablemorph.transformer.insert_block`
  one block at a time, evenly spaced) with that scheme;
- ``stack``: G_stack-style copy of the whole stack of blocks (not function-preserving);
- ``random``: new blocks at the same places, randomly initialised (not function-preserving);
- ``scratch``: the large model from step 0.
Growth timing: ``stable@f1,f2`` arms grow at other fractions of ``budget_steps``; ``plateau``
grows when the validation loss stops improving (:class:`stablemorph.progressive.PlateauTrigger`).

Figures (per arm, mean ± sd over seeds): final loss; FLOPs and seconds to first reach the
scratch arm's final loss (same seed; losses are the mean of the last 3 evaluations, so one
lucky evaluation counts for nothing), as % saved against what the scratch arm needed to reach
it; the largest validation-loss rise within ``spike_window`` steps after a growth.
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

from stablemorph.flops import FlopMeter
from stablemorph.progressive import PlateauTrigger, grow_in_place
from stablemorph.record import (
    HISTORY_ATTR,
    MorphRecord,
    MorphReport,
    ParamOrigin,
    append_record,
    history,
)
from stablemorph.transformer.depth import insert_block
from stablemorph.transformer.grow import insertion_points
from stablemorph.transformer.model import GPT, GPTConfig
from stablemorph.transformer.text import (
    VOCAB_SIZE,
    fixed_windows,
    load_stdlib_corpus,
    random_windows,
)
from stablemorph.transformer.train import OptimConfig, evaluate, lm_loss, make_adamw

EXACT = ("stable", "net2net", "netmorph")
LR_SCHEDULES = ("constant", "cosine")
ARMS = ("scratch", *EXACT, "stack", "random", "plateau")


@dataclass
class ProgressiveConfig:
    """Sizes, budget and schedule of the comparison (defaults: minutes on 2 CPU cores)."""

    d_model: int = 48
    n_head: int = 4
    block_size: int = 48
    batch_size: int = 16
    layers: tuple[int, ...] = (2, 4, 8)
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

    def __post_init__(self) -> None:
        for name in ("budget_steps", "eval_every", "batch_size", "d_model", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if list(self.layers) != sorted(set(self.layers)) or len(self.layers) < 2:
            raise ValueError(f"layers must grow strictly, e.g. (2, 4, 8); got {self.layers}")
        for fr in (self.stage_fractions, *self.timing):
            if len(fr) != len(self.layers) - 1 or list(fr) != sorted(fr) or not 0 < fr[0]:
                raise ValueError(f"stage fractions {fr} must be increasing, in (0, 1), one per "
                                 f"growth ({len(self.layers) - 1})")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got "
                             f"{self.lr_schedule!r}")
        unknown = set(self.arms) - set(ARMS) - {_timing_name(t) for t in self.timing}
        if unknown:
            raise ValueError(f"unknown arms {sorted(unknown)}; choose from {list(ARMS)}")

    def all_arms(self) -> list[str]:
        return [*self.arms, *(_timing_name(t) for t in self.timing)]

    def gpt(self, n_layer: int) -> GPTConfig:
        return GPTConfig.uniform(vocab_size=VOCAB_SIZE, block_size=self.block_size,
                                 d_model=self.d_model, n_layer=n_layer, n_head=self.n_head)


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


# --- the non-preserving anchors, as records so that the optimiser transfer treats them alike


def _rebuild(model: GPT, n_layer: int, source_of: Callable[[int], int | None],
             op: str, seed: int) -> GPT:
    """A GPT with ``n_layer`` blocks; block ``i`` copies parent block ``source_of(i)`` or, for
    ``None``, keeps a fresh random initialisation (GPT-2's, seeded)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        child = GPT(dataclasses.replace(model.config,
                                        blocks=(model.config.blocks[0],) * n_layer))
    parent = dict(model.named_parameters())
    origins: dict[str, ParamOrigin] = {}
    with torch.no_grad():
        for name, p in child.named_parameters():
            parts = name.split(".")
            if parts[0] == "blocks":
                src = source_of(int(parts[1]))
                if src is None:
                    origins[name] = ParamOrigin(None)
                    continue
                parts[1] = str(src)
            source = ".".join(parts)
            p.copy_(parent[source])
            origins[name] = ParamOrigin(source)
    object.__setattr__(child, HISTORY_ATTR, history(model))
    report = MorphReport(op=op, target="blocks", scheme=op, changed=[
        n for n, o in origins.items() if o.source is None], param_map=origins,
        notes=["not function-preserving (an anchor of the progressive benchmark)"])
    append_record(child, MorphRecord(op, "blocks", {"n_layer": n_layer, "seed": seed}, report))
    return child


def stack_blocks(model: GPT, n_layer: int, seed: int = 0) -> GPT:
    """G_stack: the parent's blocks repeated in order until ``n_layer`` (a multiple)."""
    n = model.config.n_layer
    if n_layer % n:
        raise ValueError(f"stack_blocks: {n_layer} is not a multiple of {n}")
    return _rebuild(model, n_layer, lambda i: i % n, "stack", seed)


def random_blocks(model: GPT, n_layer: int, seed: int = 0) -> GPT:
    """New randomly initialised blocks at the places the exact schemes insert theirs."""
    n = model.config.n_layer
    slots: list[int | None] = list(range(n))
    for index in insertion_points(n, n_layer - n):
        slots.insert(index, None)
    return _rebuild(model, n_layer, lambda i: slots[i], "random", seed)


def growths_to(arm: str, model: GPT, n_layer: int, seed: int) -> list[Callable[[GPT], GPT]]:
    """The in-place growth steps (one morph each) that take ``model`` to ``n_layer`` blocks."""
    n = model.config.n_layer
    if arm in ("stack", "random"):
        make = stack_blocks if arm == "stack" else random_blocks
        return [lambda m: make(m, n_layer, seed)]
    scheme = "stable" if arm == "plateau" or arm.startswith("stable@") else arm
    return [lambda m, i=i, r=r: insert_block(m, i, scheme=scheme, seed=seed + r)
            for r, i in enumerate(insertion_points(n, n_layer - n))]


# --- one run


@dataclass
class Curve:
    """Evaluations of one (arm, seed): step, cumulative FLOPs, seconds, validation loss."""

    arm: str
    seed: int
    points: list[tuple[int, int, float, float]] = field(default_factory=list)
    growths: list[tuple[int, int]] = field(default_factory=list)  # (step, layers after)


def run_arm(cfg: ProgressiveConfig, arm: str, seed: int, corpus, val, budget: int) -> Curve:
    """Train one arm until its FLOPs reach ``budget``."""
    start_layers = cfg.layers[-1] if arm == "scratch" else cfg.layers[0]
    torch.manual_seed(seed)
    model = GPT(cfg.gpt(start_layers))
    opt_cfg = OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, batch_size=cfg.batch_size)
    optimizer = make_adamw(model, opt_cfg)
    fractions = cfg.stage_fractions
    for t in cfg.timing:
        if arm == _timing_name(t):
            fractions = t
    stages = {round(f * cfg.budget_steps): n for f, n in zip(fractions, cfg.layers[1:],
                                                              strict=True)}
    trigger = None
    if arm == "plateau":
        stages = {}
        trigger = PlateauTrigger([{"layers": n} for n in cfg.layers[1:]],
                                 patience=cfg.plateau_patience, min_delta=0.01)
    meter, curve = FlopMeter(), Curve(arm, seed)
    seconds = 0.0  # training and growth time; evaluations are not counted
    step = 0

    def grow(n_layer: int) -> None:
        for growth in growths_to(arm, model, n_layer, seed):
            grow_in_place(model, growth, optimizer)
        curve.growths.append((step, model.config.n_layer))

    while True:
        spent = meter.total >= budget
        if step % cfg.eval_every == 0 or spent:
            loss = evaluate(model, val)
            curve.points.append((step, meter.total, seconds, loss))
            if trigger is not None and model.config.n_layer < cfg.layers[-1]:
                fired = trigger.observe(loss)
                if fired is not None:
                    stages[step] = int(fired["layers"])
        if spent:
            break
        started = time.perf_counter()
        if step in stages:
            grow(stages[step])
        rate = cfg.lr * lr_factor(cfg.lr_schedule, step, cfg.warmup_steps, meter.total / budget)
        for group in optimizer.param_groups:
            group["lr"] = rate
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x, y = random_windows(corpus.train, cfg.batch_size, cfg.block_size, gen)
        loss_t = lm_loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        optimizer.step()
        seconds += time.perf_counter() - started
        meter.add(model, x)
        step += 1
    return curve


SMOOTH = 3  # evaluations averaged: single evaluations wobble by about 0.01 nats


def _smoothed(curve: Curve) -> list[tuple[int, float, float]]:
    """(FLOPs, seconds, mean loss of the last ``SMOOTH`` evaluations) at each evaluation."""
    losses = [p[3] for p in curve.points]
    return [(p[1], p[2], statistics.fmean(losses[max(0, i - SMOOTH + 1):i + 1]))
            for i, p in enumerate(curve.points)]


def _target(scratch: Curve) -> float:
    """The scratch arm's final loss: the mean of its last ``SMOOTH`` evaluations."""
    return _smoothed(scratch)[-1][2]


def _reach(curve: Curve, target: float) -> tuple[int, float] | None:
    """FLOPs and seconds at the first evaluation whose smoothed loss is at or below
    ``target``."""
    for flops, seconds, loss in _smoothed(curve):
        if loss <= target:
            return flops, seconds
    return None


def _spike(curve: Curve, window: int) -> float:
    """Largest validation-loss rise within ``window`` steps after any growth (0 if none)."""
    worst = 0.0
    for g_step, _ in curve.growths:
        at = [loss for s, _, _, loss in curve.points if s <= g_step]
        after = [loss for s, _, _, loss in curve.points if g_step < s <= g_step + window]
        if at and after:
            worst = max(worst, max(after) - at[-1])
    return worst


def run(cfg: ProgressiveConfig, out_dir: Path, command: str = "",
        log: Callable[[str], None] = print) -> dict:
    """Every (arm, seed); write ``progressive.md``, ``progressive.png``, ``progressive.json``
    to ``out_dir``; return the summary. Finished runs in ``progressive.json`` are reused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "progressive.json"
    done: dict[str, dict] = {}
    if store.exists():
        saved = json.loads(store.read_text())
        if saved.get("config") == _config_json(cfg):
            done = saved["runs"]
    corpus = load_stdlib_corpus(max_chars=cfg.max_chars)
    val = fixed_windows(corpus.val, cfg.eval_windows, cfg.block_size)
    probe = GPT(cfg.gpt(cfg.layers[-1]))
    x, _ = random_windows(corpus.train, cfg.batch_size, cfg.block_size,
                          torch.Generator().manual_seed(0))
    budget = FlopMeter().per_step(probe, x) * cfg.budget_steps
    for seed in cfg.seeds:
        for arm in cfg.all_arms():
            key = f"{arm}/{seed}"
            if key in done:
                continue
            t0 = time.perf_counter()
            curve = run_arm(cfg, arm, seed, corpus, val, budget)
            done[key] = dataclasses.asdict(curve)
            store.write_text(json.dumps({"config": _config_json(cfg), "runs": done}))
            log(f"{key}: final loss {curve.points[-1][3]:.4f}, {len(curve.points)} evals, "
                f"{time.perf_counter() - t0:.0f}s")
    summary = summarise(cfg, {k: Curve(**v) for k, v in done.items()})
    write_report(cfg, summary, {k: Curve(**v) for k, v in done.items()}, out_dir, command)
    return summary


def _config_json(cfg: ProgressiveConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(cfg: ProgressiveConfig, curves: dict[str, Curve]) -> dict:
    """Per arm: final loss, % FLOPs / time saved to reach scratch's final loss, spike."""
    out: dict[str, dict] = {}
    for arm in cfg.all_arms():
        finals, flops_saved, time_saved, spikes, reached = [], [], [], [], 0
        for seed in cfg.seeds:
            curve, scratch = curves.get(f"{arm}/{seed}"), curves.get(f"scratch/{seed}")
            if curve is None or scratch is None:
                continue
            finals.append(curve.points[-1][3])
            spikes.append(_spike(curve, cfg.spike_window))
            target = _target(scratch)
            hit, base = _reach(curve, target), _reach(scratch, target)
            if hit is not None and base is not None:
                reached += 1
                flops_saved.append(100 * (1 - hit[0] / base[0]))
                time_saved.append(100 * (1 - hit[1] / base[1]))
        out[arm] = {"final": _mean_sd(finals), "flops_saved": _mean_sd(flops_saved),
                    "time_saved": _mean_sd(time_saved), "spike": _mean_sd(spikes),
                    "reached": reached, "seeds": len(finals)}
    return out


def write_report(cfg: ProgressiveConfig, summary: dict, curves: dict[str, Curve],
                 out_dir: Path, command: str = "") -> None:
    """``progressive.md`` (table, settings, machine) and ``progressive.png`` (loss against
    FLOPs and against seconds, mean over seeds per arm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm in cfg.all_arms():
        runs = [curves[f"{arm}/{s}"] for s in cfg.seeds if f"{arm}/{s}" in curves]
        if not runs:
            continue
        n = min(len(r.points) for r in runs)
        for ax, col in zip(axes, (1, 2), strict=True):
            xs = [statistics.fmean(r.points[i][col] for r in runs) for i in range(n)]
            ys = [statistics.fmean(r.points[i][3] for r in runs) for i in range(n)]
            ax.plot(xs, ys, label=arm, lw=2 if arm in ("stable", "scratch") else 1)
    axes[0].set_xlabel("training FLOPs")
    axes[1].set_xlabel("seconds")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/char)")
        ax.set_ylim(top=2.8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "progressive.png", dpi=110)
    plt.close(fig)

    def fmt(ms: tuple[float, float], digits: int = 3) -> str:
        m, s = ms
        return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"

    lines = [
        "# Progressive growth vs the large model from scratch (char-level GPT)", "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s), torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d')}.", "",
        f"GPT d_model={cfg.d_model}, {cfg.n_head} heads, context {cfg.block_size}, batch "
        f"{cfg.batch_size}; layers {' -> '.join(map(str, cfg.layers))}; budget: the FLOPs of "
        f"{cfg.budget_steps} steps of the {cfg.layers[-1]}-layer model; growth at "
        f"{', '.join(f'{f:g}' for f in cfg.stage_fractions)} of {cfg.budget_steps} steps; "
        f"AdamW lr {cfg.lr}, warm-up {cfg.warmup_steps}, constant after; seeds {list(cfg.seeds)}.",
        "", "| arm | final val loss | FLOPs saved to scratch's final loss | time saved | "
        "seeds reaching it | largest rise after a growth |", "|---|---|---|---|---|---|",
    ]
    for arm, row in summary.items():
        lines.append(f"| {arm} | {fmt(row['final'])} | {fmt(row['flops_saved'], 1)} % | "
                     f"{fmt(row['time_saved'], 1)} % | {row['reached']}/{row['seeds']} | "
                     f"{fmt(row['spike'])} |")
    if command:
        lines += ["", "Command:", "", f"    {command}"]
    (out_dir / "progressive.md").write_text("\n".join(lines) + "\n")


def add_arguments(parser) -> None:
    """The options of ``stablemorph progressive`` (an ``argparse`` sub-parser)."""
    d = ProgressiveConfig()
    parser.add_argument("--out", type=Path, default=Path("runs/progressive"))
    parser.add_argument("--layers", type=int, nargs="+", default=list(d.layers),
                        help="depth at the start, after each growth (default: %(default)s)")
    parser.add_argument("--stages", type=float, nargs="+", default=list(d.stage_fractions),
                        help="growth steps as fractions of --budget-steps (default: "
                             "%(default)s)")
    parser.add_argument("--budget-steps", type=int, default=d.budget_steps,
                        help="FLOPs budget: this many steps of the largest model "
                             "(default: %(default)s)")
    parser.add_argument("--d-model", type=int, default=d.d_model)
    parser.add_argument("--seeds", type=int, default=len(d.seeds))
    parser.add_argument("--arms", nargs="+", default=list(d.arms), choices=ARMS)
    parser.add_argument("--timing", nargs="*", default=[",".join(map(str, t)) for t in d.timing],
                        help="extra stable arms growing at other fractions, e.g. 0.3,0.5 "
                             "(default: %(default)s)")
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


def run_from_args(args) -> int:
    """``stablemorph progressive``: run, write the report, print its table."""
    import shlex
    import sys

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    torch.set_num_threads(args.threads)
    cfg = ProgressiveConfig(layers=tuple(args.layers), stage_fractions=tuple(args.stages),
                            budget_steps=args.budget_steps, d_model=args.d_model,
                            seeds=tuple(range(args.seeds)), arms=tuple(args.arms),
                            timing=tuple(_fractions(t) for t in args.timing),
                            lr_schedule=args.lr_schedule)
    prog = sys.argv[0] if sys.argv[0].endswith("benchmarks/progressive.py") else "stablemorph"
    run(cfg, args.out, " ".join([prog, *(shlex.quote(a) for a in sys.argv[1:])]))
    print((args.out / "progressive.md").read_text())
    return 0
