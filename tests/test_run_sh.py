"""run.sh as a user calls it: a config copied anywhere runs through its `recipe:` key, quietly."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import yaml

from tests.helpers.launch import ROOT

SMOKE = ROOT / "recipes" / "vision" / "configs" / "smoke.yaml"


def run_sh(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as in a fresh shell
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    return subprocess.run([str(ROOT / "run.sh"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_config_copied_elsewhere_runs_from_there_without_the_launcher_warning(tmp_path):
    (tmp_path / "mine.yaml").write_text(SMOKE.read_text())
    result = run_sh(["mine.yaml", "--output_dir", "out", "--max_train_samples", "64", "--num_train_epochs", "2",
                     "--checkpointing_steps", "none"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # Relative paths are the caller's: the outputs landed beside the copied config.
    assert (tmp_path / "out" / "final" / "swa" / "model.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["config"]["checkpointing_steps"] is None
    assert "were not passed to `accelerate launch`" not in result.stderr


def test_the_tests_one_process_environment_is_what_the_real_launcher_gives(tmp_path):
    # tests/helpers/launch.py runs one-process launches without the launcher, in ONE_CPU_PROCESS_ENV: it must be
    # what `accelerate launch` with the CPU config gives the script (a new accelerate may set more).
    from tests.helpers.launch import ONE_CPU_PROCESS_ENV, launch

    script = tmp_path / "environment.py"
    script.write_text("import json, os\nprint(json.dumps(dict(os.environ)))\n")
    real = json.loads(launch(script, [], real_launcher=True).stdout.strip().splitlines()[-1])
    direct = json.loads(launch(script, []).stdout.strip().splitlines()[-1])
    names = {k for k in real if k.startswith(("ACCELERATE_", "OMP_", "MKL_", "PYTHON", "LOCAL_", "RANK", "WORLD_",
                                              "MASTER_", "TORCH", "CUDA", "XLA"))}
    assert {k: real[k] for k in names} == {k: direct.get(k) for k in names}
    assert set(ONE_CPU_PROCESS_ENV) <= names


def test_a_config_that_does_not_say_its_recipe_is_refused_in_one_line(tmp_path):
    values = yaml.safe_load(SMOKE.read_text())
    del values["recipe"]
    (tmp_path / "anonymous.yaml").write_text(yaml.safe_dump(values))
    values["recipe"] = "audio"
    (tmp_path / "unknown.yaml").write_text(yaml.safe_dump(values))
    result = run_sh(["anonymous.yaml"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: recipe: cannot tell which recipe '{tmp_path}/anonymous.yaml' is for; "
                                     "add a line 'recipe: vision' or 'recipe: text' to it")
    result = run_sh(["unknown.yaml"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: recipe: '{tmp_path}/unknown.yaml' names recipe 'audio'; "
                                     "the recipes are: text vision")


def test_a_bad_value_through_run_sh_is_the_same_line_and_status_as_a_direct_run(tmp_path):
    through_run_sh = run_sh([str(SMOKE), "--swa_lr", "0", "--output_dir", str(tmp_path / "a")], cwd=tmp_path)
    direct = subprocess.run([sys.executable, str(ROOT / "recipes" / "vision" / "train.py"), "--config", str(SMOKE),
                             "--swa_lr", "0", "--output_dir", str(tmp_path / "b")], capture_output=True, text=True,
                            timeout=300)
    assert through_run_sh.returncode == direct.returncode == 1
    assert through_run_sh.stderr.strip().splitlines()[-1] == direct.stderr.strip().splitlines()[-1] == \
        "error: swa_lr: must be > 0, got 0.0"


def test_an_fsdp_accelerate_config_on_a_machine_without_gpus_stops_in_one_line(tmp_path):
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_machines": 1, "num_processes": 1,
        "machine_rank": 0, "mixed_precision": "no", "use_cpu": False,
        "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "NO_WRAP"}}))
    result = run_sh(["--accelerate_config", str(config), str(SMOKE), "--output_dir", str(tmp_path / "out")],
                    cwd=tmp_path)
    assert result.returncode == 1
    # An FSDP config goes through torchrun, which adds its own failure report after the script's line.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: launch: the accelerate config asks for FSDP (distributed_type: FSDP), but "
                                "accelerate set up "), errors[0]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_two_process_launch_prints_the_error_once(tmp_path):
    from tests.helpers.launch import launch

    result = launch(ROOT / "recipes" / "vision" / "train.py", ["--config", str(SMOKE), "--swa_lr", "0",
                                                                  "--output_dir", str(tmp_path / "out")],
                    num_processes=2, check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: swa_lr: must be > 0, got 0.0"]


def start_training_through_run_sh(tmp_path) -> subprocess.Popen:
    """`./run.sh` on the smoke config in a session of its own, returned once it is training (its first
    metrics written), with a budget far past that: a signal sent then must find the run training, however fast
    this machine is."""
    import time

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    process = subprocess.Popen([str(ROOT / "run.sh"), str(SMOKE), "--output_dir", "out", "--num_train_epochs", "1000"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "out" / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return process


def test_ctrl_c_through_run_sh_is_one_line_with_no_traceback(tmp_path):
    """Ctrl-C reaches the whole foreground process group: launcher and training process alike."""
    import signal

    process = start_training_through_run_sh(tmp_path)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted at optimizer step ")


def test_help_lists_every_option_of_the_configs_recipe_and_exits_0(tmp_path):
    from swa_accel.runner.config import RunArguments, SWAArguments

    help_text = run_sh(["--help"], cwd=tmp_path)
    assert help_text.returncode == 0 and help_text.stderr == "", help_text.stderr[-2000:]
    assert "--swa_lr STR" in help_text.stdout and "Constant LR of the SWA phase" in help_text.stdout
    assert "--augment" in help_text.stdout  # the default job is the vision recipe's
    for dtype in (RunArguments, SWAArguments):
        for name in (f.name for f in dataclasses.fields(dtype)):
            assert f"--{name} " in help_text.stdout, name
    assert run_sh(["-h"], cwd=tmp_path).stdout == help_text.stdout
    text = run_sh(["recipes/text/configs/smoke.yaml", "--max_length", "8", "-h"], cwd=ROOT)
    assert text.returncode == 0 and "--max_length INT" in text.stdout and "--augment" not in text.stdout
    # The recipe's own --help lists the same options (read the same way), under its own usage line.
    direct = subprocess.run([sys.executable, str(ROOT / "recipes" / "vision" / "train.py"), "--help"],
                            capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stderr[-2000:]
    assert direct.stdout.split("general:")[1] == help_text.stdout.split("general:")[1]


def test_a_config_error_arrives_before_torch_loads(tmp_path):
    started = time.monotonic()
    result = run_sh(["--num_epochs", "5"], cwd=tmp_path)
    seconds = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr == "error: num_epochs: unknown option; did you mean num_train_epochs?\n"
    assert seconds < 3, seconds


def test_a_config_path_from_the_clone_is_found_from_any_folder(tmp_path):
    # (as the YAML headers write it; the swa_lr line shows that the file was read)
    result = run_sh(["recipes/vision/configs/smoke.yaml", "--swa_lr", "0"], cwd=tmp_path)
    assert (result.returncode, result.stderr) == (1, "error: swa_lr: must be > 0, got 0.0\n")
    missing = run_sh(["recipes/vision/configs/missing.yaml"], cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr == (f"error: config: '{tmp_path}/recipes/vision/configs/missing.yaml' does not exist "
                              f"(nor does '{ROOT}/recipes/vision/configs/missing.yaml')\n")


def test_sigterm_to_run_sh_stops_training_with_a_checkpoint_and_leaves_no_process(tmp_path):
    import psutil

    process = start_training_through_run_sh(tmp_path)
    descendants = psutil.Process(process.pid).children(recursive=True)
    assert any("train.py" in " ".join(child.cmdline()) for child in descendants)
    os.kill(process.pid, signal.SIGTERM)  # run.sh's pid only, not its process group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("stopped by SIGTERM after optimizer step ") and "Traceback" not in stderr, stderr[-3000:]
    step = int(line.split("optimizer step ")[1].split(":")[0])
    assert (tmp_path / "out" / "checkpoints" / f"step_{step:08d}" / "model.safetensors").is_file()
    assert not [child.pid for child in descendants if child.is_running()]


def test_the_venv_imports_swa_accel_from_any_folder(tmp_path):
    result = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c",
                             "import swa_accel, swa_accel.runner; print(swa_accel.__file__)"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, env={"PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(ROOT / "swa_accel" / "__init__.py")


def test_run_sh_test_with_a_path_runs_just_those_tests(tmp_path):
    (tmp_path / "test_alone.py").write_text("def test_alone():\n    assert 1 + 1 == 2\n")
    result = run_sh(["test", str(tmp_path / "test_alone.py"), "-q", "-p", "no:cacheprovider"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("1 passed")
    # A plugin option keeps the files on the machine's workers; only -p no:xdist (or an -n) turns that off.
    assert "bringing up nodes" in result.stdout
    alone = run_sh(["test", str(tmp_path / "test_alone.py"), "-q", "-p", "no:xdist"], cwd=tmp_path)
    assert alone.returncode == 0 and "bringing up nodes" not in alone.stdout, alone.stdout[-2000:]
    # Options alone still mean the whole suite.
    everything = run_sh(["test", "-q", "--collect-only", "-k", "test_run_sh_test_with_a_path"], cwd=tmp_path)
    assert "tests/test_run_sh.py::test_run_sh_test_with_a_path_runs_just_those_tests" in everything.stdout
    assert int(re.search(r"(\d+) deselected", everything.stdout).group(1)) > 100, everything.stdout[-2000:]
