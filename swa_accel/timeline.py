"""The run's SWA timeline in optimizer steps: the budget, the SWA start, the anneal, when the average is updated
and where the later-start candidates begin (the SWA phase's rate: `swa_lr.py`; the recipes' pre-SWA schedule:
`runner/lr_schedule.py`).

Everything is a pure function of the optimizer step, so the plan does not depend on `num_processes` or
`gradient_accumulation_steps` for the same global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .arguments import SWAArguments
from .errors import ConfigError


@dataclass(frozen=True)
class TrainingPlan:
    """The step budget and the SWA timeline, all in optimizer steps."""

    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    swa_start_step: Optional[int]  # None when averaging is off
    anneal_steps: int
    update_every_steps: Optional[int]  # None: average at each epoch end
    # (name, start step) of every SWA candidate, the SWA start first; empty when averaging is off.
    candidates: tuple[tuple[str, int], ...] = ()

    def averaging_active(self, global_step: int) -> bool:
        """Whether optimizer step number `global_step` (1-based) fell inside the averaging phase."""
        return self.swa_start_step is not None and global_step > self.swa_start_step

    def update_after_step(self, global_step: int) -> bool:
        """Whether to average right after optimizer step `global_step` in step-counted mode."""
        if self.update_every_steps is None or not self.averaging_active(global_step):
            return False
        return (global_step - self.swa_start_step) % self.update_every_steps == 0

    def update_at_epoch_end(self, global_step: int) -> bool:
        return self.update_every_steps is None and self.averaging_active(global_step)


def plan_run(batches_per_epoch: int, swa: SWAArguments, num_epochs: Optional[int] = None,
             max_steps: Optional[int] = None, gradient_accumulation_steps: int = 1) -> TrainingPlan:
    """Derives the budget and the SWA timeline from the prepared train loader's length.

    Args:
        batches_per_epoch: `len()` of the prepared (sharded) training loader, i.e. micro-batches per
            process per epoch.
        num_epochs, max_steps: the budget; `max_steps` (optimizer steps) wins when both are given.

    Raises:
        ConfigError: no budget, or the SWA start falls at or after the end of training.
    """
    if batches_per_epoch < 1:
        raise ConfigError("per_device_train_batch_size: the training data gives no batch on each process")
    steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    if max_steps is not None:
        total_steps = max_steps
    elif num_epochs is not None:
        total_steps = steps_per_epoch * num_epochs
    else:
        raise ConfigError("num_epochs: give the training budget, in epochs (num_epochs) or optimizer steps "
                          "(max_steps), so that the SWA start can be placed in it")
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    swa_start = None
    if swa.enabled:
        if swa.swa_start_step is not None:
            swa_start, name = swa.swa_start_step, "swa_start_step"
        elif swa.swa_start_epoch is not None:
            swa_start, name = swa.swa_start_epoch * steps_per_epoch, "swa_start_epoch"
        else:
            swa_start, name = int(swa.swa_start_fraction * total_steps), "swa_start_fraction"
        if swa_start >= total_steps:
            raise ConfigError(
                f"{name}: averaging would start at optimizer step {swa_start}, "
                f"but training ends after {total_steps} steps ({num_epochs} epochs of {steps_per_epoch})"
            )
    anneal = steps_per_epoch if swa.swa_anneal_steps is None else swa.swa_anneal_steps
    candidates = candidate_starts(swa, swa_start, steps_per_epoch, total_steps) if swa_start is not None else ()
    return TrainingPlan(steps_per_epoch, total_steps, num_epochs, swa_start, anneal, swa.swa_update_every_steps,
                        candidates)


def candidate_name(step: int, steps_per_epoch: int) -> str:
    if step % steps_per_epoch == 0:
        return f"swa_from_epoch_{step // steps_per_epoch}"
    return f"swa_from_step_{step}"


def candidate_starts(swa: SWAArguments, swa_start: int, steps_per_epoch: int,
                     total_steps: int) -> tuple[tuple[str, int], ...]:
    """The SWA start and the later starts of `swa_start_candidates`, as (name, optimizer step), in order.

    Raises:
        ConfigError: a candidate starts before the SWA start (the LR leaves the pre-SWA schedule there, so an
            earlier average would mix two phases) or at or after the end of training.
    """
    kind, values = swa.start_candidates_spec()
    if kind == "every_epoch":  # every N epochs after the SWA start, on epoch boundaries
        spacing = int(values[0]) * steps_per_epoch
        steps = list(range((swa_start // steps_per_epoch) * steps_per_epoch + spacing, total_steps, spacing))
        values = ()
    elif kind == "epochs":
        steps = [int(v) * steps_per_epoch for v in values]
    else:
        steps = [int(v * total_steps) for v in values]
    for value, step in zip(values or steps, steps):
        if step < swa_start:
            raise ConfigError(f"swa_start_candidates: {value:g} starts at optimizer step {step}, before the SWA start "
                              f"(step {swa_start}); move the SWA start to the earliest candidate")
        if step >= total_steps:
            raise ConfigError(f"swa_start_candidates: {value:g} starts at optimizer step {step}, but training ends "
                              f"after {total_steps} steps")
    ordered = sorted({swa_start, *steps})
    return tuple((candidate_name(step, steps_per_epoch), step) for step in ordered)
