"""The one training loop of the experiments: deterministic, over in-memory tensors, in one
process or on every rank of a DDP run, for classifiers (logits ``(B, C)``, labels ``(B,)``)
and language models alike (logits ``(B, T, V)``, targets ``(B, T)``: the loss and accuracy
are per token).

Determinism contract: the mini-batch of global step ``s`` is a pure function of
``(seed, s)`` (:func:`batch_indices`), so every arm of an experiment sees the same batches,
and a run stopped after step ``k`` and resumed with ``start_step=k`` (model, optimiser and
scheduler state restored) continues exactly as the uninterrupted run.

DDP: give :func:`train` a ``DistributedDataParallel`` model; rank ``r`` of ``W`` then
runs the ``r``-th of ``W`` equal slices of each global batch (:func:`rank_slice`), so DDP's
gradient average equals the single-process gradient of the global batch (up to float
summation order; BatchNorm layers see only their rank's slice, so models with BatchNorm in
train mode differ from the single-process run unless converted to ``nn.SyncBatchNorm``).
Nothing here changes
global settings (thread count, deterministic-algorithm flags); :func:`seed_everything` only
seeds the random generators.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from stablemorph.experiment.data import Dataset

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")

Record = dict[str, float | int | None]


@dataclass
class TrainConfig:
    """Optimiser and learning-rate schedule of one training run.

    ``schedule``: ``"constant"``; ``"cosine"`` (from ``lr`` to 0 over the run);
    ``"step"`` (multiply by ``gamma`` at each fraction of the run in ``milestones``).
    ``warmup_steps``: linear ramp from ``lr / warmup_steps`` up to the schedule's value.
    ``momentum`` applies to SGD only.
    """

    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    schedule: str = "constant"
    warmup_steps: int = 0
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(
                f"need weight_decay >= 0 and 0 <= momentum < 1, got {self.weight_decay}, "
                f"{self.momentum}"
            )
        if self.batch_size < 1 or self.warmup_steps < 0 or self.seed < 0:
            raise ValueError(
                f"need batch_size >= 1, warmup_steps >= 0, seed >= 0, got {self.batch_size}, "
                f"{self.warmup_steps}, {self.seed}"
            )
        self.milestones = tuple(self.milestones)
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError(f"milestones must be fractions in (0, 1), got {self.milestones}")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser ``cfg`` names over ``model``'s trainable parameters (one group; weight
    decay on every parameter)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` used by optimiser step ``step`` (0-based) of ``total_steps``."""
    if cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    elif cfg.schedule == "step":
        factor = cfg.gamma ** sum(step >= m * total_steps for m in cfg.milestones)
    else:
        factor = 1.0
    if step < cfg.warmup_steps:
        factor *= (step + 1) / cfg.warmup_steps
    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> LambdaLR:
    """A per-step scheduler following :func:`lr_factor`; call ``.step()`` after every
    optimiser step (:func:`train` does). To resume, create it on the fresh optimiser, then
    load both state dicts."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total_steps))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (model init, dropout)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per pass over ``n`` examples (the last partial batch is dropped, so all
    batches have the same size; at least 1)."""
    return max(1, n // batch_size)


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state))
    return torch.randperm(n, generator=generator)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Example indices (int64, ``(min(batch_size, n),)``) of the batch at global ``step``.

    Step ``s`` falls in epoch ``s // steps_per_epoch(n, batch_size)``; each epoch is a
    permutation drawn from a generator seeded by ``(seed, epoch)``, cut into full batches.
    A pure function of its arguments.
    """
    if n < 1 or batch_size < 1 or seed < 0 or step < 0:
        raise ValueError(
            f"need n >= 1, batch_size >= 1, seed >= 0, step >= 0; got {n}, {batch_size}, "
            f"{seed}, {step}"
        )
    per_epoch = steps_per_epoch(n, batch_size)
    epoch, k = divmod(step, per_epoch)
    size = min(batch_size, n)
    return _epoch_permutation(n, seed, epoch)[k * size : (k + 1) * size].clone()


def rank_slice(indices: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s equal, contiguous slice of a global batch's ``indices`` ``(B,)``;
    ``B`` must be a multiple of ``world_size``."""
    if len(indices) % world_size:
        raise ValueError(f"a batch of {len(indices)} examples does not split evenly over "
                         f"{world_size} ranks: use a batch size that is a multiple of it")
    size = len(indices) // world_size
    return indices[rank * size:(rank + 1) * size]


def loss_fn(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits ``(..., C)`` against integer targets ``(...)``: one value per
    example for a classifier, per token for a language model."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                           reduction=reduction)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on ``x`` ``(N, ...)``, ``y`` ``(N,)``
    (or ``(N, T)`` targets of a language model: per-token accuracy and loss).

    Runs in eval mode without gradients and restores every submodule's train/eval flag.
    """
    if len(x) != len(y) or len(x) == 0 or batch_size < 1:
        raise ValueError(
            f"need as many labels as inputs (>0) and batch_size >= 1, got {len(x)} inputs, "
            f"{len(y)} labels, batch_size={batch_size}"
        )
    modes = [(m, m.training) for m in model.modules()]
    device = _device(model)
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
                logits = model(xb)
                loss_sum += loss_fn(logits, yb, reduction="sum").item()
                correct += (logits.argmax(dim=-1) == yb).sum().item()
                count += yb.numel()
    finally:
        for module, mode in modes:
            module.training = mode
    return correct / count, loss_sum / count


def eval_schedule(
    total_steps: int, dense_until: int = 300, dense_every: int = 10, every: int = 100
) -> list[int]:
    """Steps to evaluate at: 0, every ``dense_every`` steps up to ``dense_until``, then every
    ``every`` steps, and always ``total_steps`` (sorted, no repeats)."""
    if total_steps < 0 or dense_until < 0 or dense_every < 1 or every < 1:
        raise ValueError(
            f"need total_steps >= 0, dense_until >= 0, dense_every >= 1, every >= 1; got "
            f"{total_steps}, {dense_until}, {dense_every}, {every}"
        )
    dense = range(0, min(dense_until, total_steps) + 1, dense_every)
    sparse = range(dense_until + every - dense_until % every, total_steps + 1, every)
    return sorted({*dense, *sparse, total_steps})


def train(
    model: nn.Module,
    data: Dataset,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    seed: int,
    batch_size: int,
    start_step: int = 0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    eval_steps: Iterable[int] = (),
    lr_at: Callable[[int], float] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    on_eval: Callable[[Record], None] | None = None,
    progress: bool | str = False,
) -> list[Record]:
    """Run optimiser steps ``start_step .. steps - 1`` on ``data``'s training set.

    Each step: batch :func:`batch_indices` ``(len(train), batch_size, seed, step)``,
    cross-entropy (:func:`loss_fn`), ``optimizer.step()``, ``after_step(module)``,
    ``scheduler.step()``. ``lr_at(step)``, if given, sets every group's rate before the step
    to ``lr_at(step) * group.get("lr_scale", 1.0)`` (a per-group multiplier; give either
    ``lr_at`` or ``scheduler``).

    ``model`` may be a ``DistributedDataParallel`` wrapper (module docstring): then
    ``batch_size`` is the *global* batch (a multiple of the world size), evaluation runs on
    rank 0 on the unwrapped module and is broadcast, every rank returns the same records and
    their ``train_loss`` is the mean over the global batches; ``progress`` shows on rank 0.
    The model is put in train mode. At every ``s`` in ``eval_steps`` with
    ``start_step < s <= steps``, and at ``s = 0`` in a fresh run (after ``s`` steps in total),
    it evaluates on the test set and records
    ``{"step", "test_acc", "test_loss", "train_loss", "lr", "seconds"}``: ``train_loss`` is
    the mean training loss since the previous record (``None`` if no step was taken), ``lr``
    the rate of group 0 for the next step, ``seconds`` the training time so far in this call
    (evaluation excluded). ``on_eval`` receives each record as it is made.
    ``progress``: a tqdm bar, labelled with the string if one is given. Returns the records.

    A resumed run (``start_step = k``) needs the optimiser (and scheduler) state of step
    ``k``; the scheduler must be at ``last_epoch == k``. It does not repeat the evaluation at
    step ``k`` (the run that stopped there made it), so the records of a run split at ``k``
    concatenate to those of the unsplit run.
    """
    if not 0 <= start_step <= steps:
        raise ValueError(f"need 0 <= start_step <= steps, got start_step={start_step}, {steps=}")
    n = len(data.y_train)
    if n == 0 or batch_size < 1:
        raise ValueError(f"need training examples and batch_size >= 1, got {n}, {batch_size}")
    if scheduler is not None and lr_at is not None:
        raise ValueError("give lr_at or scheduler, not both")
    if scheduler is not None:
        if scheduler.optimizer is not optimizer:
            raise ValueError("scheduler drives a different optimizer than the one given")
        if scheduler.last_epoch != start_step:
            raise ValueError(
                f"scheduler is at step {scheduler.last_epoch} but training starts at step "
                f"{start_step}: load its state_dict (after the optimizer's) before resuming"
            )
        # The scheduler's record is the truth (constructing a scheduler resets the rate).
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
    todo = sorted({s for s in eval_steps if start_step < s <= steps or s == start_step == 0})
    ddp = isinstance(model, DistributedDataParallel)
    module = model.module if ddp else model
    group = model.process_group if ddp else None
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if ddp else (0, 1)
    device = _device(module)
    records: list[Record] = []
    losses: list[Tensor] = []
    seconds = 0.0

    def set_lr(step: int) -> None:
        if lr_at is not None:
            base = lr_at(step)
            for g in optimizer.param_groups:
                g["lr"] = base * g.get("lr_scale", 1.0)

    def record(step: int) -> None:
        train_loss = torch.stack(losses).mean().item() if losses else None
        losses.clear()
        if step < steps:
            set_lr(step)
        box: list[Record | None] = [None]
        if rank == 0:
            acc, loss = evaluate(module, data.x_test, data.y_test)
            box[0] = {
                "step": step,
                "test_acc": acc,
                "test_loss": loss,
                "train_loss": train_loss,
                "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get(
                    "lr_scale", 1.0),
                "seconds": seconds,
            }
        if ddp:
            dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        rec = box[0]
        assert rec is not None
        records.append(rec)
        if on_eval is not None:
            on_eval(rec)
        if bar is not None:
            bar.set_postfix(acc=f"{rec['test_acc']:.4f}", refresh=False)

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        label = progress if isinstance(progress, str) else None
        bar = tqdm(total=steps, initial=start_step, desc=label, unit="step", leave=False)
    model.train()
    pending = iter(todo)
    next_eval = next(pending, None)
    try:
        for step in range(start_step, steps + 1):
            if step == next_eval:
                record(step)
                next_eval = next(pending, None)
            if step == steps:
                break
            started = time.perf_counter()
            set_lr(step)
            idx = batch_indices(n, batch_size, seed, step)
            if ddp:
                idx = rank_slice(idx, rank, world)
            xb, yb = data.x_train[idx].to(device), data.y_train[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(module)
            if scheduler is not None:
                scheduler.step()
            mean = loss.detach().clone()
            if ddp:
                dist.all_reduce(mean, group=group)
                mean /= world
            losses.append(mean)
            seconds += time.perf_counter() - started
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return records
