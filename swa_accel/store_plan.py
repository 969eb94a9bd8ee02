"""When the snapshot store folds and where its points fall, in optimizer steps, and what a disk budget keeps.

Folds follow the averaging cadence (each `swa_update_every_steps`-th step counted from the SWA start, or each epoch
end), from the SWA start or, with `snapshot_from: start`, from the first step. Points fall every N epochs or N steps,
and always at the last step, so that the store ends where training ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from .arguments import SWAArguments, store_cadence
from .timeline import TrainingPlan

MB = 2 ** 20


@dataclass(frozen=True)
class StorePlan:
    """The store's timeline: folds at steps after `first_fold_after`, points at `cut_steps`."""

    first_fold_after: int
    anchor: int  # folds in step cadence fall at anchor + k * every (the SWA start's phase)
    update_every_steps: Optional[int]  # None: at epoch ends
    cut_steps: tuple[int, ...]
    dropped_steps: tuple[int, ...] = ()  # points a disk budget thinned away

    def fold_due(self, step: int, epoch_end: bool) -> bool:
        if step <= self.first_fold_after:
            return False
        if self.update_every_steps is None:
            return epoch_end
        return (step - self.anchor) % self.update_every_steps == 0

    def folds_at_points(self, steps_per_epoch: int) -> list[int]:
        """The fold count at each kept point, as the run will have it (from the plan alone, as `fold_due` counts)."""
        if self.update_every_steps is None:  # (epoch ends)
            return [step // steps_per_epoch - self.first_fold_after // steps_per_epoch for step in self.cut_steps]
        every, anchor = self.update_every_steps, self.anchor
        return [max(0, (step - anchor) // every - (self.first_fold_after - anchor) // every) for step in self.cut_steps]

    def cut_due(self, step: int) -> bool:
        return step in self._cuts

    @cached_property
    def _cuts(self) -> frozenset:  # (asked at every step: built once)
        return frozenset(self.cut_steps)


def plan_store(plan: TrainingPlan, args: SWAArguments, floats: int) -> StorePlan:
    """The store's plan for a run's `plan`, its averaged copy of `floats` numbers (this rank's), and a disk budget.

    A budget thins the points to every 2nd, 3rd ... (the last point always stays) until the files fit: each point
    writes a segment mean and one snapshot per tracked power EMA; the weights of the last max(lawa_ks) points and
    BEMA's two copies come on top.
    """
    every, unit = store_cadence(args.snapshot_every)
    spacing = every * plan.steps_per_epoch if unit == "epochs" else every
    first = plan.swa_start_step if args.snapshot_from == "swa_start" else 0
    cuts = [step for step in range(spacing, plan.total_steps, spacing) if step > first] + [plan.total_steps]
    dropped: list[int] = []
    if args.snapshot_disk_budget_mb is not None:
        per_point = 4 * floats * (1 + len(args.posthoc_ema_tracked or ()))
        fixed = 4 * floats * (max(args.lawa_ks or [0]) + (2 if args.bema else 0))
        budget = args.snapshot_disk_budget_mb * MB
        thin = 1
        while fixed + per_point * len(_thinned(cuts, thin)) > budget and len(_thinned(cuts, thin)) > 1:
            thin += 1
        if fixed + per_point * len(_thinned(cuts, thin)) > budget:
            need = (fixed + per_point) / MB
            raise ValueError(f"snapshot_disk_budget_mb: {args.snapshot_disk_budget_mb:g} MB holds not even the last "
                             f"point ({need:.1f} MB); raise it, or track fewer EMAs or LAWA points")
        kept = _thinned(cuts, thin)
        dropped = [step for step in cuts if step not in kept]
        cuts = kept
    return StorePlan(first, plan.swa_start_step or 0, plan.update_every_steps, tuple(cuts), tuple(dropped))


def _thinned(cuts: list[int], thin: int) -> list[int]:
    """Every `thin`-th point counted back from the last, which always stays."""
    return sorted(cuts[::-1][::thin])
