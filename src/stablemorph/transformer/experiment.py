"""The growth experiment: does a grown GPT train on without first getting worse?

Protocol, per seed:

1. train a small character-level GPT (the *parent*) on standard-library source text
   (:mod:`.text`) for ``parent_steps`` (AdamW, linear warm-up, then a constant rate);
2. for each width factor ``w`` and arm: grow the parent to ``depth_factor`` times the
   depth and ``w`` times the residual width, heads (same ``head_dim``) and MLP width, all
   exactly (:func:`~stablemorph.transformer.grow`); an arm that cannot be exact at that
   width is reported as skipped, with the reason. Arms (:data:`ARMS`): the three schemes,
   and ``stable-full``, the stable scheme with full-scale new fan-out (``out_scale=1``);
3. continue every child for ``child_steps`` at the parent's rate (no new warm-up), its AdamW
   state carried over (:func:`~stablemorph.transformer.transfer_adam`); continue the parent
   likewise (*trained on*). All of them see the same batches: those of global steps
   ``parent_steps, parent_steps + 1, ...``;
4. train the child architecture from scratch for ``parent_steps + child_steps`` steps with
   the parent's schedule (warm-up included) on the same sequence of batches: as many
   optimiser steps as parent and child together.

Validation loss (nats per character on fixed windows of files never trained on) is measured
before the first update after growth, densely over the first steps, then every
``eval_every`` steps. Figures per arm, mean and spread over seeds: the loss at growth, the
*rise* (worst loss in the first ``rise_window`` steps minus the loss at growth; > 0 means it
got worse), the first evaluated step at which the loss is at or below the loss at growth,
and the final loss.

Outputs in ``out_dir``: ``transformer.md`` (report), ``transformer.png`` (plot),
``transformer_curves.csv`` (every evaluation), ``transformer_summary.json``.
Command line: ``python -m stablemorph.transformer.experiment --out DIR``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from stablemorph.record import history
from stablemorph.transformer.adam import transfer_adam
from stablemorph.transformer.grow import grow
from stablemorph.transformer.model import GPT, GPTConfig
from stablemorph.transformer.text import VOCAB_SIZE, CharCorpus, fixed_windows, load_stdlib_corpus
from stablemorph.transformer.train import OptimConfig, evaluate, make_adamw, train

PARENT, TRAINED_ON, SCRATCH = "parent", "trained on", "scratch"
# Grown arms: name -> (scheme, extra keyword arguments of grow()).
ARMS: dict[str, tuple[str, dict[str, float]]] = {
    "net2net": ("net2net", {}),
    "netmorph": ("netmorph", {}),
    "stable": ("stable", {}),
    "stable-full": ("stable", {"out_scale": 1.0}),
}
COLOURS = {PARENT: "black", TRAINED_ON: "grey", SCRATCH: "tab:purple", "net2net": "tab:blue",
           "netmorph": "tab:orange", "stable": "tab:green", "stable-full": "tab:red"}


@dataclass(frozen=True)
class GPTExperimentConfig:
    """Everything that defines a run (recorded in the report)."""

    parent_steps: int = 1000
    child_steps: int = 400
    seeds: tuple[int, ...] = (0, 1)
    widths: tuple[float, ...] = (2.0, 1.5)
    depth_factor: int = 2
    arms: tuple[str, ...] = tuple(ARMS)
    d_model: int = 32
    n_layer: int = 2
    n_head: int = 4
    head_dim: int = 8
    d_mlp: int = 128
    block_size: int = 64
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_chars: int = 1_000_000
    val_windows: int = 64
    eval_every: int = 50
    rise_window: int = 50
    threads: int = 1

    def parent_config(self) -> GPTConfig:
        return GPTConfig.uniform(
            vocab_size=VOCAB_SIZE, block_size=self.block_size, d_model=self.d_model,
            n_layer=self.n_layer, n_head=self.n_head, head_dim=self.head_dim, d_mlp=self.d_mlp,
        )

    def child_sizes(self, width: float) -> dict[str, int]:
        return {
            "d_model": round(width * self.d_model),
            "n_head": round(width * self.n_head),
            "d_mlp": round(width * self.d_mlp),
            "n_layer": self.depth_factor * self.n_layer,
        }

    def child_config(self, width: float) -> GPTConfig:
        sizes = self.child_sizes(width)
        return GPTConfig.uniform(
            vocab_size=VOCAB_SIZE, block_size=self.block_size, d_model=sizes["d_model"],
            n_layer=sizes["n_layer"], n_head=sizes["n_head"], head_dim=self.head_dim,
            d_mlp=sizes["d_mlp"],
        )


def child_eval_steps(steps: int, every: int) -> list[int]:
    """Dense right after growth, then every ``every`` steps, and the last step."""
    dense = {0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40}
    return sorted({s for s in dense if s < steps} | set(range(0, steps, every)) | {steps})


def run_gpt_experiment(
    out_dir: str | Path,
    *,
    parent_steps: int = 1000,
    child_steps: int = 400,
    seeds: Sequence[int] = (0, 1),
    widths: Sequence[float] = (2.0, 1.5),
    arms: Sequence[str] = tuple(ARMS),
    threads: int = 1,
    config: GPTExperimentConfig | None = None,
    command: str | None = None,
    progress: bool = True,
) -> Path:
    """Run the experiment (module docstring) and return the path of the Markdown report.

    The keyword arguments override the corresponding fields of ``config`` (model sizes,
    optimiser, corpus size). ``command`` is quoted in the report. Sets the torch thread count
    to ``threads`` for the run and restores it afterwards.
    """
    cfg = replace(
        config or GPTExperimentConfig(),
        parent_steps=parent_steps, child_steps=child_steps, seeds=tuple(seeds),
        widths=tuple(widths), arms=tuple(arms), threads=threads,
    )
    unknown = set(cfg.arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; choose from {tuple(ARMS)}")
    if cfg.parent_steps < 1 or cfg.child_steps < 1 or not cfg.seeds or not cfg.widths:
        raise ValueError("need parent_steps >= 1, child_steps >= 1, a seed and a width")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows: list[dict] = []
    growths: list[dict] = []
    skipped: dict[str, str] = {}
    try:
        corpus = load_stdlib_corpus(cfg.max_chars)
        for seed in cfg.seeds:
            _run_seed(cfg, corpus, seed, rows, growths, skipped, progress)
    finally:
        torch.set_num_threads(old_threads)
    machine = {
        "cpu_count": os.cpu_count(),
        "threads": cfg.threads,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    summary = summarise(rows, cfg)
    _write_csv(out / "transformer_curves.csv", rows)
    (out / "transformer_summary.json").write_text(json.dumps(
        {"config": _config_dict(cfg), "machine": machine, "summary": summary,
         "growths": growths, "skipped": skipped}, indent=2) + "\n")
    _plot(out / "transformer.png", rows, cfg)
    report = out / "transformer.md"
    report.write_text(_report(cfg, machine, summary, growths, skipped, corpus, command))
    return report


def _run_seed(cfg: GPTExperimentConfig, corpus: CharCorpus, seed: int, rows: list[dict],
              growths: list[dict], skipped: dict[str, str], progress: bool) -> None:
    val = fixed_windows(corpus.val, cfg.val_windows, cfg.block_size)

    def run(arm: str, width: float | None, model: GPT, opt: torch.optim.Optimizer,
            steps: int, start: int, evals: list[int]) -> None:
        t0 = time.perf_counter()
        curve = train(model, opt, corpus.train, steps=steps, cfg=cfg.optim, seed=seed,
                      start_step=start, eval_steps=evals,
                      evaluate_fn=lambda m: evaluate(m, val))
        rows.extend({"seed": seed, "width": width, "arm": arm, "step": step,
                     "total_step": start + step, "val_loss": loss} for step, loss in curve)
        if progress:
            print(f"seed {seed} width {width} {arm:>10}: {steps} steps in "
                  f"{time.perf_counter() - t0:.0f}s, val {curve[0][1]:.3f} -> {curve[-1][1]:.3f}",
                  file=sys.stderr, flush=True)

    p_steps, c_steps = cfg.parent_steps, cfg.child_steps
    child_evals = child_eval_steps(c_steps, cfg.eval_every)
    torch.manual_seed(seed)
    parent = GPT(cfg.parent_config())
    parent_opt = make_adamw(parent, cfg.optim)
    run(PARENT, None, parent, parent_opt, p_steps, 0,
        [*range(0, p_steps, cfg.eval_every), p_steps])

    trained_on = GPT(parent.config)
    trained_on.load_state_dict(parent.state_dict())
    on_opt = make_adamw(trained_on, cfg.optim)
    on_opt.load_state_dict(parent_opt.state_dict())
    run(TRAINED_ON, None, trained_on, on_opt, c_steps, p_steps, child_evals)

    for width in cfg.widths:
        for arm in cfg.arms:
            scheme, extra = ARMS[arm]
            try:
                child = grow(parent, scheme=scheme, seed=seed, **cfg.child_sizes(width), **extra)
            except ValueError as err:
                skipped[f"{arm} x{width:g}"] = str(err)
                if progress:
                    print(f"seed {seed} width {width} {arm}: skipped: {err}", file=sys.stderr)
                continue
            if child.config != cfg.child_config(width):
                raise RuntimeError(f"grown {child.config} differs from the scratch architecture")
            growths.extend(
                {"seed": seed, "width": width, "arm": arm, "op": r.report.op,
                 "target": r.report.target, "max_rel": r.report.max_rel,
                 "zero_fraction": r.report.zero_fraction,
                 "near_zero_fraction": r.report.near_zero_fraction,
                 "seconds": r.report.seconds}
                for r in history(child)
            )
            run(arm, width, child, transfer_adam(parent_opt, parent, child), c_steps, p_steps,
                child_evals)
        torch.manual_seed(10_000 + seed)
        scratch = GPT(cfg.child_config(width))
        total = p_steps + c_steps
        run(SCRATCH, width, scratch, make_adamw(scratch, cfg.optim), total, 0,
            sorted({*range(0, total, cfg.eval_every), *(p_steps + s for s in child_evals)}))


def n_params(config: GPTConfig) -> int:
    return sum(p.numel() for p in GPT(config).parameters())


def summarise(rows: list[dict], cfg: GPTExperimentConfig) -> list[dict]:
    """Per (width, arm) after growth: mean and spread over seeds of the figures in the module
    docstring, and the training compute, estimated as ``6 * parameters * tokens`` per step
    (``tflop``). ``scratch`` is read at the same total step count (``final``) and at the
    grown arms' compute (``at_equal_compute``, at the last evaluation within it)."""
    curves: dict[tuple, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        curves[(r["width"], r["arm"])][r["seed"]][r["total_step"]] = r["val_loss"]
    p, c = cfg.parent_steps, cfg.child_steps
    flop_per_param_step = 6 * cfg.optim.batch_size * cfg.block_size / 1e12
    n_parent = n_params(cfg.parent_config())
    out = []
    for (width, arm), per_seed in curves.items():
        if arm == PARENT:
            continue
        n_child = n_parent if width is None else n_params(cfg.child_config(width))
        grown_flop = flop_per_param_step * (p * n_parent + c * n_child)
        entry: dict = {"width": width, "arm": arm, "seeds": len(per_seed), "tflop": grown_flop}
        equal_step = p * n_parent / n_child + c
        if arm == SCRATCH:
            entry["tflop"] = flop_per_param_step * (p + c) * n_child
            entry["grown_tflop"] = grown_flop
        figures: dict[str, list[float | None]] = defaultdict(list)
        for curve in per_seed.values():
            if arm == SCRATCH:
                within = max(s for s in curve if s <= equal_step)
                entry["equal_compute_step"] = within
                figures["final"].append(curve[p + c])
                figures["at_equal_compute"].append(curve[within])
                continue
            at_growth = curve[p]
            after = [(s - p, v) for s, v in sorted(curve.items()) if s > p]
            window = [v for s, v in after if s <= cfg.rise_window]
            back = next((s for s, v in after if v <= at_growth), None)
            figures["at_growth"].append(at_growth)
            figures["rise"].append(max(window) - at_growth if window else None)
            figures["back_at_step"].append(back)
            figures["final"].append(curve[p + c])
        for name, values in figures.items():
            known = [v for v in values if v is not None]
            entry[name] = statistics.fmean(known) if known else None
            entry[f"{name}_sd"] = statistics.stdev(known) if len(known) > 1 else 0.0
            entry[f"{name}_missing"] = len(values) - len(known)
        out.append(entry)
    arm_order = {TRAINED_ON: 0, **{a: 1 + i for i, a in enumerate(ARMS)}, SCRATCH: 99}
    width_order = {None: -1, **{w: i for i, w in enumerate(cfg.widths)}}
    return sorted(out, key=lambda e: (width_order[e["width"]], arm_order[e["arm"]]))


def _config_dict(cfg: GPTExperimentConfig) -> dict:
    return asdict(cfg) | {"parent": cfg.parent_config().to_dict()}


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["seed", "width", "arm", "step", "total_step",
                                               "val_loss"])
        writer.writeheader()
        writer.writerows(rows)


def _mean_curve(rows: list[dict], width: float | None, arm: str) -> tuple[list, list, list,
                                                                            list]:
    by_step: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if r["width"] == width and r["arm"] == arm:
            by_step[r["total_step"]].append(r["val_loss"])
    steps = sorted(by_step)
    return (steps, [statistics.fmean(by_step[s]) for s in steps],
            [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps])


def _plot(path: Path, rows: list[dict], cfg: GPTExperimentConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cfg.widths)
    fig, axes = plt.subplots(2, n, figsize=(6.5 * n, 8), squeeze=False)
    p = cfg.parent_steps
    zoom = min(cfg.child_steps, 100)
    for col, width in enumerate(cfg.widths):
        sizes = cfg.child_sizes(width)
        arms = [(None, PARENT), (None, TRAINED_ON), *((width, a) for a in cfg.arms),
                (width, SCRATCH)]
        for row, ax in enumerate(axes[:, col]):
            for w, arm in arms:
                steps, mean, lo, hi = _mean_curve(rows, w, arm)
                if not steps:
                    continue
                if row == 1:
                    keep = [i for i, s in enumerate(steps) if p - 10 <= s <= p + zoom]
                    steps, mean, lo, hi = ([v[i] for i in keep] for v in (steps, mean, lo, hi))
                ax.plot(steps, mean, label=arm, color=COLOURS[arm], lw=1.5,
                        marker="." if row == 1 else None)
                ax.fill_between(steps, lo, hi, color=COLOURS[arm], alpha=0.15)
            ax.axvline(p, color="black", ls=":", lw=1)
            ax.set_xlabel("optimiser steps (total)")
            ax.set_ylabel("validation loss (nats/char)")
            ax.grid(alpha=0.3)
        axes[0, col].set_title(
            f"grown at step {p}: x{cfg.depth_factor} depth, x{width:g} width "
            f"(d_model {cfg.d_model}->{sizes['d_model']})", fontsize=10)
        axes[1, col].set_title(f"the first {zoom} steps after growth", fontsize=10)
        lows = [r["val_loss"] for r in rows if r["total_step"] >= p // 2]
        if lows:
            axes[0, col].set_ylim(min(lows) - 0.05, max(lows) + 0.1)
        axes[0, col].legend(fontsize=8)
    fig.suptitle(f"GPT growth on stdlib text, mean and min-max over {len(cfg.seeds)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(entry: dict, name: str, digits: int = 3) -> str:
    value = entry.get(name)
    if value is None:
        return "never" if name == "back_at_step" else "-"
    sd = entry.get(f"{name}_sd", 0.0)
    missing = entry.get(f"{name}_missing", 0)
    text = f"{value:.{digits}f}" if name != "back_at_step" else f"{value:.0f}"
    if entry["seeds"] > 1:
        text += f" ± {sd:.{digits}f}" if name != "back_at_step" else f" ± {sd:.0f}"
    if missing:
        text += f" ({missing} never)"
    return text


def _report(cfg: GPTExperimentConfig, machine: dict, summary: list[dict], growths: list[dict],
            skipped: dict[str, str], corpus: CharCorpus, command: str | None) -> str:
    busy = machine["load_average_before"][0] > 0.5 or machine["load_average_after"][0] > (
        cfg.threads + 0.5)
    pc = cfg.parent_config()
    lines = [
        "# Growing a trained GPT: validation loss after exact growth",
        "",
        "Produced by `stablemorph.transformer.experiment` (protocol in its docstring).",
        "",
        f"Command: `{command}`" if command else "Command: (called from Python)",
        "",
        "## Setup",
        "",
        f"- Data: Python {machine['python']} standard-library sources, characters "
        f"({VOCAB_SIZE} ids): {len(corpus.train):,} training characters from "
        f"{len(corpus.train_files)} files, {len(corpus.val):,} validation characters from "
        f"{len(corpus.val_files)} other files; validation = {cfg.val_windows} fixed windows "
        f"of {cfg.block_size}.",
        f"- Parent: {pc.n_layer} blocks, d_model {pc.d_model}, {cfg.n_head} heads of "
        f"{cfg.head_dim}, MLP {cfg.d_mlp}, context {cfg.block_size}; trained "
        f"{cfg.parent_steps} steps.",
        f"- Children: x{cfg.depth_factor} depth and x{'/x'.join(f'{w:g}' for w in cfg.widths)} "
        f"width (d_model, heads, MLP), grown by each arm, trained {cfg.child_steps} more "
        f"steps; scratch: the child architecture trained {cfg.parent_steps + cfg.child_steps} "
        "steps from initialisation on the same batches. Arms: `net2net` (copies), `netmorph` "
        "(zero-initialised new parts), `stable` (dense and exact; new fan-out at 0.1 of the "
        "existing rms), `stable-full` (the same with full-scale new fan-out).",
        f"- Optimiser: AdamW lr {cfg.optim.lr}, betas {cfg.optim.betas}, weight decay "
        f"{cfg.optim.weight_decay} (matrices only), batch {cfg.optim.batch_size}, "
        f"{cfg.optim.warmup_steps} warm-up steps at the start of training only; after growth "
        "the parent's constant rate, AdamW state carried over by `transfer_adam`.",
        f"- Seeds: {', '.join(map(str, cfg.seeds))}. Machine: {machine['cpu_count']} CPU cores, "
        f"{cfg.threads} torch thread(s), torch {machine['torch']}; load average "
        f"{machine['load_average_before']} before and {machine['load_average_after']} after "
        f"({'busy: other processes were running' if busy else 'otherwise idle'}); "
        f"{machine['seconds']:.0f} s in total.",
        "",
        "## Exactness of the growths",
        "",
        "| width | arm | growths | largest max_rel of the logits | zero fraction of new or "
        "changed weights (mean over growths) |",
        "|---|---|---|---|---|",
    ]
    by_arm: dict[tuple, list[dict]] = defaultdict(list)
    for g in growths:
        by_arm[(g["width"], g["arm"])].append(g)
    for (width, arm), gs in by_arm.items():
        ops = sorted({g["op"] for g in gs})
        lines.append(
            f"| x{width:g} | {arm} | {len(gs) // len(cfg.seeds)} ({', '.join(ops)}) | "
            f"{max(g['max_rel'] for g in gs):.1e} | "
            f"{statistics.fmean(g['zero_fraction'] for g in gs):.1%} |"
        )
    lines += [
        "",
        "## Validation loss (nats per character), mean ± sd over seeds",
        "",
        f"Rise: worst loss in the first {cfg.rise_window} steps after growth minus the loss at "
        "growth (> 0: it got worse first). Back at step: first evaluated step after growth "
        "with a loss at or below the loss at growth. Compute: 6 x parameters x tokens per "
        "step, parent steps included for the grown arms; scratch is also read at the last "
        "evaluation within the grown arms' compute.",
        "",
        "| width | arm | training TFLOP (est.) | at growth | rise | back at step | final |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        width = "-" if e["width"] is None else f"x{e['width']:g}"
        if e["arm"] == SCRATCH:
            lines += [
                f"| {width} | scratch, same steps ({cfg.parent_steps + cfg.child_steps}) | "
                f"{e['tflop']:.2f} | - | - | - | {_fmt(e, 'final')} |",
                f"| {width} | scratch, same compute as grown (step {e['equal_compute_step']}) | "
                f"{e['grown_tflop']:.2f} | - | - | - | {_fmt(e, 'at_equal_compute')} |",
            ]
        else:
            lines.append(
                f"| {width} | {e['arm']} | {e['tflop']:.2f} | {_fmt(e, 'at_growth')} | "
                f"{_fmt(e, 'rise')} | {_fmt(e, 'back_at_step')} | {_fmt(e, 'final')} |"
            )
    lines += ["", "![validation loss against step](transformer.png)", ""]
    if skipped:
        lines += ["## Skipped", ""]
        lines += [f"- {arm}: {reason}" for arm, reason in sorted(skipped.items())]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stablemorph.transformer.experiment",
        description="Grow a trained character-level GPT with each scheme and compare "
                    "validation loss against step (and against training from scratch).",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--parent-steps", type=int, default=1000)
    parser.add_argument("--child-steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--widths", type=float, nargs="+", default=[2.0, 1.5])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    base = GPTExperimentConfig()
    config = replace(
        base, d_model=args.d_model, d_mlp=4 * args.d_model,
        head_dim=args.d_model // base.n_head, block_size=args.block_size,
        optim=replace(base.optim, lr=args.lr, batch_size=args.batch_size),
    )
    argv_used = sys.argv[1:] if argv is None else list(argv)
    report = run_gpt_experiment(
        args.out, parent_steps=args.parent_steps, child_steps=args.child_steps,
        seeds=args.seeds, widths=args.widths, arms=args.arms, threads=args.threads,
        config=config, progress=not args.quiet,
        command=shlex.join(["python", "-m", "stablemorph.transformer.experiment", *argv_used]),
    )
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
