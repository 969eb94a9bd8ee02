"""Runs the vision recipe in this process; on its first attempt, rank RANK kills itself with SIGKILL right after
optimizer step K (a crash no handler sees). Under `--max_restarts` the elastic agent restarts the group.

Usage: python tests/workers/kill_at_step.py K RANK [recipe args ...]
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.vision import train as vision_recipe  # noqa: E402
from swa_accel.runner.cli import run_recipe  # noqa: E402
from swa_accel.runner.loop import RecipeTrainer  # noqa: E402


def main():
    step, rank, recipe_args = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    original = RecipeTrainer.after_optimizer_step

    def crashing_step(self):
        original(self)
        if first_attempt and self.state.global_step == step and self.accelerator.process_index == rank:
            os.kill(os.getpid(), signal.SIGKILL)

    RecipeTrainer.after_optimizer_step = crashing_step
    run_recipe(vision_recipe.setup, recipe_args)


if __name__ == "__main__":
    main()
