"""What a run tells its user on the console, one line per event: the plan, warnings before a wasted run, a resume,
each evaluation's headline metric, a requested stop, an interrupt. Printed by the main process only."""

from __future__ import annotations

import math
from typing import Optional

from tqdm.auto import tqdm

from ..arguments import SWAArguments
from ..plan_report import averaging_updates, plan_line, plan_warnings  # noqa: F401  (the recipes' console lines)
from ..timeline import TrainingPlan


def say(accelerator, line: str) -> None:
    """One line on stdout from the main process, above the progress bar if one is drawn."""
    if accelerator.is_main_process:
        tqdm.write(line)


def evaluation_line(results: dict, step: int, epoch: int, split: Optional[str], metric: str) -> str:
    """`epoch 3 (step 24): validation accuracy base 0.5123, swa 0.6010, nll base 1.43, swa 1.21`."""
    split = split if split is not None and split in results.get("base", {}) else next(iter(results["base"]))
    parts = []
    for name in dict.fromkeys([metric, "nll"]):
        values = [f"{model} {by_split[split][name]:.4f}" for model, by_split in results.items()
                  if name in by_split.get(split, {}) and not math.isnan(by_split[split][name])]
        if values:
            parts.append(f"{name} " + ", ".join(values))
    return f"epoch {epoch} (step {step}): {split} " + "; ".join(parts)


def divergence_advice(plan: TrainingPlan, training, swa: Optional[SWAArguments], step: int) -> str:
    """The end of a divergence line: the rate of the phase that diverged (`swa` None: nothing is averaged)."""
    if swa is not None and swa.swa_lr is not None and plan.averaging_active(step):
        rates = ",".join(f"{rate:g}" for rate in swa.swa_lr_values())
        return f"resume from the last checkpoint with a lower swa_lr (now {rates})"
    return f"resume with a lower learning_rate (now {training.learning_rate:g}) or with max_grad_norm set"
