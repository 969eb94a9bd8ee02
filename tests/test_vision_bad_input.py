"""The vision recipe given bad input, through the real launcher: one line naming what is wrong, before training, and
nothing of a previous run changed."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.helpers.launch import ROOT, launch, run_python
from tests.helpers.vision_runs import SCRIPT, SMOKE, common, make_cifar_dir


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return make_cifar_dir(tmp_path_factory.mktemp("cifar"))


def run_bad(args):
    result = run_python(SCRIPT, args)
    lines = result.stderr.strip().splitlines()
    return result.returncode, (lines[-1] if lines else "")


BAD_CONFIGS = [
    (["--swa_start_epoch", "99"], "swa_start_epoch"),
    (["--swa_lr", "0"], "swa_lr"),
    (["--swa_lr", "-0.1"], "swa_lr"),
    (["--label_column", "nope"], "label_column"),
    (["--image_column", "pixels"], "image_column"),
    (["--num_labels", "5"], "num_labels"),
    (["--model_name", "resnet9000"], "model_name"),
    (["--learning_rate", "abc"], "learning_rate"),
    (["--resume_from_checkpoint", "/nonexistent/ckpt"], "resume_from_checkpoint"),
    # Candidates without a validation split to choose on, or before the SWA start.
    (["--validation_fraction", "0", "--swa_start_candidates", "every_epoch"], "swa_start_candidates: choosing among"),
    (["--swa_start_candidates", "1"], "swa_start_candidates: 1 starts at optimizer step 2, before the SWA start (step 4)"),
    (["--validation_fraction", "0.9"], "validation_fraction: cannot hold out 0.9 of 80 train rows"),
    (["--validation_fraction", "0", "--validation_split", "test"], "validation_split: 'test' is an eval split"),
]
MORE_BAD_INPUT = [
    (["--dataset_name", "/nonexistent/data"], "error: dataset_name: cannot load '/nonexistent/data': "),
    (["--num_train_epochs", "abc"], "error: num_train_epochs: invalid int value: 'abc'"),
    (["--output_dir", "/proc/swa_accel_cannot_be_here"], "error: output_dir: cannot create "),
]


def file_cases(root):
    """Refusals about the files a run is given: a YAML with an unknown key, a misspelled option, a missing config,
    an output folder that is taken, and output folders that cannot be folders (made here, under `root`)."""
    config = yaml.safe_load(SMOKE.read_text())
    config["swa_learning_rate"] = 0.05
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text(yaml.safe_dump(config))
    taken = root / "taken"
    (taken / "checkpoints" / "step_00000099").mkdir(parents=True)
    blocker = root / "a_file"
    blocker.write_text("not a folder")
    return {
        "unknown_yaml_key": ["--config", str(bad_yaml)],
        "misspelled_option": ["--config", str(SMOKE), "--swa_learnig_rate", "0.1"],
        "missing_config": ["--config", str(root / "missing.yaml")],
        "taken": ("cifar", taken, "--max_train_steps", "10"),
        "output_is_a_file": ("cifar", blocker),
        "output_under_a_file": ("cifar", blocker / "run"),
    }


@pytest.fixture(scope="module")
def refusals(cifar_dir, tmp_path_factory):
    """Every refused command line of BAD_CONFIGS, MORE_BAD_INPUT and `file_cases`, run in one process
    (tests/workers/refusals.py): (exit status, last stderr line, the output folder it was given), and for the file
    cases {name: (exit status, last stderr line)} and their folder."""
    root = tmp_path_factory.mktemp("refusals")
    cases = [common(cifar_dir, root / f"bad{i}") + extra for i, (extra, _) in enumerate(BAD_CONFIGS)]
    cases += [common(cifar_dir, root / f"more{i}") + extra for i, (extra, _) in enumerate(MORE_BAD_INPUT)]
    files = file_cases(root)
    cases += [common(cifar_dir, case[1], *case[2:]) if isinstance(case, tuple) else case for case in files.values()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "refusals.py"), json.dumps(cases)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(answers) == len(cases), result.stderr[-3000:]
    named = [root / f"bad{i}" for i in range(len(BAD_CONFIGS))] + [root / f"more{i}" for i in range(len(MORE_BAD_INPUT))]
    by_case = [(a["code"], a["last"], out) for a, out in zip(answers, named)]
    by_file = {name: (a["code"], a["last"]) for name, a in zip(files, answers[len(named):])}
    return by_case, by_file, root


@pytest.mark.parametrize("case", range(len(BAD_CONFIGS)), ids=[field for _, field in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_field_before_training(refusals, case):
    code, last, out = refusals[0][case]
    field = BAD_CONFIGS[case][1]
    assert code == 1
    assert last.startswith("error: ") and field in last, last
    assert not out.exists()  # a refused run leaves no folder it created


def test_a_fresh_run_never_overwrites_a_previous_one_unless_asked(refusals, cifar_dir):
    _, by_file, root = refusals
    out = root / "taken"
    code, last = by_file["taken"]
    assert code == 1 and last.startswith("error: output_dir:") and "--overwrite_output_dir" in last, last
    assert (out / "checkpoints" / "step_00000099").is_dir()
    result = run_python(SCRIPT, common(cifar_dir, out, "--max_train_steps", "10",
                                       "--checkpointing_steps", "None", "--overwrite_output_dir", "true"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (out / "checkpoints").exists() and (out / "final" / "swa" / "model.safetensors").is_file()


def test_unknown_keys_in_yaml_and_on_the_command_line(refusals):
    by_file = refusals[1]
    code, last = by_file["unknown_yaml_key"]
    assert code == 1 and last.startswith("error: swa_learning_rate: unknown key"), last
    code, last = by_file["misspelled_option"]
    assert code == 1 and "swa_learnig_rate" in last, last
    code, last = by_file["missing_config"]
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


def test_an_output_dir_that_cannot_be_a_folder_is_one_line(refusals):
    _, by_file, root = refusals
    blocker = root / "a_file"
    for case, out, where in (("output_is_a_file", blocker, "it is a file"),
                             ("output_under_a_file", blocker / "run", f"'{blocker}' is a file")):
        code, last = by_file[case]
        assert code == 1 and last == f"error: output_dir: '{out}' cannot be a folder: {where}; choose another " \
                                     "output_dir", last
    assert blocker.read_text() == "not a folder"


def test_the_traceback_variable_shows_the_whole_error(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SWA_ACCEL_TRACEBACK", "1")
    result = run_python(SCRIPT, common(cifar_dir, tmp_path / "out", "--swa_lr", "0"))
    assert result.returncode != 0 and "Traceback (most recent call last)" in result.stderr
    assert "ConfigError: swa_lr: must be > 0" in result.stderr


@pytest.mark.parametrize("case", range(len(MORE_BAD_INPUT)), ids=[start for _, start in MORE_BAD_INPUT])
def test_more_bad_input_found_by_trying_to_break_it(refusals, case):
    code, last, _ = refusals[0][len(BAD_CONFIGS) + case]
    assert code == 1 and last.startswith(MORE_BAD_INPUT[case][1]), last
