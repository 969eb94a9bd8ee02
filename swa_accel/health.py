"""The loop's one read of training values: the loss since the last read, and whether anything has diverged."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from .checkpointing import list_checkpoints
from .sharded import local_shard


class TrainingDiverged(RuntimeError):
    """A non-finite loss or non-finite weights: the run stops before it saves or averages anything more."""


class Health:
    """Sums the training loss on the device (no step waits for it) and reads it, with the divergence checks, in
    one collective.

    Args:
        accelerator: the run's Accelerator.
        checkpoint_root: where the run's checkpoints are (named in the divergence line).
    """

    def __init__(self, accelerator, checkpoint_root: Path) -> None:
        self.accelerator, self.checkpoint_root = accelerator, checkpoint_root
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.loss_count = 0

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach().float()
        self.loss_count += 1

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.loss_count = 0

    def read(self, step: int, model: Optional[torch.nn.Module] = None,
             averaging_flag: Optional[torch.Tensor] = None) -> float:
        """The mean training loss since the last reset (over ranks); raises `TrainingDiverged` if anything is not
        finite: the loss, the averager's non-finite flag (`averaging_flag`) and, given `model`, a norm of its
        weights (read before anything is saved from them)."""
        acc = self.accelerator
        zero = torch.zeros((), device=acc.device)
        skipped = zero if averaging_flag is None else averaging_flag.to(acc.device)
        bad_weights = zero
        if model is not None:
            norms = torch._foreach_norm([local_shard(p.detach()) for p in model.parameters()])
            bad_weights = ~torch.stack(norms).float().sum().isfinite()
        # The loss sum, not a mean: a step count in the graph would make XLA compile one graph per count.
        values = acc.reduce(torch.stack([self.loss_sum, skipped.float(), bad_weights.float()]),
                            reduction="sum").tolist()
        mean_loss = values[0] / (max(self.loss_count, 1) * acc.num_processes)  # (every rank counts the same steps)
        problems = [what for what, bad in (
            (f"the training loss is {mean_loss}", not math.isfinite(mean_loss)),
            ("an averaging update met non-finite weights and skipped them", values[1] > 0),
            ("the weights are not finite", values[2] > 0)) if bad]
        if problems:
            checkpoints = list_checkpoints(self.checkpoint_root)
            saved = (f"the last checkpoint, {checkpoints[-1]}, and the average are intact" if checkpoints
                     else "no checkpoint was saved yet, and the average is intact")
            raise TrainingDiverged(
                f"training: diverged by optimizer step {step} ({'; '.join(problems)}); stopped before saving "
                f"anything: {saved}; resume with a lower learning_rate or with max_grad_norm set")
        return mean_loss
