"""A ``transformers.TrainerCallback`` that grows the model on a schedule while ``Trainer`` runs.

::

    from stablemorph.progressive import GrowthSchedule
    from stablemorph.trainer import GrowthCallback

    schedule = GrowthSchedule([(200, {"layers": 4}), (400, {"layers": 8})])
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[GrowthCallback(schedule)])
    trainer.train()

The growth happens at the end of the optimiser step named in the schedule (after
``zero_grad``), in place: ``Trainer``'s model, its (accelerate-wrapped) optimiser and LR
scheduler are the same objects afterwards, holding the grown parameters and the mapped state,
so training simply goes on. ``transformers`` is imported by this module only.

Limits: one process (``Trainer`` wraps the model for DDP/FSDP/DeepSpeed itself, and that
wrapper cannot be rebuilt from a callback): more processes are refused at the start.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from stablemorph.progressive import GrowthEvent, GrowthSchedule, PlateauTrigger, ProgressiveGrowth


class GrowthCallback(TrainerCallback):
    """Grows ``Trainer``'s model at the steps of ``schedule`` and/or when ``trigger`` fires on
    the logged training loss. ``check=True`` dry-runs every growth on a copy at the start of
    training, so a bad schedule is refused before the first step. ``events`` lists what was
    applied."""

    def __init__(self, schedule: GrowthSchedule | None = None,
                 trigger: PlateauTrigger | None = None, *, check: bool = True):
        self.grower = ProgressiveGrowth(schedule, trigger)
        self.check = check
        self._loss: float | None = None

    @property
    def events(self) -> list[GrowthEvent]:
        return self.grower.events

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        if getattr(args, "world_size", 1) > 1:
            raise RuntimeError(
                f"GrowthCallback: {args.world_size} processes; growth inside Trainer works "
                f"in one process only (use stablemorph.progressive.grow_in_place in your "
                f"own DDP loop)")
        if self.check and model is not None:
            self.grower.check(model)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self._loss = float(logs["loss"])

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        loss, self._loss = self._loss, None
        self.grower.step(state.global_step, model, optimizer, lr_scheduler, loss=loss)
