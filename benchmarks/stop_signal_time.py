"""Seconds from a stop signal to the exit of a default-job run, mid-run, with its checkpoint saved in between.

    python benchmarks/stop_signal_time.py

Runs recipes/vision/configs/digits_small_cnn.yaml (logging_steps 10), waits for its first evaluation and half a
second more, then signals: SIGTERM and SIGUSR1 to a 1-process run; SIGTERM to a 2-process `accelerate launch`
(its elastic agent passes it on) and to that launch's whole process group (as SLURM does). Prints the exit status,
the seconds, and the run's own stop line.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stop_once(processes: int, sent: signal.Signals, target: str) -> str:
    out = Path(tempfile.gettempdir()) / f"stop_signal_time_{processes}_{target}"
    shutil.rmtree(out, ignore_errors=True)
    recipe = ["recipes/vision/train.py", "--config", "recipes/vision/configs/digits_small_cnn.yaml", "--output_dir",
              str(out), "--logging_steps", "10", "--plot", "false"]
    if processes == 1:
        command = [sys.executable, *recipe]
    else:
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                   "accelerate_configs/cpu_2proc.yaml", "--main_process_port", "29691", *recipe]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    while not (out / "metrics.jsonl").exists():
        time.sleep(0.02)
    time.sleep(0.5)  # mid-epoch
    start = time.monotonic()
    if target == "group":
        os.killpg(run.pid, sent)
    else:
        run.send_signal(sent)
    _, stderr = run.communicate()
    seconds = time.monotonic() - start
    stop_line = next((line for line in stderr.splitlines() if line.startswith("stopped by")), stderr[-300:])
    return f"{processes} process(es), {sent.name} to the {target}: status {run.returncode} after {seconds:.2f} s; " \
           f"{stop_line}"


def main() -> None:
    for processes, sent, target in ((1, signal.SIGTERM, "process"), (1, signal.SIGUSR1, "process"),
                                    (2, signal.SIGTERM, "launcher"), (2, signal.SIGTERM, "group")):
        print(stop_once(processes, sent, target), flush=True)


if __name__ == "__main__":
    main()
