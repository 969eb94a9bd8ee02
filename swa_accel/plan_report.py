"""The plan as one line, and the warnings a plan earns before a wasted run: the same words from the recipes'
console, the `SWA` object in a user's loop and `add_swa`."""

from __future__ import annotations

from .arguments import SWAArguments
from .timeline import TrainingPlan


def averaging_updates(plan: TrainingPlan) -> int:
    """How many averaging updates the plan gives: every `update_every_steps` after the SWA start, or one at each
    epoch end after it (an epoch the budget cuts short has no end)."""
    start = plan.swa_start_step
    if start is None:
        return 0
    if plan.update_every_steps is not None:
        return (plan.total_steps - start) // plan.update_every_steps
    return plan.total_steps // plan.steps_per_epoch - start // plan.steps_per_epoch


def plan_line(plan: TrainingPlan, swa: SWAArguments) -> str:
    head = f"plan: {plan.total_steps} optimizer steps ({plan.num_epochs} epochs of {plan.steps_per_epoch})"
    if plan.swa_start_step is None:
        return f"{head}; no averaging (swa_method none)"
    start = plan.swa_start_step
    cadence = (f"every {plan.update_every_steps} steps" if plan.update_every_steps is not None
               else "at each epoch end")
    rate = "the pre-SWA schedule's rate" if swa.swa_lr is None else \
        "swa_lr " + ",".join(f"{rate:g}" for rate in swa.swa_lr_values())
    candidates = f", {len(plan.candidates)} candidate starts" if len(plan.candidates) > 1 else ""
    return (f"{head}; {swa.swa_method} averaging from step {start} (epoch {start / plan.steps_per_epoch:g}), "
            f"{cadence}: {averaging_updates(plan)} updates at {rate}{candidates}")


def plan_warnings(plan: TrainingPlan, swa: SWAArguments) -> list[str]:
    """Settings whose plan makes the average meaningless, with the numbers."""
    updates = averaging_updates(plan)
    if plan.swa_start_step is None:
        return []
    if updates < 2:
        return [f"warning: the plan gives {updates} averaging update(s): the average is the weights of a single "
                "step, not an average; start averaging earlier or set swa_update_every_steps"]
    warnings = []
    if swa.swa_method == "ema" and not swa.ema_warmup:
        horizon = 1.0 / (1.0 - swa.ema_decay)
        if horizon > updates:
            first = swa.ema_decay ** (updates - 1)  # the first update's weight (it starts as a copy)
            every = plan.update_every_steps
            first_step = plan.swa_start_step + every if every else \
                (plan.swa_start_step // plan.steps_per_epoch + 1) * plan.steps_per_epoch
            warnings.append(
                f"warning: ema_decay {swa.ema_decay:g} averages over about {horizon:.0f} updates, but the plan gives "
                f"{updates}: the first update keeps {first:.0%} of the weight, so the EMA is about the weights after "
                f"step {first_step}; lower ema_decay (e.g. {_decay_for(updates):.2g}), set ema_warmup true, or "
                "average more often (swa_update_every_steps)")
    return warnings


def _decay_for(updates: int) -> float:
    """A decay whose horizon is a quarter of the updates (at least 0.5)."""
    return max(0.5, 1.0 - 4.0 / updates)
