"""The recipes' runner: a client of the swa_accel core.

`train`/`RecipeTrainer` (loop.py) run a recipe's `Task` (task.py) with the configs of `config.py` (YAML and
`--key value`, through transformers' HfArgumentParser), the pre-SWA schedule (`lr_schedule`), checkpoints
(`checkpointing`, `preemption`), the console and the run's records (`console`, `outputs`, `phases`), the launch
(`launch`, `launcher_request`, `quiet_launch`), the command line (`cli`) and what torch_xla needs (`xla`).
"""

from .config import RunArguments, parse_config
from .launch import make_accelerator
from .loop import RecipeTrainer, train
from .task import Task

__all__ = ["RecipeTrainer", "RunArguments", "Task", "make_accelerator", "parse_config", "train"]
