"""Runs a recipe through accelerate's TPU launcher on XLA's CPU device: the path a TPU user takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.launch import ROOT

TPU_CONFIG = ROOT / "accelerate_configs" / "tpu.yaml"


def xla_launch(script: str | Path, args: list[str], env: dict | None = None, check: bool = True,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_configs/tpu.yaml --num_processes 1 script args`.

    The launcher imports the script as a module and calls its `main()` under `xmp.spawn`; one process, since
    XLA's CPU device is one device (see the README's TPU section).
    """
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--config_file", str(TPU_CONFIG), "--num_processes", "1", str(script),
               *args]
    environ = {**os.environ, "PJRT_DEVICE": "CPU", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TQDM_DISABLE": "1", **(env or {})}
    result = subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"launch failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def counters(out: Path) -> dict:
    return json.loads((out / "final" / "xla_counters.json").read_text())
