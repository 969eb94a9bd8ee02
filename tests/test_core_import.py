"""The averaging core is a library: `import swa_accel` costs torch alone, building `SWA` in a user's accelerate
loop loads nothing of transformers, datasets or evaluate, and no core module imports the recipes' runner."""

import ast
import json
import subprocess
import sys

from tests.helpers.launch import ROOT

HEAVY = ("transformers", "datasets", "evaluate", "yaml", "tqdm", "accelerate")

PROBE = r"""
import json, sys
import torch
baseline = set(sys.modules)
import swa_accel
after_import = set(sys.modules) - baseline
import accelerate
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
with_accelerate = set(sys.modules)
accelerator = Accelerator(cpu=True)
model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loader = DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=4)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
swa = swa_accel.SWA(accelerator, model, optimizer, loader, swa_accel.SWAArguments(swa_lr=0.05), num_epochs=4,
                    verbose=False)
after_build = set(sys.modules) - with_accelerate
print(json.dumps({"import": sorted(after_import), "build": sorted(after_build)}))
"""


def top_level(names):
    return {name.split(".")[0] for name in names}


def test_import_and_building_swa_load_no_heavy_library_and_no_runner():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=True)
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert not top_level(loaded["import"]) & set(HEAVY), loaded["import"]
    assert "swa_accel.sharded" in loaded["import"]  # (the probe sees the core's own modules load)
    # accelerate itself loads yaml and tqdm, before SWA is built; building it adds none of the heavy libraries.
    assert not top_level(loaded["build"]) & {"transformers", "datasets", "evaluate"}, loaded["build"]
    assert not [name for name in loaded["import"] + loaded["build"] if name.startswith("swa_accel.runner")]


def test_no_core_module_imports_the_runner():
    """The core's modules sit in swa_accel/, the runner's in swa_accel/runner/; arrows go one way only."""
    core = sorted((ROOT / "swa_accel").glob("*.py"))
    assert len(core) > 10
    for path in core:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any("runner" in name.split(".") for name in names), f"{path.name} imports {names}"
            assert not any(name.split(".")[0] in ("transformers", "datasets", "evaluate", "yaml", "tqdm")
                           for name in names) or path.name == "hf_trainer.py", f"{path.name} imports {names}"
