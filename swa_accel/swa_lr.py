"""The SWA phase's learning rate, as torch's `SWALR` sets it: from the last rate used, anneal (cos or linear) to
`swa_lr` over `swa_anneal_steps` optimizer steps, then hold it.

`SWALRPhase` works on the optimizer the user built, whatever scheduler runs before the SWA start: it sets each
param group's rate right before every optimizer step of the SWA phase (a step pre-hook), so a scheduler stepped
after it cannot move the rate, and it takes the anneal's start from the rate the last pre-SWA step used. Both
live in the param groups (`swa_last_lr`, `swa_anneal_from`), so they travel with the optimizer's state through a
checkpoint.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .errors import ConfigError

LAST_USED = "swa_last_lr"  # the rate of the latest optimizer step before the SWA phase
ANNEAL_FROM = "swa_anneal_from"  # where the anneal starts: the last pre-SWA rate


def anneal_weight(steps_into_phase: int, anneal_steps: int, strategy: str) -> float:
    """The weight of `swa_lr` at the `steps_into_phase`-th step of the SWA phase (1-based): 0 -> 1 over the anneal."""
    progress = 1.0 if anneal_steps == 0 else min(1.0, steps_into_phase / anneal_steps)
    return (1 - math.cos(math.pi * progress)) / 2 if strategy == "cos" else progress


def swa_phase_lr(step: int, start: int, anneal_steps: int, strategy: str, from_lr: float, swa_lr: float) -> float:
    """The rate of optimizer step `step` (0-based, `step >= start`), as `SWALR` gives it."""
    alpha = anneal_weight(step - start + 1, anneal_steps, strategy)
    return swa_lr * alpha + from_lr * (1 - alpha)


def _value(rate):
    """A param group's rate as its own value: a tensor rate (torch's schedulers allow one) is copied, because a
    scheduler later writes into that same tensor in place."""
    return rate.detach().clone() if isinstance(rate, torch.Tensor) else rate


def per_group(swa_lrs: Sequence[float], num_groups: int) -> list[float]:
    """`swa_lr` for each param group: one value for all of them, or one per group (torch's meaning)."""
    if len(swa_lrs) == 1:
        return list(swa_lrs) * num_groups
    if len(swa_lrs) != num_groups:
        raise ConfigError(f"swa_lr: {len(swa_lrs)} values for an optimizer with {num_groups} param groups; "
                          "give one rate, or one per group")
    return list(swa_lrs)


class SWALRPhase:
    """Runs the SWA phase's learning rate on `optimizer` from optimizer step `start` (0-based) on.

    Args:
        optimizer: the torch optimizer, or accelerate's wrapper of it.
        swa_lrs: one rate for every param group, or one per group.
        start: the first optimizer step of the SWA phase.
        anneal_steps: steps of the anneal (0: jump to `swa_lr`).
        strategy: "cos" or "linear".
    """

    def __init__(self, optimizer, swa_lrs: Sequence[float], start: int, anneal_steps: int, strategy: str,
                 steps_done: Callable[[], int]) -> None:
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # (accelerate's AcceleratedOptimizer)
        self.targets = per_group(swa_lrs, len(self.optimizer.param_groups))
        self.start, self.anneal_steps, self.strategy = start, anneal_steps, strategy
        # Optimizer steps taken so far, read from the owner (the SWA object keeps the one count and restores it).
        self.steps_done = steps_done
        self.handle = self.optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.apply(self.steps_done(), before_step=True)

    def apply(self, step: int, before_step: bool = False) -> None:
        """Sets the rate of optimizer step `step` once the SWA phase has begun; before it, notes the rate used."""
        for group, target in zip(self.optimizer.param_groups, self.targets):
            if step < self.start:
                if before_step:
                    group[LAST_USED] = _value(group["lr"])
                continue
            if ANNEAL_FROM not in group:
                group[ANNEAL_FROM] = group.get(LAST_USED, _value(group["lr"]))
            rate = swa_phase_lr(step, self.start, self.anneal_steps, self.strategy, group[ANNEAL_FROM], target)
            if isinstance(group["lr"], torch.Tensor):  # (as torch's schedulers do: the tensor is written in place)
                group["lr"].fill_(rate)
            else:
                group["lr"] = rate

    def remove(self) -> None:
        self.handle.remove()


def with_swa_phase(pre_swa: Sequence[float], start: Optional[int], anneal_steps: int, strategy: str,
                   swa_lr: Optional[float]) -> list[float]:
    """A whole run's rate per optimizer step: the pre-SWA schedule's `pre_swa`, then the SWA phase (for plots)."""
    if start is None or swa_lr is None:
        return list(pre_swa)
    from_lr = pre_swa[start - 1] if start > 0 else pre_swa[0]
    return list(pre_swa[:start]) + [swa_phase_lr(s, start, anneal_steps, strategy, from_lr, swa_lr)
                                    for s in range(start, len(pre_swa))]
