"""Which optimiser-state rule gives the smaller loss rise right after a growth?

The two open choices of :mod:`stablemorph.optim` (:class:`~stablemorph.optim.TransferRule`):
``scaled`` (indexed entries' moments scaled like the weights, or copied: here all keys or
none) and ``fresh_state`` (fresh parameters start without state, or borrow their
stand-in's). For each (model, optimiser, seed): train a parent, grow it once (the same child
for every rule), carry the optimiser over with each of the four rules and train every copy
on the same batches.

- ``cnn``: zoo ``cnn`` (widths 16, 32, BatchNorm) on scikit-learn's digits (8x8); growth:
  ``widen features.conv2`` to 48 with ``net2net`` (copies: the classifier's columns get
  shares 1/c, so ``scale != 1``) then ``deepen features.conv1`` (``stable``: fresh factors).
- ``gpt``: the project GPT (d_model 32, 2 blocks, 2 heads) on character-level text
  (:func:`stablemorph.transformer.text.load_stdlib_corpus`); growth: ``grow`` to
  d_model 64, 4 heads, d_mlp 256, 4 blocks with ``net2net`` (copies with shares; the new
  blocks' zero output projections are fresh).

Measured: ``rise = max(eval loss over the first K steps after growth) - eval loss at growth``
(the eval set fixed; a rule with a smaller rise disturbs training less), and the eval loss at
the end of K steps. Rules are compared *paired* (same seed, same parent, same child, same
batches). Run::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/optim_rule.py --seeds 3

writes ``benchmarks/results/optim_rule.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import stablemorph as sm
from stablemorph.optim import STATE_KINDS, TransferRule, transfer_optimizer

EVERY = frozenset(STATE_KINDS)
RULES = {
    "scaled+none": TransferRule(scaled=EVERY, fresh_state="none"),
    "scaled+borrow": TransferRule(scaled=EVERY, fresh_state="borrow"),
    "copied+none": TransferRule(scaled=frozenset(), fresh_state="none"),
    "copied+borrow": TransferRule(scaled=frozenset(), fresh_state="borrow"),
}
Batch = tuple[Tensor, Tensor]


def digits() -> tuple[Batch, Batch]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1437], y[:1437]), (x[1437:], y[1437:])


class Task:
    """A model family, its data, loss, optimisers and growth."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "cnn":
            self.train, self.eval = digits()
        else:
            from stablemorph.transformer.text import fixed_windows, load_stdlib_corpus

            corpus = load_stdlib_corpus(max_chars=300_000)
            self.tokens = corpus.train
            self.eval = fixed_windows(corpus.val, 64, 32)

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if self.name == "cnn":
            return sm.build_model("cnn", in_channels=1, num_classes=10, widths=[16, 32],
                                  image_size=8)
        from stablemorph.transformer import GPT, GPTConfig
        from stablemorph.transformer.text import VOCAB_SIZE

        return GPT(GPTConfig.uniform(vocab_size=VOCAB_SIZE, block_size=32, d_model=32,
                                     n_layer=2, n_head=2))

    def batch(self, gen: torch.Generator) -> Batch:
        if self.name == "cnn":
            i = torch.randint(0, len(self.train[1]), (64,), generator=gen)
            return self.train[0][i], self.train[1][i]
        from stablemorph.transformer.text import random_windows

        return random_windows(self.tokens, 32, 32, gen)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        out = model(batch[0])
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), batch[1].reshape(-1))

    @torch.no_grad()
    def eval_loss(self, model: nn.Module) -> float:
        was = model.training
        model.eval()
        value = float(self.loss(model, self.eval))
        model.train(was)
        return value

    def optimizer(self, kind: str, model: nn.Module) -> torch.optim.Optimizer:
        if kind == "sgd":
            lr = 0.05 if self.name == "cnn" else 0.3
            return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        other = [p for p in model.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                  {"params": other, "weight_decay": 0.0}],
                                 lr=3e-3, betas=(0.9, 0.99))

    def grow(self, model: nn.Module) -> nn.Module:
        if self.name == "cnn":
            child = sm.widen(model, "features.conv2", 48, scheme="net2net",
                             input_shape=[16, 1, 8, 8])
            return sm.deepen(child, "features.conv1", input_shape=[16, 1, 8, 8])
        from stablemorph.transformer import grow

        return grow(model, d_model=64, n_head=4, d_mlp=256, n_layer=4, scheme="net2net")


def train(task: Task, model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int,
          on_step: Callable[[int], None] | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        batch = task.batch(gen)
        opt.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()
        opt.step()
        if on_step is not None:
            on_step(step)


def run(task: Task, kind: str, seed: int, parent_steps: int, after: int) -> dict[str, tuple]:
    parent = task.model(seed)
    opt = task.optimizer(kind, parent)
    train(task, parent, opt, parent_steps, seed)
    child = task.grow(parent)
    at_growth = task.eval_loss(child)
    out = {}
    for name, rule in RULES.items():
        model = copy.deepcopy(child)
        new = transfer_optimizer(opt, parent, model, rule=rule)  # opt, parent untouched
        losses: list[float] = []
        train(task, model, new, after, seed + 1000,
              on_step=lambda _s, m=model, ls=losses: ls.append(task.eval_loss(m)))
        out[name] = (max(losses) - at_growth, losses[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--after", type=int, default=40, help="steps after growth (K)")
    parser.add_argument("--tasks", nargs="+", default=["cnn", "gpt"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/optim_rule.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    load = os.getloadavg()
    rows = []
    for task_name in args.tasks:
        task = Task(task_name)
        parent_steps = 300 if task_name == "cnn" else 400
        for kind in ("sgd", "adamw"):
            per_seed = [run(task, kind, s, parent_steps, args.after) for s in range(args.seeds)]
            rows.append((task_name, kind, per_seed))
            print(task_name, kind, per_seed, flush=True)
    lines = [
        "# Optimiser state over a growth: which rule?",
        "",
        f"`OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/optim_rule.py --seeds "
        f"{args.seeds} --after {args.after}`, {datetime.date.today()}, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{time.time() - started:.0f} s. The machine was shared with other jobs (load average "
        f"{load[0]:.1f} at the start, 2 cores); times do not matter here, losses are "
        f"deterministic per seed.",
        "",
        "Setup: benchmarks/optim_rule.py's docstring. `rise` = max eval loss over the first "
        f"{args.after} steps after growth minus the eval loss at growth (nats; smaller is "
        "better); `end` = eval loss after them. Rules: `scaled`/`copied` = indexed moments "
        "scaled like the weights or copied; `none`/`borrow` = fresh parameters without state "
        "or with their stand-in's (zero first moment, mean second moment, its step).",
        "",
        "| model | optimiser | rule | rise per seed | mean rise | mean end | "
        "paired vs scaled+none (rise, mean ± sd) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task_name, kind, per_seed in rows:
        base = [s["scaled+none"][0] for s in per_seed]
        for name in RULES:
            rises = [s[name][0] for s in per_seed]
            ends = [s[name][1] for s in per_seed]
            diffs = [r - b for r, b in zip(rises, base, strict=True)]
            sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            lines.append(
                f"| {task_name} | {kind} | {name} | {', '.join(f'{r:.4f}' for r in rises)} | "
                f"{statistics.mean(rises):.4f} | {statistics.mean(ends):.4f} | "
                f"{statistics.mean(diffs):+.4f} ± {sd:.4f} |"
            )
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
