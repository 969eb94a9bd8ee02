"""swa_accel: Stochastic Weight Averaging under Hugging Face Accelerate.

Modules, one concern each: `config` (typed YAML + CLI configs), `schedule` (LR and SWA timeline), `swa` (the
average during a run: updates, placement, candidates, the averaged model with BN recomputed, export),
`averaging` (the fp32 average), `batchnorm` (exact BN recompute across ranks), `batches` (batch layouts, and
datasets that build their own batches), `candidates` (scored averages and the choice), `evaluation` (sharded
metrics), `checkpointing`, `loop` (the shared training loop), `outputs`, `launch`, `xla` (what torch_xla needs
from the loop, and its compile and transfer counters).
"""

from .averaging import MainProcessPlacement, WeightAverager
from .batchnorm import recompute_bn
from .config import ConfigError, SWAArguments, RunArguments, parse_config
from .launch import make_accelerator
from .loop import Task, RecipeTrainer, train
from .sharded import ShardedPlacement
from .swa import SWA

__all__ = [
    "ConfigError", "MainProcessPlacement", "SWA", "SWAArguments", "ShardedPlacement", "Task", "RecipeTrainer",
    "RunArguments",
    "WeightAverager",
    "make_accelerator", "parse_config", "recompute_bn", "train",
]
