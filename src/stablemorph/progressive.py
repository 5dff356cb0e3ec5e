"""Progressive growth: grow a model *while it trains*, in place, on a schedule or a trigger.

A growth is anything that maps a parent to a grown child computing the same function:

- a callable ``parent -> child`` (``lambda m: sm.deepen(m, "fc2", inputs=x)``);
- a morph spec ``{"op": "deepen", "target": "fc2", **kwargs}`` (run by :func:`stablemorph.apply`);
- a size spec for :func:`stablemorph.grow`, e.g. ``{"layers": 4, "hidden": 128}``.

:func:`grow_in_place` applies one growth to a *running* model: the model object itself becomes
the child (its modules, parameters, buffers and attributes such as a Hugging Face ``config``
are replaced), and the optimiser and LR scheduler objects are updated in place (param groups
and state from :func:`stablemorph.transfer_optimizer`), so a trainer that holds references to
them (a plain loop, ``transformers.Trainer``, Lightning) keeps working. A DDP-wrapped model is
grown inside and re-wrapped (the wrapper is the one object that must be new: DDP registers its
parameters when it is built, and its construction broadcasts rank 0's values).

:class:`GrowthSchedule` holds ``(step, growth)`` pairs; :class:`PlateauTrigger` fires the next
growth when the loss stops improving; :class:`ProgressiveGrowth` drives either from a training
loop (``model = grower.step(step, model, optimizer, scheduler, loss=...)``).
:meth:`GrowthSchedule.check` refuses, before training starts, steps out of order, size specs
that shrink, and growths the model cannot take (it runs the whole schedule once on a copy).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stablemorph.optim import adopt_groups, transfer_optimizer, transfer_scheduler
from stablemorph.record import MorphRecord, history

Growth = Callable[[nn.Module], nn.Module] | Mapping[str, Any]
SIZE_KEYS = ("layers", "hidden", "heads", "kv_heads", "mlp")


class GrowthError(ValueError):
    """A growth schedule or trigger that cannot run: the message says which stage and why."""


def as_callable(growth: Growth) -> Callable[[nn.Module], nn.Module]:
    """The growth as a function ``parent -> child`` (specs resolved, module docstring)."""
    if callable(growth):
        return growth
    if not isinstance(growth, Mapping):
        raise GrowthError(f"a growth is a callable or a dict, not {type(growth).__name__}")
    spec = dict(growth)
    if "op" in spec:
        from stablemorph.morphs import apply

        op, target = spec.pop("op"), spec.pop("target", None)
        if target is None:
            raise GrowthError(f"morph spec {growth!r} has no 'target'")
        return lambda model: apply(op, model, target, **spec)
    unknown = set(spec) - {*SIZE_KEYS, "scheme", "seed", "inputs"}
    if unknown:
        raise GrowthError(f"growth spec {growth!r}: unknown keys {sorted(unknown)}; a size "
                          f"spec takes {list(SIZE_KEYS)} (+ scheme, seed, inputs), a morph "
                          f"spec 'op' and 'target'")

    def grow_to(model: nn.Module) -> nn.Module:
        import stablemorph

        if not hasattr(stablemorph, "grow"):
            raise GrowthError("size specs need stablemorph.grow, which this build lacks")
        return stablemorph.grow(model, **spec)

    return grow_to


def _inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimiser behind a wrapper (accelerate's ``AcceleratedOptimizer``)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _inner_scheduler(scheduler: Any) -> Any:
    inner = getattr(scheduler, "scheduler", None)
    return inner if inner is not None and hasattr(inner, "base_lrs") else scheduler


def _become(model: nn.Module, child: nn.Module) -> None:
    """Make the object ``model`` the child: same class (a morph deep-copies its parent), so
    swapping the instance dictionary moves every module, parameter, buffer and attribute."""
    if type(child) is not type(model):
        raise GrowthError(f"the growth returned a {type(child).__name__}, not a "
                          f"{type(model).__name__}: it cannot be applied in place")
    model.__dict__.clear()
    model.__dict__.update(child.__dict__)


def _update_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Per-group scheduler lists follow a change in the number of param groups."""
    inner = _inner_scheduler(scheduler)
    if len(getattr(inner, "base_lrs", [])) == len(optimizer.param_groups):
        return
    grown = transfer_scheduler(inner, optimizer)
    inner.__dict__.update(grown.__dict__)


def grow_in_place(
    model: nn.Module,
    growth: Growth,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> nn.Module:
    """Apply ``growth`` to a running ``model`` in place.

    ``model`` (the same object, or for a DDP wrapper its module) becomes the grown child;
    ``optimizer`` (also accelerate's wrapper) gets the child's parameters and mapped state in
    its existing param groups; ``scheduler`` follows. Returns the model to train on: ``model``
    itself, or a new :class:`~torch.nn.parallel.DistributedDataParallel` around it (built
    with the old wrapper's settings). On any error nothing is changed.
    """
    ddp = model if isinstance(model, DistributedDataParallel) else None
    module = ddp.module if ddp is not None else model
    child = as_callable(growth)(module)
    if not history(child) or len(history(child)) <= len(history(module)):
        raise GrowthError("the growth returned a model with no new stablemorph record; "
                          "use a stablemorph morph or sm.grow")
    # Build everything before changing anything, so a failure leaves the caller's objects.
    grown_opt = None
    if optimizer is not None:
        grown_opt = transfer_optimizer(_inner_optimizer(optimizer), module, child)
    _become(module, child)
    if optimizer is not None and grown_opt is not None:
        target = _inner_optimizer(optimizer)
        adopt_groups(target, grown_opt)
        if scheduler is not None:
            _update_scheduler(scheduler, target)
    if ddp is None:
        return module
    return DistributedDataParallel(
        module, device_ids=ddp.device_ids, output_device=ddp.output_device, dim=ddp.dim,
        process_group=ddp.process_group, find_unused_parameters=ddp.find_unused_parameters,
        gradient_as_bucket_view=ddp.gradient_as_bucket_view,
        forward_sync_buffers=ddp.forward_sync_buffers,
    )


@dataclass
class Stage:
    """One scheduled growth: applied after ``step`` optimiser steps."""

    step: int
    growth: Growth
    name: str = ""


def _sizes(growth: Growth) -> dict[str, int]:
    if isinstance(growth, Mapping) and "op" not in growth:
        return {k: int(v) for k, v in growth.items() if k in SIZE_KEYS and v is not None}
    return {}


class GrowthSchedule:
    """Growths at fixed steps: ``GrowthSchedule([(300, {"layers": 4}), (600, {"layers": 8})])``.

    Steps must be positive and strictly increasing; size specs must not shrink from one stage
    to the next. Both are checked here; :meth:`check` also runs the schedule on a copy.
    """

    def __init__(self, stages: Sequence[tuple[int, Growth] | Stage]):
        self.stages = [s if isinstance(s, Stage) else Stage(int(s[0]), s[1]) for s in stages]
        if not self.stages:
            raise GrowthError("a growth schedule needs at least one (step, growth) pair")
        last_step, sizes = 0, {}
        for i, stage in enumerate(self.stages):
            if stage.step <= last_step:
                raise GrowthError(f"stage {i}: step {stage.step} must be > {last_step} "
                                  f"(steps positive and strictly increasing)")
            for key, value in _sizes(stage.growth).items():
                if key in sizes and value <= sizes[key]:
                    raise GrowthError(f"stage {i} (step {stage.step}): {key}={value} does not "
                                      f"grow past the previous stage's {sizes[key]}")
                sizes[key] = value
            last_step = stage.step
            stage.name = stage.name or f"stage {i} (step {stage.step})"

    def due(self, step: int) -> list[Stage]:
        """The stages to apply once ``step`` optimiser steps are done."""
        return [s for s in self.stages if s.step == step]

    def check(self, model: nn.Module) -> list[MorphRecord]:
        """Run every growth in order on a copy of ``model``; raise :class:`GrowthError` naming
        the stage that fails. Returns the records of the growths (their reports). Costs the
        growths' own time once; ``model`` is not changed."""
        trial = copy.deepcopy(model.module if isinstance(model, DistributedDataParallel)
                              else model)
        start = len(history(trial))
        for stage in self.stages:
            try:
                trial = as_callable(stage.growth)(trial)
            except Exception as err:
                raise GrowthError(f"{stage.name}: the model cannot take this growth: "
                                  f"{type(err).__name__}: {err}") from err
        return history(trial)[start:]


@dataclass
class PlateauTrigger:
    """Fires the next of ``growths`` when the monitored loss has not improved by more than
    ``min_delta`` (relative) for ``patience`` observations; then waits ``cooldown``
    observations before watching again."""

    growths: Sequence[Growth]
    patience: int = 3
    min_delta: float = 0.01
    cooldown: int = 0
    best: float = math.inf
    stale: int = 0
    wait: int = 0
    fired: int = 0
    _queue: list[Growth] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise GrowthError(f"PlateauTrigger: patience must be >= 1, got {self.patience}")
        if not self.growths:
            raise GrowthError("PlateauTrigger: give at least one growth")
        GrowthSchedule([(i + 1, g) for i, g in enumerate(self.growths)])  # size order check
        self._queue = list(self.growths)

    def observe(self, loss: float) -> Growth | None:
        """Record one loss value; return the growth to apply now, or ``None``."""
        if self.wait > 0:
            self.wait -= 1
            self.best = min(self.best, loss)
            return None
        if loss < self.best * (1 - self.min_delta):
            self.best, self.stale = loss, 0
            return None
        self.stale += 1
        if self.stale < self.patience or not self._queue:
            return None
        self.stale, self.wait, self.best = 0, self.cooldown, math.inf
        self.fired += 1
        return self._queue.pop(0)


@dataclass
class GrowthEvent:
    """One growth applied during training."""

    step: int
    name: str
    records: list[MorphRecord]
    params_before: int
    params_after: int


class ProgressiveGrowth:
    """Drives a :class:`GrowthSchedule` and/or a :class:`PlateauTrigger` from a loop::

        grower = ProgressiveGrowth(schedule=GrowthSchedule([(200, spec1), (400, spec2)]))
        grower.check(model)                     # refuse a bad schedule before training
        for step in range(steps):
            ...; optimizer.step(); scheduler.step()
            model = grower.step(step + 1, model, optimizer, scheduler, loss=loss.item())

    ``events`` lists what was applied."""

    def __init__(self, schedule: GrowthSchedule | None = None,
                 trigger: PlateauTrigger | None = None):
        if schedule is None and trigger is None:
            raise GrowthError("ProgressiveGrowth needs a schedule, a trigger or both")
        self.schedule, self.trigger = schedule, trigger
        self.events: list[GrowthEvent] = []

    def check(self, model: nn.Module) -> None:
        """Dry-run the schedule (and the trigger's growths, in order) on a copy of ``model``."""
        stages: list[tuple[int, Growth]] = []
        if self.schedule is not None:
            stages += [(s.step, s.growth) for s in self.schedule.stages]
        if self.trigger is not None:
            last = stages[-1][0] if stages else 0
            stages += [(last + i + 1, g) for i, g in enumerate(self.trigger.growths)]
        GrowthSchedule(stages).check(model)

    def step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             scheduler: Any = None, loss: float | None = None) -> nn.Module:
        """Apply what is due after ``step`` optimiser steps; return the model to train on."""
        due: list[tuple[str, Growth]] = []
        if self.schedule is not None:
            due += [(s.name, s.growth) for s in self.schedule.due(step)]
        if self.trigger is not None and loss is not None:
            fired = self.trigger.observe(float(loss))
            if fired is not None:
                due.append((f"plateau {self.trigger.fired} (step {step})", fired))
        for name, growth in due:
            module = model.module if isinstance(model, DistributedDataParallel) else model
            before, n_before = len(history(module)), _count(module)
            model = grow_in_place(model, growth, optimizer, scheduler)
            module = model.module if isinstance(model, DistributedDataParallel) else model
            self.events.append(GrowthEvent(step, name, history(module)[before:], n_before,
                                           _count(module)))
        return model


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
