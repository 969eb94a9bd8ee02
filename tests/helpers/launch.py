"""Runs a recipe or script through the real `accelerate launch`, with 1 or 2 CPU processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {1: ROOT / "accelerate_configs" / "cpu.yaml", 2: ROOT / "accelerate_configs" / "cpu_2proc.yaml"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: What `accelerate launch --config_file accelerate_configs/cpu.yaml` puts into its one process's environment
#: (accelerate 1.15; `tests/test_run_sh.py` checks it against the real launcher). A one-process launch with that
#: config runs the script directly in this environment: the launcher's own start-up (about 5.5 s of CPU, most of it
#: importing torch) is then saved, and the script sees what it would see under the launcher.
ONE_CPU_PROCESS_ENV = {
    "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no",
    "ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_DYNAMO_MODE": "default", "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False",
    "ACCELERATE_DYNAMO_USE_DYNAMIC": "False", "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "False",
}  # (OMP_NUM_THREADS: the launcher keeps the 1 that `launch` sets)


def launch(script: str | Path, args: list[str], num_processes: int = 1, timeout: int = 300,
           check: bool = True, launcher_args: tuple[str, ...] = (), config_file: Path | None = None,
           env: dict | None = None, real_launcher: bool = False) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file <cpu config> script args`, from the repo root.

    Each 2-process launch gets its own rendezvous port so that launches never collide. `config_file` replaces
    the CPU config, `env` adds to the environment. A one-process launch with the CPU config and no launcher
    options runs the script in the environment the launcher gives it (`ONE_CPU_PROCESS_ENV`), unless
    `real_launcher`; everything else goes through the real `accelerate launch`.
    """
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TQDM_DISABLE": "1"}
    if num_processes == 1 and not launcher_args and config_file is None and not real_launcher:
        command = [sys.executable, str(script), *args]
        base.update(ONE_CPU_PROCESS_ENV)
    else:
        accelerate = Path(sys.executable).parent / "accelerate"
        command = [str(accelerate), "launch", "--config_file", str(config_file or CONFIGS[num_processes])]
        if num_processes > 1:
            command += ["--main_process_port", str(free_port())]
        command += [*launcher_args, str(script), *args]
    env = {**base, **(env or {})}
    result = run_in_own_group(command, env, timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"launch failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def run_in_own_group(command: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """`subprocess.run` in a process group of its own, killed whole on a timeout: a hung rank of a 2-process launch
    is the launcher's child, and `subprocess.run` alone would kill only the launcher and leave the ranks running."""
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_python(script: str | Path, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Plain `python script args` (one process, no launcher), for fast error-path checks."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
