"""A user's loop with a plain `Accelerator()` (or `Accelerator(cpu=True)` with the argument `cpu`), for launches on
a machine without GPUs: under a 2-process launch a plain one makes each process a run of its own, and the SWA object
must refuse to average alone on all the data."""

import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from swa_accel import SWA, ConfigError, SWAArguments

accelerator = Accelerator(cpu=sys.argv[1:] == ["cpu"])
model = torch.nn.Linear(2, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loader = DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=4)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
try:
    SWA(accelerator, model, optimizer, loader, SWAArguments(), num_epochs=2)
except ConfigError as error:
    print(f"error: {error}", flush=True)
    sys.exit(2)
print(f"built with {accelerator.num_processes} process(es)", flush=True)
