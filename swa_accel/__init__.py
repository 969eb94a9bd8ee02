"""swa_accel: Stochastic Weight Averaging under Hugging Face Accelerate.

The core, importable on its own (it loads torch and accelerate, never transformers, datasets, evaluate, yaml or
tqdm):

- `SWA` (swa.py): the whole average in any accelerate loop, as one object with one `state_dict`;
- `SWAArguments` (arguments.py): its settings; `timeline` (the plan in optimizer steps); `swa_lr` (the SWA phase's
  LR, as torch's SWALR); `averaging` (the fp32 average); `placement` (where it lives: the main process, or
  `sharded` for FSDP2); `batchnorm` (exact BN recompute across ranks); `candidates` (scored averages and the
  choice); `StoreReader` (store_reader.py: any average from a snapshot store's files); `hf_trainer.add_swa` (for `transformers.Trainer`; it imports transformers when imported itself).

The recipes' runner (`swa_accel.runner`: loop, task, config, console, outputs, checkpointing, launch, cli, xla,
...) is a client of the core; the core never imports it.
"""

from .arguments import SWAArguments
from .averaging import WeightAverager
from .batchnorm import recompute_bn
from .errors import ConfigError
from .placement import MainProcessPlacement, Placement
from .sharded import ShardedPlacement
from .store_reader import StoreReader
from .swa import SWA
from .swa_lr import SWALRPhase
from .timeline import TrainingPlan, plan_run

__all__ = [
    "ConfigError", "MainProcessPlacement", "Placement", "SWA", "SWALRPhase", "SWAArguments", "ShardedPlacement",
    "StoreReader", "TrainingPlan", "WeightAverager", "plan_run", "recompute_bn",
]
