"""The recipes' pre-SWA learning-rate schedule, in optimizer steps, and the plan from a recipe's budget.

Everything is a pure function of the optimizer step, so the LR at a given step does not depend on
`num_processes` or `gradient_accumulation_steps` for the same global batch. We step our own
`LambdaLR` once per real optimizer step instead of letting accelerate's prepared scheduler step
`num_processes` times per call. From the SWA start on, the SWA controller sets the rate (`swa_lr.py`).
"""

from __future__ import annotations

import math

import torch

from ..arguments import SWAArguments
from ..swa_lr import with_swa_phase
from ..timeline import TrainingPlan, plan_run
from .config import RunArguments


def make_plan(batches_per_epoch: int, training: RunArguments, swa: SWAArguments) -> TrainingPlan:
    """`plan_run` with the budget of a recipe's `RunArguments`."""
    return plan_run(batches_per_epoch, swa, num_epochs=training.num_train_epochs, max_steps=training.max_train_steps,
                    gradient_accumulation_steps=training.gradient_accumulation_steps)


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
