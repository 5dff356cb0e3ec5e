"""Does a stable child's first-step amplification fall as it trains? (issue 9, branch ramp)

For a cell of ``benchmarks/ramp.py`` (its trained parents must be in ``--work/<cell>``): grow
the ``stable`` child, measure the multipliers the stable scheme records for every factor pair
(:func:`~stablemorph.morphs.first_step.advise`, ``1 / first-step amplification`` for SGD and
adaptive steps, on the probe batch), train it as the experiment does in ``regime``, and measure
them again. A multiplier released "as the measured amplification drops" would release by the
ratio of the two.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/ramp_drift.py digits-cnn-deepen-sgd \
        --regime raised --seeds 2
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from ramp import config

from stablemorph.experiment.stability import Experiment, grow, train_arm
from stablemorph.morphs.first_step import advise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cell")
    ap.add_argument("--regime", default="raised")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("runs/ramp"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = config(args.cell)
    exp = Experiment(cfg, args.work / args.cell, progress=False, log=lambda m: None)
    kernel = 3 if cfg.morph_kwargs.get("kernel_size") == 3 else 0
    for seed in range(args.seeds):
        parent, opt = exp.parent(exp.data, seed)
        probe = exp.data.x_train[:32]
        child, child_opt, _ = grow(parent, opt, cfg, "stable", seed, probe)
        blocks = [n for n, m in child.named_modules()
                  if hasattr(m, "first") and hasattr(m, "second")]
        before = {b: advise(child, b, probe, kernel) for b in blocks}
        model, model_opt = copy.deepcopy((child, child_opt))
        train_arm(model, exp.data, model_opt, cfg, seed, [cfg.child_steps], False, args.regime)
        for b in blocks:
            after = advise(model, b, probe, kernel)
            print(f"{args.cell} {args.regime} seed {seed} {b}: "
                  + ", ".join(f"{k} {before[b][k]:.4f} -> {after[k]:.4f}" for k in after),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
