"""Cluster behaviour on the CPU (issue 15): stop signals, `--resume_from_checkpoint auto`, restarts after a SIGKILL,
two "machines" on localhost, and recovery from a divergence. Every resumed run ends bit-identical to the run that
was never interrupted. The smoke config: 256 digits, 8 optimizer steps per epoch at a global batch of 32, 24 in all,
averaging every epoch from step 8."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from swa_accel.runner.outputs import read_metrics
from tests.helpers.final_weights import assert_same_final_weights
from tests.helpers.launch import ROOT, free_port, launch, run_python

SCRIPT = ROOT / "recipes" / "vision" / "train.py"
SMOKE = ROOT / "recipes" / "vision" / "configs" / "smoke.yaml"
WORKERS = ROOT / "tests" / "workers"
MULTI_NODE = ROOT / "accelerate_configs" / "multi_node.yaml"


def args(out, processes=1, *extra):
    batch = str(32 // processes)  # the same global batch, so the same steps, LR and averaging
    return ["--config", str(SMOKE), "--output_dir", str(out), "--per_device_train_batch_size", batch,
            "--checkpointing_steps", "5", "--logging_steps", "2", "--plot", "false", *extra]


def assert_same_run(ours: Path, reference: Path) -> None:
    assert_same_final_weights(ours, reference)
    assert read_metrics(ours / "metrics.jsonl") == read_metrics(reference / "metrics.jsonl")


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs on 1 and on 2 processes."""
    root = tmp_path_factory.mktemp("references")
    run_python(SCRIPT, args(root / "one"))
    launch(SCRIPT, args(root / "two", 2), num_processes=2)
    assert (root / "one" / "final").is_dir() and (root / "two" / "final").is_dir()
    return {1: root / "one", 2: root / "two"}


def test_sigterm_mid_epoch_saves_the_step_every_rank_finished_and_auto_resumes_bit_identically(references, tmp_path):
    out = tmp_path / "run"
    # SIGTERM in the middle of step 5's checkpoint write: that checkpoint completes, the run goes on to the
    # logging step at 6 (mid-epoch), saves it, and stops.
    stopped = run_python(WORKERS / "signal_at_step.py", ["5", "all", "checkpoint",
                                                         *args(out, 1, "--resume_from_checkpoint", "auto")])
    assert stopped.returncode == 143
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"stopped by SIGTERM after optimizer step 6: saved {out / 'checkpoints' / 'step_00000006'}; continue with "
        "--resume_from_checkpoint auto (or latest)")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000005", "step_00000006"]
    assert not (out / "final").exists()
    resumed = run_python(SCRIPT, args(out, 1, "--resume_from_checkpoint", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(out, references[1])
    # The console says what happens, one line each.
    lines = resumed.stdout.splitlines()
    assert lines[:3] == [
        f"resumed from {out / 'checkpoints' / 'step_00000006'} at optimizer step 6 (epoch 0)",
        "plan: 24 optimizer steps (3 epochs of 8); swa averaging from step 8 (epoch 1), at each epoch end: 2 "
        "updates at swa_lr 0.05",
        lines[2]]
    assert lines[2].startswith("epoch 1 (step 8): test accuracy base ") and "; nll base " in lines[2]
    assert any(line.startswith("epoch 2 (step 16): test accuracy base ") and ", swa " in line for line in lines)
    again = run_python(SCRIPT, args(out, 1, "--resume_from_checkpoint", "auto"))  # a requeue after the end
    assert again.returncode == 0 and "finished already" in again.stdout


def test_a_signal_on_one_rank_of_two_stops_both_after_the_same_step(references, tmp_path):
    out = tmp_path / "run"
    # SIGTERM to rank 1 only, right after step 9 (epoch 2): both stop after the logging step at 10.
    worker_args = ["9", "1", "step", *args(out, 2, "--resume_from_checkpoint", "auto")]
    stopped = launch(WORKERS / "signal_at_step.py", worker_args, num_processes=2, check=False)
    assert stopped.returncode != 0  # (the launcher reports its workers' status 143 as a failure)
    assert (f"stopped by a stop signal on another rank after optimizer step 10: saved "
            f"{out / 'checkpoints' / 'step_00000010'}") in stopped.stderr
    launch(SCRIPT, args(out, 2, "--resume_from_checkpoint", "auto"), num_processes=2)
    assert_same_run(out, references[2])


def test_sigterm_from_outside_stops_within_seconds_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, str(SCRIPT), *args(out, 1, "--num_train_epochs", "30", "--logging_steps", "1")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:  # training is under way
        time.sleep(0.05)
    sent = time.monotonic()
    process.send_signal(signal.SIGUSR1)  # the default stop_signal, as SLURM's --signal=USR1@120 sends
    _, stderr = process.communicate(timeout=120)
    seconds = time.monotonic() - sent
    assert process.returncode == 143, stderr[-2000:]
    assert seconds < 20
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("stopped by SIGUSR1 after optimizer step ")
    step = int(line.split("optimizer step ")[1].split(":")[0])
    assert (out / "checkpoints" / f"step_{step:08d}").is_dir() and 8 <= step < 240
    resumed = run_python(SCRIPT, args(out, 1, "--num_train_epochs", "30", "--resume_from_checkpoint", "auto",
                                      "--stop_after_step", str(step + 1)))
    assert resumed.returncode == 0 and (out / "checkpoints" / f"step_{step + 1:08d}").is_dir()


def test_a_rank_killed_mid_run_restarts_the_group_which_resumes_and_ends_bit_identical(references, tmp_path):
    out = tmp_path / "run"
    # Rank 1 dies by SIGKILL after step 13 (checkpoints at 5 and 10); torchrun restarts both, `auto` resumes at 10.
    result = launch(WORKERS / "kill_at_step.py", ["13", "1", *args(out, 2, "--resume_from_checkpoint", "auto")],
                    num_processes=2, launcher_args=("--max_restarts", "1"))
    assert "failed (exitcode: -9) local_rank: 1" in result.stderr  # the crash, seen by the elastic agent
    assert_same_run(out, references[2])


def launch_two_machines(script_args: list[str]) -> None:
    """One `accelerate launch` per "machine" (1 process each), both on localhost, as a cluster starts them."""
    port = str(free_port())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    accelerate = Path(sys.executable).parent / "accelerate"
    machines = [subprocess.Popen(
        [str(accelerate), "launch", "--config_file", str(MULTI_NODE), "--num_machines", "2", "--num_processes", "2",
         "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
         "--mixed_precision", "no", str(SCRIPT), *script_args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [machine.communicate(timeout=300) for machine in machines]
    for machine, (_, stderr) in zip(machines, outputs):
        assert machine.returncode == 0, stderr[-3000:]


def test_two_machines_on_localhost_train_resume_and_write_as_two_processes_on_one(references, tmp_path):
    out = tmp_path / "run"
    launch_two_machines(args(out, 2, "--stop_after_step", "12"))
    assert (out / "checkpoints" / "step_00000012").is_dir() and not (out / "final").exists()
    launch_two_machines(args(out, 2, "--resume_from_checkpoint", "auto"))
    # Bit-identical to 2 processes on one machine: the same gradients, the same exact cross-rank BN statistics,
    # one writer of every output (metrics.jsonl holds each record once).
    assert_same_run(out, references[2])
    # And the LR and the averaging of 1 process at the same global batch, step for step.
    ours, one = read_metrics(out / "metrics.jsonl"), read_metrics(references[1] / "metrics.jsonl")
    assert [(r["step"], r["model"], r["lr"], r["n_averaged"]) for r in ours] == [
        (r["step"], r["model"], r["lr"], r["n_averaged"]) for r in one]


def test_after_a_divergence_the_last_good_checkpoint_resumes_with_a_sane_swa_lr(references, tmp_path):
    out = tmp_path / "run"
    failed = run_python(SCRIPT, args(out, 1, "--swa_lr", "1e8"))
    assert failed.returncode == 1
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith("error: training: diverged by optimizer step 10 ") and line.endswith(
        "resume from the last checkpoint with a lower swa_lr (now 1e+08)")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000005"]  # nothing blown up saved
    # From the last good checkpoint (before the SWA phase), with the sane swa_lr: the run that used it throughout.
    resumed = run_python(SCRIPT, args(out, 1, "--swa_lr", "0.05", "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_final_weights(out, references[1])


def test_auto_refuses_a_finished_run_without_checkpoints_clears_an_unfinished_save_and_rates_follow_the_config(
        tmp_path):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    refused = run_python(SCRIPT, args(out, 1, "--resume_from_checkpoint", "auto"))
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1] == (
        f"error: resume_from_checkpoint: auto found no checkpoint in '{out}', but final/ holds a finished run's "
        "models; choose another output_dir, or pass --overwrite_output_dir true")
    fresh = tmp_path / "killed_in_first_save"
    (fresh / "checkpoints" / "step_00000005.tmp").mkdir(parents=True)  # a save that never completed
    started = run_python(SCRIPT, args(fresh, 1, "--resume_from_checkpoint", "auto", "--stop_after_step", "2",
                                      "--checkpointing_steps", "2"))
    assert started.returncode == 0 and (fresh / "checkpoints" / "step_00000002").is_dir()
    # Resumed with another learning_rate: each rate comes from this config, not from the checkpoint's optimizer.
    run_python(SCRIPT, args(fresh, 1, "--stop_after_step", "3", "--checkpointing_steps", "1", "--learning_rate",
                            "0.07", "--resume_from_checkpoint", "auto"))
    saved = torch.load(fresh / "checkpoints" / "step_00000003" / "optimizer.bin", weights_only=True)
    assert [g["lr"] for g in saved["param_groups"]] == [0.07] * len(saved["param_groups"])

