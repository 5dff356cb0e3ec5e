"""What training a GPT needs beyond the one training loop
(:func:`stablemorph.experiment.train.train`, which trains and evaluates language models on
the windows of :func:`stablemorph.transformer.text.text_dataset` like any classifier):
the loss of a batch of windows, its mean over fixed windows, and an AdamW with weight decay
on matrices only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from stablemorph.experiment.train import evaluate as evaluate_examples
from stablemorph.experiment.train import loss_fn
from stablemorph.transformer.model import GPT


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
    """Mean next-character cross-entropy (nats) of windows ``x`` ``(B, T)`` with targets
    ``y`` ``(B, T)``."""
    return loss_fn(model(x), y)


def evaluate(model: GPT, windows: tuple[Tensor, Tensor], batch_size: int = 64) -> float:
    """Mean next-character loss (nats) over fixed windows ``(x, y)``, each ``(N, T)``, in eval
    mode (every submodule's mode is restored): the one loop's
    :func:`~stablemorph.experiment.train.evaluate`, loss only."""
    return evaluate_examples(model, windows[0], windows[1], batch_size)[1]
