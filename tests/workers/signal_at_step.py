"""Runs the vision recipe in this process and sends this process SIGTERM right after optimizer step K, on every
rank or on the listed ranks only (the others learn of it at the next logging step).

Usage: python tests/workers/signal_at_step.py K RANKS [recipe args ...]   (RANKS: all, or e.g. 1)
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.vision import train as vision_recipe  # noqa: E402
from swa_accel.cli import run_recipe  # noqa: E402
from swa_accel.loop import RecipeTrainer  # noqa: E402


def main():
    step, ranks, recipe_args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    original = RecipeTrainer.after_optimizer_step

    def signalled_step(self):
        original(self)
        rank = str(self.accelerator.process_index)
        if self.state.global_step == step and (ranks == "all" or rank in ranks.split(",")):
            os.kill(os.getpid(), signal.SIGTERM)  # as the cluster would: the handler only notes it

    RecipeTrainer.after_optimizer_step = signalled_step
    run_recipe(vision_recipe.setup, recipe_args)


if __name__ == "__main__":
    main()
