"""The loop's one read of training values: the loss since the last read, and whether anything has diverged."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from .checkpointing import list_checkpoints
from ..sharded import local_shard


class TrainingDiverged(RuntimeError):
    """A non-finite loss or non-finite weights: the run stops before it saves or averages anything more."""


class Health:
    """Sums the training loss on the device (no step waits for it) and reads it, with the divergence checks, in
    one collective.

    Args:
        accelerator: the run's Accelerator.
        checkpoint_root: where the run's checkpoints are (named in the divergence line).
        bound: the largest weight magnitude that is not a divergence (`divergence_bound`).
    """

    def __init__(self, accelerator, checkpoint_root: Path, bound: float = math.inf) -> None:
        self.accelerator, self.checkpoint_root, self.bound = accelerator, checkpoint_root, bound
        self.stop_agreed = False
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.loss_count = 0

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach().float()
        self.loss_count += 1

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.loss_count = 0

    def read(self, step: int, model: Optional[torch.nn.Module] = None, averaging_flag: Optional[torch.Tensor] = None,
             advice: str = "", stop: float = 0.0) -> float:
        """The mean training loss since the last reset (over ranks); raises `TrainingDiverged` if anything is not
        finite: the loss, the averager's non-finite flag (`averaging_flag`) and, given `model`, its weights and
        buffers (read before anything is saved from them; a weight past `bound` counts as diverged).

        `stop` is this rank's stop-signal flag (preemption.py); `stop_agreed` then says whether any rank got one.
        `advice` ends the divergence line: the setting most likely at fault.
        """
        acc = self.accelerator
        zero = torch.zeros((), device=acc.device)
        skipped = zero if averaging_flag is None else averaging_flag.to(acc.device)
        bad_weights = bad_buffers = zero
        if model is not None:
            bad_weights, bad_buffers = self._blown_up(model)
        # The loss sum, not a mean: a step count in the graph would make XLA compile one graph per count.
        flags = torch.stack([self.loss_sum, skipped.float(), bad_weights.float(), bad_buffers.float(),
                             torch.full((), stop, device=acc.device)])
        values = acc.reduce(flags, reduction="sum").tolist()
        self.stop_agreed = values[4] > 0
        mean_loss = values[0] / (max(self.loss_count, 1) * acc.num_processes)  # (every rank counts the same steps)
        problems = [what for what, bad in (
            (f"the training loss is {mean_loss}", not math.isfinite(mean_loss)),
            ("an averaging update met non-finite weights and skipped them", values[1] > 0),
            (f"the weights are not finite or exceed divergence_bound ({self.bound:g})", values[2] > 0),
            ("a BatchNorm statistic or other buffer is not finite", values[3] > 0)) if bad]
        if problems:
            self.refuse(step, "; ".join(problems), advice)
        return mean_loss

    def _blown_up(self, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights not finite or past the bound, floating buffers not finite), as device flags."""
        zero = torch.zeros((), dtype=torch.bool, device=self.accelerator.device)
        weights = [local_shard(p.detach()) for p in module.parameters()]
        buffers = [local_shard(b) for b in module.buffers() if b.is_floating_point()]
        bad_weights = bad_buffers = zero
        if weights:  # max-abs per tensor
            largest = torch.stack(torch._foreach_norm(weights, ord=math.inf)).float()
            bad_weights = ~(largest.isfinite() & (largest <= self.bound)).all()
        if buffers:
            bad_buffers = ~torch.stack(torch._foreach_norm(buffers, ord=math.inf)).float().isfinite().all()
        return bad_weights.to(zero.device), bad_buffers.to(zero.device)

    def check_average(self, module: Optional[torch.nn.Module], step: int, advice: str) -> None:
        """The averaged model after its BN recompute, before it is saved: the same bounds, on this rank's copy."""
        if module is None:
            return
        bad_weights, bad_buffers = (bool(flag) for flag in self._blown_up(module))
        problems = [what for what, bad in (
            (f"the averaged weights are not finite or exceed divergence_bound ({self.bound:g})", bad_weights),
            ("the averaged model's BatchNorm statistics are not finite after its recompute", bad_buffers)) if bad]
        if problems:
            self.refuse(step, "; ".join(problems), advice)

    def refuse(self, step: int, problems: str, advice: str) -> None:
        checkpoints = list_checkpoints(self.checkpoint_root)
        saved = (f"the last checkpoint, {checkpoints[-1]}, and the average are intact" if checkpoints
                 else "no checkpoint was saved yet, and the average is intact")
        raise TrainingDiverged(f"training: diverged by optimizer step {step} ({problems}); stopped before saving "
                               f"anything: {saved}; {advice}")
