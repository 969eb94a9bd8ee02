"""Runs a recipe through accelerate's TPU launcher on XLA's CPU device: the path a TPU user takes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.helpers.launch import ROOT, launch

TPU_CONFIG = ROOT / "accelerate_configs" / "tpu.yaml"


def xla_launch(script: str | Path, args: list[str], env: dict | None = None, check: bool = True,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_configs/tpu.yaml --num_processes 1 script args`.

    The launcher imports the script as a module and calls its `main()` under `xmp.spawn`; one process, since
    XLA's CPU device is one device (see docs/tpu.md).
    """
    return launch(script, args, timeout=timeout, check=check, launcher_args=("--num_processes", "1"),
                  config_file=TPU_CONFIG, env={"PJRT_DEVICE": "CPU", **(env or {})})


def counters(out: Path) -> dict:
    return json.loads((out / "final" / "xla_counters.json").read_text())
