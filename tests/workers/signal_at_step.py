"""Runs the vision recipe in this process and sends this process SIGTERM at optimizer step K, on every rank or on
the listed ranks only (the others learn of it at the next logging step): right after the step, or with WHEN
`checkpoint` in the middle of that step's checkpoint write (between creating its folder and saving into it).

Usage: python tests/workers/signal_at_step.py K RANKS WHEN [recipe args ...]   (RANKS: all, or e.g. 1;
WHEN: step or checkpoint)
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate import Accelerator  # noqa: E402

from recipes.vision import train as vision_recipe  # noqa: E402
from swa_accel.runner.cli import run_recipe  # noqa: E402
from swa_accel.runner.loop import RecipeTrainer  # noqa: E402


def main():
    step, ranks, when, recipe_args = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]

    def signal_here(accelerator, global_step):
        rank = str(accelerator.process_index)
        if global_step == step and (ranks == "all" or rank in ranks.split(",")):
            os.kill(os.getpid(), signal.SIGTERM)  # as the cluster would: the handler only notes it

    if when == "step":
        original_step = RecipeTrainer.after_optimizer_step

        def signalled_step(self):
            original_step(self)
            signal_here(self.accelerator, self.state.global_step)

        RecipeTrainer.after_optimizer_step = signalled_step
    else:
        original_save = Accelerator.save_state  # called inside save_checkpoint, into its temporary folder

        def signalled_save(self, output_dir=None, **kwargs):
            signal_here(self, int(Path(output_dir).name.split("_")[1].split(".")[0]))
            return original_save(self, output_dir, **kwargs)

        Accelerator.save_state = signalled_save
    run_recipe(vision_recipe.setup, recipe_args)


if __name__ == "__main__":
    main()
