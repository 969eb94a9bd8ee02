"""The training loop's hot path: no host-device sync between logging steps, and a compiled model end to end."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from swa_accel.runner.outputs import read_metrics
from tests.helpers.final_weights import assert_same_final_weights
from tests.helpers.launch import ROOT, launch, run_python

SCRIPT = ROOT / "recipes" / "vision" / "train.py"
SMOKE = ROOT / "recipes" / "vision" / "configs" / "smoke.yaml"


def test_no_host_sync_between_logging_steps(tmp_path):
    # 1,257 digits in batches of 32: 40 steps in one epoch, so the windows 10-20 and 20-30 hold only
    # training steps (with averaging every step from step 12), no epoch boundary, evaluation or checkpoint.
    report, config = tmp_path / "syncs.json", tmp_path / "smoke_by_step.yaml"
    values = yaml.safe_load(SMOKE.read_text())
    del values["swa_start_epoch"]  # the start is set in steps below
    config.write_text(yaml.safe_dump(values))
    args = ["--config", str(config), "--max_train_samples", "1257", "--num_train_epochs", "1", "--augment", "true",
            "--output_dir", str(tmp_path / "run"), "--swa_start_step", "12", "--swa_update_every_steps", "1",
            "--swa_anneal_steps", "2", "--logging_steps", "10", "--eval_steps", "1000",
            "--checkpointing_steps", "None", "--plot", "false"]
    result = run_python(ROOT / "tests" / "workers" / "count_host_syncs.py", [str(report), *args])
    assert result.returncode == 0, result.stderr[-3000:]
    counted = json.loads(report.read_text())
    windows = {window["ends_at"]: window["calls"] for window in counted["windows"]}
    assert sorted(windows) == [20, 30, 40]
    assert windows[20] == [] and windows[30] == [], (windows[20] + windows[30])[:5]
    # The last window holds the epoch's end, where torch's RandomSampler turns its next host-side
    # permutation into a list: a CPU tensor from a CPU generator, never a device sync.
    assert all(call["call"] == "tolist" and "sampler.py" in call["stack"][-1] for call in windows[40]), windows[40]
    # The detector works: the logging steps themselves read the loss.
    assert any(call["call"] in ("item", "tolist") for call in counted["logging"])
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert next(r for r in records if r["model"] == "swa")["n_averaged"] == 28  # after each of steps 13..40

    # Each logging step sends the mean loss since the last one, the LR and the fractional epoch to the trackers.
    train_logs = [r for r in counted["tracked"] if "train/loss" in r]
    assert [r["step"] for r in train_logs] == [10, 20, 30, 40]
    assert [r["train/epoch"] for r in train_logs] == [0.25, 0.5, 0.75, 1.0]
    assert train_logs[0]["train/lr"] == pytest.approx(0.1) and train_logs[-1]["train/lr"] == pytest.approx(0.05)
    losses = [r["train/loss"] for r in train_logs]
    assert all(0.0 < loss < 5.0 for loss in losses) and losses[-1] < losses[0]  # a real, falling training loss


def test_a_compiled_model_trains_averages_exports_and_resumes(tmp_path):
    # aot_eager traces forward and backward through dynamo and AOTAutograd without needing a C++ compiler.
    def args(out, *extra):
        return ["--config", str(SMOKE), "--output_dir", str(out), "--swa_update_every_steps", "2",
                "--checkpointing_steps", "5", *extra]

    # What `accelerate launch --dynamo_backend aot_eager` sets for the script (the launcher itself is tested elsewhere).
    compiled = {"env": {"ACCELERATE_DYNAMO_BACKEND": "AOT_EAGER"}}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(SCRIPT, args(straight), **compiled)
    resolved = yaml.safe_load((straight / "config.yaml").read_text())
    assert resolved["launch"]["compiled"] is True and resolved["launch"]["dynamo_backend"] == "aot_eager"
    for which in ("base", "swa"):
        names = load_file(straight / "final" / which / "model.safetensors")
        assert not any("_orig_mod" in name or name.startswith("module.") for name in names)
    swa_checkpoint = load_file(straight / "checkpoints" / "step_00000020" / "swa_model" / "model.safetensors")
    assert not any("_orig_mod" in name for name in swa_checkpoint)
    swa_final = next(r for r in read_metrics(straight / "metrics.jsonl") if r.get("final") and r["model"] == "swa")
    assert swa_final["n_averaged"] == 8 and swa_final["accuracy"] > 0.15

    # The run's folder without its final export and last checkpoint: resumed from its checkpoint at step 15.
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step_00000020")
    result = launch(SCRIPT, args(resumed, "--resume_from_checkpoint", "latest"), **compiled)
    assert "resumed from" in result.stdout and "step_00000015" in result.stdout
    assert_same_final_weights(straight, resumed)


def test_the_compile_config_asks_accelerate_for_inductor():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "accelerate_configs" / "single_gpu_compile.yaml"))
    assert config.dynamo_config["dynamo_backend"] == "INDUCTOR" and config.mixed_precision == "bf16"


def test_data_placement_choice():
    from swa_accel.runner.task import keep_on_device

    cpu = torch.device("cpu")
    assert keep_on_device(10**12, cpu, "auto")  # the host is the training device: nothing to move
    assert keep_on_device(10**6, cpu, "device") and not keep_on_device(10**6, cpu, "host")


def diverging_run(tmp_path, inject_after, *extra):
    config = tmp_path / "smoke_by_step.yaml"
    values = yaml.safe_load(SMOKE.read_text())
    del values["swa_start_epoch"]
    config.write_text(yaml.safe_dump(values))
    report = tmp_path / "report.json"
    args = ["--config", str(config), "--output_dir", str(tmp_path / "run"), "--swa_start_step", "2",
            "--swa_update_every_steps", "1", "--swa_anneal_steps", "1", "--plot", "false", *extra]
    result = run_python(ROOT / "tests" / "workers" / "inject_nan.py", [str(report), str(inject_after), *args])
    assert report.is_file(), result.stderr[-3000:]
    return json.loads(report.read_text()), result.stderr.strip().splitlines()[-1]


def test_a_nan_never_reaches_the_average_or_replaces_the_last_checkpoint(tmp_path):
    # Weights turn NaN right after step 5; averaging runs every step, a checkpoint is due every 4 steps.
    report, last_line = diverging_run(tmp_path, 5, "--checkpointing_steps", "4", "--logging_steps", "10")
    assert report["exit_code"] == 1 and report["stopped_at_step"] == 8  # at the checkpoint due at step 8
    assert report["average_finite"] and report["average_unchanged_since_injection"]  # updates 6-8 skipped
    assert last_line == (f"error: training: diverged by optimizer step 8 (the training loss is nan; an averaging update "
                         f"met non-finite weights and skipped them; the weights are not finite or exceed divergence_bound "
                         f"(1e+06); a BatchNorm statistic or other buffer is not finite); stopped before saving anything: "
                         f"the last checkpoint, {tmp_path / 'run' / 'checkpoints' / 'step_00000004'}, and the average "
                         "are intact; resume from the last checkpoint with a lower swa_lr (now 0.05)")
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000004"] and not (tmp_path / "run" / "final").exists()
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_00000004" / "model.safetensors")
    assert all(bool(t.isfinite().all()) for t in saved.values() if t.is_floating_point())


def test_a_nan_loss_at_a_logging_step_stops_the_run_in_one_line(tmp_path):
    # No checkpoint and no evaluation (which also check) before the logging step at 10.
    report, last_line = diverging_run(tmp_path, 6, "--checkpointing_steps", "None", "--eval_steps", "1000",
                                      "--logging_steps", "5")
    assert report["exit_code"] == 1 and report["stopped_at_step"] == 10
    assert report["average_finite"] and report["average_unchanged_since_injection"]
    assert last_line.startswith("error: training: diverged by optimizer step 10 (the training loss is nan; "
                                "an averaging update met non-finite weights and skipped them)")
    assert "no checkpoint was saved yet, and the average is intact" in last_line
