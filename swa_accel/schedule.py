"""The run's timeline and its pre-SWA learning-rate schedule, counted in optimizer steps (the SWA phase's rate:
`swa_lr.py`).

Everything is a pure function of the optimizer step, so the LR at a given step does not depend on
`num_processes` or `gradient_accumulation_steps` for the same global batch. We step our own
`LambdaLR` once per real optimizer step instead of letting accelerate's prepared scheduler step
`num_processes` times per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .config import ConfigError, SWAArguments, RunArguments
from .swa_lr import with_swa_phase


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


def make_plan(batches_per_epoch: int, training: RunArguments, swa: SWAArguments) -> TrainingPlan:
    """`plan_run` with the budget of a recipe's `RunArguments`."""
    return plan_run(batches_per_epoch, swa, num_epochs=training.num_train_epochs, max_steps=training.max_train_steps,
                    gradient_accumulation_steps=training.gradient_accumulation_steps)


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


def pre_swa_factor(step: int, training: RunArguments, total_steps: int) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based) of the pre-SWA schedule."""
    warmup = training.num_warmup_steps
    kind = training.lr_scheduler_type
    if kind == "one_cycle":
        # One-cycle: a cosine rise from lr/25 to lr (warmup, default 30% of the budget), then a cosine fall.
        rise = warmup if warmup > 0 else max(1, int(0.3 * total_steps))
        if step < rise:
            return 0.04 + 0.96 * 0.5 * (1 - math.cos(math.pi * step / rise))
        progress = min(1.0, (step - rise) / max(1, total_steps - rise))
        return 0.5 * (1 + math.cos(math.pi * progress))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, plan: TrainingPlan,
                   training: RunArguments) -> torch.optim.lr_scheduler.LambdaLR:
    """The pre-SWA schedule as a LambdaLR, stepped once per real optimizer step (never passed to
    `accelerator.prepare`). Each param group's base is the rate the optimizer was built with.

    From the SWA start on, the SWA controller sets the rate (`swa_lr.SWALRPhase`), whatever this returns.
    """

    # A plain function, not a callable object: LambdaLR then keeps it out of the saved state, which holds only
    # the step count.
    def factor(step: int) -> float:
        return pre_swa_factor(step, training, plan.total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lr_curve(plan: TrainingPlan, training: RunArguments, swa: SWAArguments) -> list[float]:
    """The first param group's rate at every optimizer step of a recipe's run (for plots and tests)."""
    pre = [pre_swa_factor(s, training, plan.total_steps) * training.learning_rate for s in range(plan.total_steps)]
    rates = swa.swa_lr_values()
    return with_swa_phase(pre, plan.swa_start_step, plan.anneal_steps, swa.swa_anneal_strategy,
                          rates[0] if rates else None)


def rates_from_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                      configured: list[float]) -> None:
    """After a restore, each param group's pre-SWA rate comes from this run's config and schedule, never from the
    checkpoint's optimizer state (which holds the next step's rate under the old config). `configured`: each
    group's base rate as this run's optimizer was built."""
    scheduler.base_lrs = list(configured)
    for group, base, factor in zip(optimizer.param_groups, configured, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = base, base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
