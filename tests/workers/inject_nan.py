"""Runs the vision recipe in this process and turns the weights to NaN right after optimizer step K.

Usage: python tests/workers/inject_nan.py REPORT.json K [recipe args ...]
Writes the exit status, the average right after step K and at the stop, and n_averaged.
"""

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.vision import train as vision_recipe  # noqa: E402
from swa_accel.runner.cli import run_recipe  # noqa: E402
from swa_accel.runner.loop import RecipeTrainer  # noqa: E402


def main():
    report_path, inject_after, recipe_args = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    seen = {}
    original = RecipeTrainer.after_optimizer_step

    def diverging_step(self):
        original(self)  # schedule, and average the (still finite) weights of this step
        if self.state.global_step == inject_after:
            seen["trainer"] = self
            seen["average_before"] = {k: v.clone() for k, v in self.averaging.averager.averaged.items()}
            with torch.no_grad():
                next(self.model.parameters()).fill_(math.nan)  # as a diverging optimizer step would leave them

    RecipeTrainer.after_optimizer_step = diverging_step
    code = 0
    try:
        run_recipe(vision_recipe.setup, recipe_args)
    except SystemExit as stop:
        code = stop.code
    trainer = seen["trainer"]
    after = trainer.averaging.averager.averaged
    report = {
        "exit_code": code,
        "stopped_at_step": trainer.state.global_step,
        "n_averaged": trainer.averaging.n_averaged,
        "average_finite": all(bool(v.isfinite().all()) for v in after.values()),
        "average_unchanged_since_injection": all(torch.equal(after[k], v) for k, v in seen["average_before"].items()),
    }
    report_path.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
