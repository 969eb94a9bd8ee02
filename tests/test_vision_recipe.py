"""The vision recipe end to end through the real launcher: outputs, reload, LR parity, resume, bad input."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from recipes.vision.data import VisionDataArguments, load_vision_data
from recipes.vision.models import PreResNet
from swa_accel.evaluation import compute_metrics, load_metrics, predict
from swa_accel.image_tensors import identity_collate
from swa_accel.outputs import read_metrics
from tests.helpers.final_weights import assert_same_final_weights
from tests.helpers.launch import ROOT, launch, run_python
from tests.helpers.tiny_datasets import make_cifar_like

SCRIPT = ROOT / "recipes" / "vision" / "train.py"
SMOKE = ROOT / "recipes" / "vision" / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return make_cifar_like(tmp_path_factory.mktemp("cifar"), n_train=64, n_test=32, image_size=8)


def common(cifar_dir, out, *extra):
    # 64 samples, global batch 16: 4 optimizer steps per epoch, 16 in all; averaging every 2 steps from step 8.
    return ["--config", str(SMOKE), "--dataset_name", str(cifar_dir), "--label_noise", "0", "--augment", "true",
            "--max_train_samples", "64", "--model_name", "preresnet", "--depth", "8", "--output_dir", str(out),
            "--num_train_epochs", "4", "--swa_start_epoch", "2", "--swa_update_every_steps", "2",
            "--checkpointing_steps", "3", "--eval_steps", "2", "--per_device_eval_batch_size", "8", *extra]


@pytest.fixture(scope="module")
def runs(cifar_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("vision_runs")
    one = launch(SCRIPT, common(cifar_dir, base / "one", "--per_device_train_batch_size", "16"))
    two = launch(SCRIPT, common(cifar_dir, base / "two", "--per_device_train_batch_size", "8"), num_processes=2)
    accum = launch(SCRIPT, common(cifar_dir, base / "accum", "--per_device_train_batch_size", "8",
                                  "--gradient_accumulation_steps", "2", "--checkpointing_steps", "None"))
    return {"one": (base / "one", one), "two": (base / "two", two), "accum": (base / "accum", accum)}


def final_record(out: Path, model: str) -> dict:
    return next(r for r in read_metrics(out / "metrics.jsonl") if r.get("final") and r["model"] == model)


@pytest.mark.parametrize("name,processes", [("one", 1), ("two", 2)])
def test_outputs_exist_and_final_swa_reproduces_the_logged_metric(runs, cifar_dir, name, processes):
    out, result = runs[name]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["launch"]["num_processes"] == processes
    assert resolved["config"]["model_name"] == "preresnet"
    for path in ("metrics.jsonl", "curves.png", "final/base/model.safetensors", "final/swa/model.safetensors",
                 "final/swa/config.json", "final/results.json"):
        assert (out / path).is_file(), path
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_00000012", "step_00000015"]  # total limit 2, newest kept
    assert (out / "checkpoints" / "step_00000015" / "swa_model" / "model.safetensors").is_file()
    assert "final evaluation" in result.stdout and "swa" in result.stdout

    records = read_metrics(out / "metrics.jsonl")
    assert {r["model"] for r in records if r["step"] <= 8} == {"base"}  # SWA reported only once averaging began
    swa = final_record(out, "swa")
    assert swa["n_averaged"] == 4 and swa["step"] == 16

    data = load_vision_data(VisionDataArguments(dataset_name=str(cifar_dir)))
    model = PreResNet.from_pretrained(out / "final" / "swa")
    loader = torch.utils.data.DataLoader(data.evals["test"], batch_size=8, collate_fn=identity_collate)

    class OneProcess:
        @staticmethod
        def gather_for_metrics(x):
            return x

        @staticmethod
        def autocast():
            return torch.autocast("cpu", enabled=False)

    logits, labels = predict(model, loader, OneProcess)
    again = compute_metrics(load_metrics(["accuracy", "nll"]), logits, labels)
    assert again["accuracy"] == pytest.approx(swa["accuracy"], abs=1e-9)
    assert again["nll"] == pytest.approx(swa["nll"], abs=1e-5)
    # BN statistics were recomputed: they differ from the last iterate's.
    base_state = load_file(out / "final" / "base" / "model.safetensors")
    swa_state = load_file(out / "final" / "swa" / "model.safetensors")
    bn_key = next(k for k in swa_state if k.endswith("running_mean"))
    assert not torch.equal(base_state[bn_key], swa_state[bn_key])


def test_lr_per_step_is_the_same_for_processes_and_accumulation(runs):
    def lr_by_step(name):
        out = runs[name][0]
        return [(r["step"], r["lr"]) for r in read_metrics(out / "metrics.jsonl") if r["model"] == "base"]

    one = lr_by_step("one")
    assert len(one) == 8 and one[-1][0] == 16
    assert lr_by_step("two") == one
    assert lr_by_step("accum") == one
    assert len({lr for _, lr in one}) > 1  # the anneal really moved the LR
    # Averaging counts optimizer steps too: every 2 steps from step 8 is 4 updates, whatever the layout.
    assert {final_record(runs[name][0], "swa")["n_averaged"] for name in runs} == {4}


def test_ema_with_bf16_weights_and_bf16_autocast_keeps_an_fp32_average(cifar_dir, tmp_path):
    out = tmp_path / "ema"
    launch(SCRIPT, common(cifar_dir, out, "--per_device_train_batch_size", "16", "--swa_method", "ema",
                          "--ema_decay", "0.8", "--swa_update_every_steps", "1", "--model_dtype", "bfloat16",
                          "--checkpointing_steps", "None"), launcher_args=("--mixed_precision", "bf16"))
    assert yaml.safe_load((out / "config.yaml").read_text())["launch"]["mixed_precision"] == "bf16"
    base = load_file(out / "final" / "base" / "model.safetensors")
    ema = load_file(out / "final" / "swa" / "model.safetensors")
    weight = next(k for k in base if k.endswith("conv1.weight"))
    assert base[weight].dtype == torch.bfloat16 and ema[weight].dtype == torch.float32
    # The fp32 EMA is not just the bf16 weights cast up: it carries bits bf16 cannot hold.
    assert not torch.equal(ema[weight], ema[weight].bfloat16().float())
    record = final_record(out, "swa")
    assert record["n_averaged"] == 8 and 0.0 <= record["accuracy"] <= 1.0


def test_resume_after_a_checkpoint_gives_bit_identical_final_weights(runs, cifar_dir, tmp_path):
    straight = runs["one"][0]
    out = tmp_path / "resumed"
    args = common(cifar_dir, out, "--per_device_train_batch_size", "16")
    launch(SCRIPT, args + ["--stop_after_step", "11"])  # mid-epoch, after averaging began
    assert not (out / "final").exists()
    assert (out / "checkpoints" / "step_00000011").is_dir()
    launch(SCRIPT, args + ["--resume_from_checkpoint", "latest"])
    assert_same_final_weights(straight, out)
    assert read_metrics(out / "metrics.jsonl") == read_metrics(straight / "metrics.jsonl")


def run_bad(args):
    result = run_python(SCRIPT, args)
    lines = result.stderr.strip().splitlines()
    return result.returncode, (lines[-1] if lines else "")


@pytest.mark.parametrize("extra,field", [
    (["--swa_start_epoch", "99"], "swa_start_epoch"),
    (["--swa_lr", "0"], "swa_lr"),
    (["--swa_lr", "-0.1"], "swa_lr"),
    (["--label_column", "nope"], "label_column"),
    (["--image_column", "pixels"], "image_column"),
    (["--num_labels", "5"], "num_labels"),
    (["--model_name", "resnet9000"], "model_name"),
    (["--learning_rate", "abc"], "learning_rate"),
    (["--resume_from_checkpoint", "/nonexistent/ckpt"], "resume_from_checkpoint"),
])
def test_bad_config_is_one_line_naming_the_field_before_training(cifar_dir, tmp_path, extra, field):
    out = tmp_path / "bad"
    code, last = run_bad(common(cifar_dir, out) + extra)
    assert code == 1
    assert last.startswith("error: ") and field in last, last
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_a_fresh_run_never_overwrites_a_previous_one_unless_asked(cifar_dir, tmp_path):
    out = tmp_path / "taken"
    (out / "checkpoints" / "step_00000099").mkdir(parents=True)
    code, last = run_bad(common(cifar_dir, out, "--max_train_steps", "10"))
    assert code == 1 and last.startswith("error: output_dir:") and "--overwrite_output_dir" in last, last
    assert (out / "checkpoints" / "step_00000099").is_dir()
    result = run_python(SCRIPT, common(cifar_dir, out, "--max_train_steps", "10",
                                       "--checkpointing_steps", "None", "--overwrite_output_dir", "true"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (out / "checkpoints").exists() and (out / "final" / "swa" / "model.safetensors").is_file()


def test_unknown_keys_in_yaml_and_on_the_command_line(cifar_dir, tmp_path):
    config = yaml.safe_load(SMOKE.read_text())
    config["swa_learning_rate"] = 0.05
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(yaml.safe_dump(config))
    code, last = run_bad(["--config", str(bad_yaml)])
    assert code == 1 and last.startswith("error: swa_learning_rate: unknown key"), last
    code, last = run_bad(["--config", str(SMOKE), "--swa_learnig_rate", "0.1"])
    assert code == 1 and "swa_learnig_rate" in last, last
    code, last = run_bad(["--config", str(tmp_path / "missing.yaml")])
    assert code == 1 and last.startswith("error: config:"), last


def test_a_checkpoint_of_another_model_or_a_damaged_one_is_one_line_and_changes_nothing(cifar_dir, tmp_path):
    out = tmp_path / "run"
    launch(SCRIPT, common(cifar_dir, out, "--per_device_train_batch_size", "16", "--stop_after_step", "3"))
    checkpoint = out / "checkpoints" / "step_00000003"
    config_before = (out / "config.yaml").read_text()
    # The same run resumed with a wider model: the saved weights do not fit.
    code, last = run_bad(common(cifar_dir, out, "--per_device_train_batch_size", "16", "--model_name", "small_cnn",
                                "--resume_from_checkpoint", "latest"))
    assert code == 1 and last.startswith(f"error: resume_from_checkpoint: cannot restore '{checkpoint}' into this "
                                         "run ("), last
    assert last.endswith("it holds another model or optimizer, or a damaged file"), last
    assert (out / "config.yaml").read_text() == config_before  # nothing of the run was rewritten
    # A damaged weights file.
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, last = run_bad(common(cifar_dir, out, "--per_device_train_batch_size", "16",
                                "--resume_from_checkpoint", "latest"))
    assert code == 1 and last.startswith("error: resume_from_checkpoint: cannot restore"), last
    assert checkpoint.is_dir()


def test_an_output_dir_that_cannot_be_a_folder_is_one_line(cifar_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out, where in ((blocker, "it is a file"), (blocker / "run", f"'{blocker}' is a file")):
        code, last = run_bad(common(cifar_dir, out))
        assert code == 1 and last == f"error: output_dir: '{out}' cannot be a folder: {where}; choose another " \
                                     "output_dir", last
    assert blocker.read_text() == "not a folder"


def test_the_traceback_variable_shows_the_whole_error(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SWA_ACCEL_TRACEBACK", "1")
    result = run_python(SCRIPT, common(cifar_dir, tmp_path / "out", "--swa_lr", "0"))
    assert result.returncode != 0 and "Traceback (most recent call last)" in result.stderr
    assert "ConfigError: swa_lr: must be > 0" in result.stderr


@pytest.mark.parametrize("extra,start", [
    (["--dataset_name", "/nonexistent/data"], "error: dataset_name: cannot load '/nonexistent/data': "),
    (["--num_train_epochs", "abc"], "error: num_train_epochs: invalid int value: 'abc'"),
    (["--output_dir", "/proc/swa_accel_cannot_be_here"], "error: output_dir: cannot create "),
])
def test_more_bad_input_found_by_trying_to_break_it(cifar_dir, tmp_path, extra, start):
    code, last = run_bad(common(cifar_dir, tmp_path / "out") + extra)
    assert code == 1 and last.startswith(start), last
