"""swa_accel: Stochastic Weight Averaging under Hugging Face Accelerate.

`SWA` (swa.py) is the whole average in any accelerate loop; `hf_trainer.add_swa` puts it in a
`transformers.Trainer`; `train`/`RecipeTrainer` (loop.py) is the recipes' loop around it.

Modules, one concern each: `config` (typed YAML + CLI configs), `schedule` (the run's timeline and pre-SWA LR),
`swa_lr` (the SWA phase's LR, as torch's SWALR), `swa` (the SWA controller), `averaging` (the fp32 average and its
main-process placement), `sharded` (the FSDP2 placement), `batchnorm` (exact BN recompute across ranks), `batches`
(batch layouts), `candidates` (scored averages and the choice), `evaluation` (sharded metrics), `checkpointing`,
`health` (the loss read and divergence checks), `phases` (timings), `task` (a recipe's task and its loaders),
`loop`, `outputs`, `launch`, `xla` (what torch_xla needs, and its counters), `hf_trainer`.
"""

from .averaging import WeightAverager
from .placement import MainProcessPlacement
from .batchnorm import recompute_bn
from .config import ConfigError, RunArguments, SWAArguments, parse_config
from .launch import make_accelerator
from .loop import RecipeTrainer, train
from .sharded import ShardedPlacement
from .swa import SWA
from .task import Task

__all__ = [
    "ConfigError", "MainProcessPlacement", "RecipeTrainer", "RunArguments", "SWA", "SWAArguments",
    "ShardedPlacement", "Task", "WeightAverager", "make_accelerator", "parse_config", "recompute_bn", "train",
]
