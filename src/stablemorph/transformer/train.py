"""Training and evaluating a GPT on a character corpus, deterministically.

The mini-batch of global step ``s`` is a pure function of ``(seed, s)``: a model grown after
``P`` steps and trained on from ``start_step=P`` sees exactly the batches that a model trained
from scratch sees at its steps ``P, P + 1, ...``, and every arm of an experiment sees the same
batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from stablemorph.transformer.model import GPT
from stablemorph.transformer.text import random_windows


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with weight decay on matrices only; linear warm-up then a constant rate."""

    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.1
    warmup_steps: int = 100
    batch_size: int = 32

    def lr_at(self, step: int) -> float:
        """The rate at global step ``step``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        return self.lr


def make_adamw(model: GPT, cfg: OptimConfig) -> torch.optim.AdamW:
    """Two groups: weight decay for parameters with >= 2 dims, none for biases and norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": other, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas,
    )


def lm_loss(model: GPT, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-character cross-entropy (nats)."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model: GPT, windows: tuple[Tensor, Tensor], batch_size: int = 64) -> float:
    """Mean loss over fixed windows, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    x, y = windows
    total = 0.0
    for i in range(0, len(x), batch_size):
        total += float(lm_loss(model, x[i:i + batch_size], y[i:i + batch_size])) * len(
            x[i:i + batch_size])
    model.train(was_training)
    return total / len(x)


def train(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    tokens: Tensor,
    *,
    steps: int,
    cfg: OptimConfig,
    seed: int,
    start_step: int = 0,
    eval_steps: Iterable[int] = (),
    evaluate_fn: Callable[[GPT], float] | None = None,
    on_eval: Callable[[int, float], None] | None = None,
) -> list[tuple[int, float]]:
    """Train ``steps`` steps from global step ``start_step``; evaluate before the (local)
    steps listed in ``eval_steps`` (``0``: before any update, ``steps``: at the end).
    Returns ``[(local step, val_loss), ...]``."""
    block = model.config.block_size
    wanted = sorted({s for s in eval_steps if 0 <= s <= steps})
    curve: list[tuple[int, float]] = []
    model.train()

    def record(step: int) -> None:
        if evaluate_fn is None:
            raise ValueError("train: eval_steps given without evaluate_fn")
        value = evaluate_fn(model)
        curve.append((step, value))
        if on_eval is not None:
            on_eval(step, value)

    pending = iter(wanted)
    nxt = next(pending, None)
    for step in range(steps + 1):
        if step == nxt:
            record(step)
            nxt = next(pending, None)
        if step == steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(start_step + step)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + start_step + step)
        x, y = random_windows(tokens, cfg.batch_size, block, gen)
        loss = lm_loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return curve
