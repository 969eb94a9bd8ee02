"""Recipe entry point: parse and set up with one-line errors, then train."""

from __future__ import annotations

import sys
from typing import Callable, Optional

from .config import ConfigError, first_line
from .loop import Trainer


def run_recipe(setup: Callable[[list[str]], tuple], argv: Optional[list[str]] = None) -> dict:
    """Runs `setup(argv)` -> (task, training, swa, accelerator, config), then the training loop.

    Any configuration or data problem found before the first training step is printed as one
    `error: <field>: <what is wrong>` line and the process exits with status 2.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        task, training, swa, accelerator, config = setup(argv)
        trainer = Trainer(task, training, swa, accelerator, config, argv)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"error: {first_line(error)}", file=sys.stderr)
        sys.exit(2)
    return trainer.run()
