"""Recipe entry point: parse and set up with one-line errors, then train."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

from .checkpointing import list_checkpoints
from .config import TRACEBACK_VARIABLE, ConfigError, first_line
from .launch import end_process
from .health import TrainingDiverged
from .loop import RecipeTrainer


def remove_if_empty(folder: Path) -> None:
    """Deletes a folder tree that holds no file (what a refused run created), and leaves any other alone."""
    if folder.is_dir() and not any(path.is_file() for path in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def run_recipe(setup: Callable[[list[str]], tuple], argv: Optional[list[str]] = None) -> dict:
    """Runs `setup(argv)` -> (task, training, swa, accelerator, config), then the training loop.

    Any configuration or data problem found before the first training step is printed as one
    `error: <field>: <what is wrong>` line and the process exits with status 1, the status `accelerate
    launch` (and so run.sh) gives any failed run, so that both ways agree. A run that diverges
    (non-finite loss or weights) stops with one `error: training: ...` line and status 1, having saved
    nothing after the divergence. With SWA_ACCEL_TRACEBACK=1 the configuration errors raise with their
    full traceback instead.
    """
    argv = sys.argv[1:] if argv is None else argv
    created = None  # the output folder this run would create, removed again if the run is refused while empty
    try:
        task, training, swa, accelerator, config = setup(argv)
        created = None if Path(training.output_dir).exists() else Path(training.output_dir)
        trainer = RecipeTrainer(task, training, swa, accelerator, config, argv)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        if created is not None and os.environ.get("RANK", "0") == "0":
            remove_if_empty(created)
        if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise  # the whole traceback, for debugging
        if os.environ.get("RANK", "0") == "0":  # every rank fails alike; one line is enough
            print(f"error: {first_line(error)}", file=sys.stderr)
        end_process(1)
    try:
        results = trainer.run()
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; what is saved stays as it is
        if trainer.accelerator.is_main_process:
            saved = list_checkpoints(trainer.checkpoint_root)
            where = f"the last checkpoint is {saved[-1]}" if saved else "no checkpoint was saved yet"
            print(f"interrupted at optimizer step {trainer.state.global_step}: {where}; continue with "
                  "--resume_from_checkpoint auto", file=sys.stderr, flush=True)
        end_process(130)
    except TrainingDiverged as error:
        trainer.accelerator.end_training()
        if trainer.accelerator.is_main_process:
            print(f"error: {error}", file=sys.stderr)
        end_process(1)
    # (a multi-process CPU run leaves here, past gloo's teardown; a stop signal's status too, checkpoint saved)
    end_process(trainer.exit_code, done=True)
    return results
