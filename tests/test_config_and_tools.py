"""Every recipe YAML parses and validates; the start chooser; the launch guard; config parsing."""

import json
from pathlib import Path

import pytest

import swa_accel.runner.launch as launch_module
from swa_accel.launcher_request import process_count_warning, requested_processes
from recipes.vision.data import VisionDataArguments
from recipes.vision.model_setup import VisionModelArguments
from swa_accel.runner.choose_start import main as choose_start_main
from swa_accel.runner.choose_start import suggest_start
from swa_accel.runner.config import ConfigError, SWAArguments, RunArguments, parse_config

ROOT = Path(__file__).resolve().parents[1]
VISION = (VisionDataArguments, VisionModelArguments, RunArguments, SWAArguments)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "vision" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_vision_yaml_parses_and_says_how_to_run_it(path):
    data, model, training, swa = parse_config(VISION, ["--config", str(path)])
    assert training.output_dir.startswith("outputs/")
    assert swa.swa_method == "swa"
    header = path.read_text().splitlines()[:12]
    assert any("./run.sh" in line and path.name in line for line in header), "header must show the command"


def test_yaml_values_then_command_line_overrides():
    path = ROOT / "recipes" / "vision" / "configs" / "digits_small_cnn.yaml"
    _, model, training, swa = parse_config(VISION, ["--config", str(path), "--swa_lr", "0.02", "--width", "8"])
    assert swa.swa_lr == 0.02 and model.width == 8
    assert training.num_train_epochs == 40 and training.weight_decay == pytest.approx(1e-3)


@pytest.mark.parametrize("argv,field", [
    (["--swa_start_fraction", "1.0"], "swa_start_fraction"),
    (["--swa_start_epoch", "2", "--swa_start_step", "5"], "swa_start_epoch"),
    (["--swa_method", "polyak"], "swa_method"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
    (["--checkpointing_steps", "sometimes"], "checkpointing_steps"),
    (["--ema_decay", "1.5"], "ema_decay"),
    (["--lr_scheduler_type", "step"], "lr_scheduler_type"),
])
def test_invalid_values_name_the_field(argv, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        parse_config((RunArguments, SWAArguments), argv)


def records(nll_by_epoch):
    return [{"step": 10 * e, "epoch": e, "model": "base", "split": "validation", "nll": v, "accuracy": 0.5}
            for e, v in enumerate(nll_by_epoch, start=1)]


def test_choose_start_finds_where_validation_loss_turns_up(tmp_path, capsys):
    epoch, why = suggest_start(records([1.0, 0.7, 0.5, 0.45, 0.5, 0.6, 0.8]))
    assert epoch == 4 and "rises" in why
    epoch, why = suggest_start(records([1.0, 0.8, 0.6]))
    assert epoch == 3 and "still falling" in why
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records([0.9, 0.4, 0.6])))
    assert choose_start_main([str(path)]) == 0
    assert "override: --swa_start_epoch 2" in capsys.readouterr().out
    assert choose_start_main([str(path), "--split", "valid"]) == 2  # a split it did not log


def test_launch_guard_refuses_a_launch_whose_processes_did_not_join(monkeypatch, tmp_path):
    # As if a launcher had started 2 processes that each came up alone as rank 0.
    monkeypatch.setattr(launch_module, "launched_world_size", lambda: 2)
    with pytest.raises(ConfigError, match="^launch: the launcher started 2 processes but accelerate sees 1"):
        launch_module.make_accelerator(RunArguments(output_dir=str(tmp_path)))


def test_none_on_the_command_line_unsets_an_optional_value_the_yaml_set(tmp_path):
    path = ROOT / "recipes" / "vision" / "configs" / "digits_small_cnn.yaml"
    _, _, training, swa = parse_config(VISION, ["--config", str(path)])
    assert swa.swa_start_epoch == 10 and swa.swa_lr == 0.05 and swa.bn_recompute_max_samples == 256
    _, _, training, swa = parse_config(VISION, ["--config", str(path), "--swa_start_epoch", "none",
                                                "--swa_lr=NULL", "--bn-recompute-max-samples", "None",
                                                "--swa_start_step", "100", "--seed", "3"])
    assert swa.swa_start_epoch is None and swa.swa_lr is None and swa.bn_recompute_max_samples is None
    assert swa.swa_start_step == 100 and training.seed == 3  # the other flags still apply
    with pytest.raises(ConfigError, match="seed"):  # not optional: 'none' is no integer
        parse_config(VISION, ["--config", str(path), "--seed", "none"])


def test_a_config_names_its_recipe_and_the_other_recipe_refuses_it(tmp_path):
    path = ROOT / "recipes" / "vision" / "configs" / "smoke.yaml"
    assert "recipe: vision" in path.read_text()
    parse_config(VISION, ["--config", str(path)], recipe="vision")
    with pytest.raises(ConfigError, match=r"^recipe: .*smoke.yaml is a config of the 'vision' recipe, not of 'text'"):
        parse_config(VISION, ["--config", str(path)], recipe="text")


def test_the_last_occurrence_of_a_flag_wins_also_for_none():
    args = (RunArguments, SWAArguments)
    _, swa = parse_config(args, ["--swa_start_step", "3", "--swa_start_step", "none"])
    assert swa.swa_start_step is None
    _, swa = parse_config(args, ["--swa_start_step", "none", "--swa_lr", "0.1", "--swa_start_step", "7"])
    assert swa.swa_start_step == 7 and swa.swa_lr == 0.1
    training, _ = parse_config(args, ["--checkpointing_steps", "3", "--checkpointing_steps=None"])
    assert training.checkpointing_steps is None


def test_an_fsdp_or_deepspeed_request_that_accelerate_dropped_is_refused():
    from accelerate.utils import DistributedType

    from swa_accel.runner.launch import refuse_silent_downgrade

    with pytest.raises(ConfigError, match=r"^launch: the accelerate config asks for FSDP \(distributed_type: FSDP\), "
                                          r"but accelerate set up MULTI_CPU here"):
        refuse_silent_downgrade(DistributedType.MULTI_CPU, {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(ConfigError, match=r"^launch: the accelerate config asks for DeepSpeed"):
        refuse_silent_downgrade(DistributedType.NO, {"ACCELERATE_USE_DEEPSPEED": "true"})
    refuse_silent_downgrade(DistributedType.FSDP, {"ACCELERATE_USE_FSDP": "true"})  # got what it asked for
    refuse_silent_downgrade(DistributedType.MULTI_CPU, {"ACCELERATE_USE_FSDP": "false"})


def test_the_placement_follows_the_launch_and_refuses_what_no_placement_averages():
    from swa_accel.placement import choose_placement

    assert choose_placement("auto", "FSDP", fsdp_version=2) == "sharded"
    assert choose_placement("sharded", "FSDP", fsdp_version=2) == "sharded"
    for distributed_type, stage in (("NO", None), ("MULTI_GPU", None), ("MULTI_CPU", None), ("DEEPSPEED", 2)):
        assert choose_placement("auto", distributed_type, stage) == "main"
        assert choose_placement("sharded", distributed_type, stage) == "sharded"  # each rank: its replica
    with pytest.raises(ValueError, match=r"^swa_placement: FSDP2 shards the weights across ranks, so 'main' would"):
        choose_placement("main", "FSDP", fsdp_version=2)
    with pytest.raises(ValueError, match=r"^swa_placement: FSDP version 1 shards flat parameters, which no "
                                         r"placement averages; the supported placements are 'main' .* and "
                                         r"'sharded' \(FSDP2\): set fsdp_version: 2"):
        choose_placement("auto", "FSDP", fsdp_version=1)
    with pytest.raises(ValueError, match=r"^swa_placement: DeepSpeed ZeRO-3 partitions the weights across ranks, "
                                         r"which no placement averages; the supported placements are"):
        choose_placement("auto", "DEEPSPEED", 3)


SMOKE_YAML = ROOT / "recipes" / "vision" / "configs" / "smoke.yaml"


@pytest.mark.parametrize("key,value,expected", [
    ("num_train_epochs", "2.5", "num_train_epochs: must be a whole number, got 2.5"),
    ("swa_anneal_steps", "1.7", "swa_anneal_steps: must be a whole number, got 1.7"),
    ("swa_start_epoch", "1.5", "swa_start_epoch: must be a whole number, got 1.5"),
    ("learning_rate", "fast", "learning_rate: invalid float value: 'fast'"),  # (argparse converts YAML text)
    ("plot", "1", "plot: must be true or false, got 1"),
    ("label_noise", "[0.1]", "label_noise: must be a number, got [0.1]"),
    ("width", "null", "width: must be a whole number, got None (this field has no 'none')"),
])
def test_a_yaml_value_of_the_wrong_type_is_one_line_naming_the_field(tmp_path, key, value, expected):
    """Values from a YAML file reach the dataclasses without argparse's conversion: they are checked all the same."""
    lines = [line for line in SMOKE_YAML.read_text().splitlines() if not line.startswith(f"{key}:")]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines + [f"{key}: {value}"]) + "\n")
    with pytest.raises(ConfigError) as error:
        parse_config(VISION, ["--config", str(path)])
    assert str(error.value) == expected


def test_dataclasses_built_in_code_are_checked_and_whole_floats_pass_as_ints():
    with pytest.raises(ConfigError, match=r"^num_train_epochs: must be a whole number, got 2.5$"):
        RunArguments(num_train_epochs=2.5)
    with pytest.raises(ConfigError, match=r"^swa_update_every_steps: must be a whole number, got '3'$"):
        SWAArguments(swa_update_every_steps="3")
    run = RunArguments(num_train_epochs=3.0, learning_rate=1, checkpointing_steps=5)
    assert run.num_train_epochs == 3 and isinstance(run.num_train_epochs, int)
    assert run.learning_rate == 1.0 and isinstance(run.learning_rate, float)
    assert run.checkpointing_steps == "5"  # as the command line gives it


@pytest.mark.parametrize("argv,expected", [
    (["--num_epochs", "5"], "num_epochs: unknown option; did you mean num_train_epochs?"),
    (["--swa-lr-typo", "1"], "swa_lr_typo: unknown option; did you mean swa_lr?"),
    (["--zzz", "1"], "zzz: unknown option; --help lists every option"),
    (["--mixed_precision", "bf16"], "mixed_precision: an option of the launcher, not of the recipe; set it in the "
                                    "accelerate config (./run.sh --accelerate_config FILE ...) or before the script "
                                    "(accelerate launch --mixed_precision ... recipes/<recipe>/train.py ...)"),
    (["--accelerate_config", "x.yaml"], "accelerate_config: run.sh reads it only as its first argument: ./run.sh "
                                        "--accelerate_config FILE [config.yaml] [--key value ...]"),
])
def test_an_unknown_option_names_itself_and_the_fix(argv, expected):
    with pytest.raises(ConfigError) as error:
        parse_config(VISION, ["--config", str(SMOKE_YAML), *argv])
    assert str(error.value) == expected


def test_console_lines_and_warnings_before_a_wasted_run():
    from swa_accel.runner.console import evaluation_line, plan_line, plan_warnings
    from swa_accel.timeline import plan_run

    swa = SWAArguments(swa_start_epoch=1, swa_lr=0.05)
    plan = plan_run(8, swa, num_epochs=3)
    assert plan_line(plan, swa) == ("plan: 24 optimizer steps (3 epochs of 8); swa averaging from step 8 (epoch 1), "
                                    "at each epoch end: 2 updates at swa_lr 0.05")
    assert plan_warnings(plan, swa) == []
    ema = SWAArguments(swa_method="ema", swa_start_epoch=1, swa_lr=0.05)
    assert plan_warnings(plan_run(8, ema, num_epochs=3), ema) == [
        "warning: ema_decay 0.999 averages over about 1000 updates, but the plan gives 2: the first update keeps 100% "
        "of the weight, so the EMA is about the weights after step 16; lower ema_decay (e.g. 0.5), set ema_warmup "
        "true, or average more often (swa_update_every_steps)"]
    late = SWAArguments(swa_start_epoch=2)
    assert plan_warnings(plan_run(8, late, num_epochs=3), late)[0].startswith(
        "warning: the plan gives 1 averaging update(s): the average is the weights of a single step")
    results = {"base": {"validation": {"accuracy": 0.5, "nll": 1.25}, "test": {"accuracy": 0.7, "nll": 0.9}},
               "swa": {"validation": {"accuracy": 0.625, "nll": 1.0}}}
    assert evaluation_line(results, 16, 2, "validation", "accuracy") == (
        "epoch 2 (step 16): validation accuracy base 0.5000, swa 0.6250; nll base 1.2500, swa 1.0000")


def test_the_process_count_the_launch_asked_for_is_read_from_its_command_line():
    accelerate = ["/venv/bin/python", "/venv/bin/accelerate", "launch"]
    script = ["recipes/vision/train.py", "--num_processes", "7"]  # the script's own arguments are not the launch's
    assert requested_processes([*accelerate, "--num_processes", "2", *script]) == (2, "--num_processes 2")
    two = str(Path(launch_module.__file__).parents[2] / "accelerate_configs" / "cpu_2proc.yaml")
    quiet = ["python", "swa_accel/runner/quiet_launch.py", "launch"]  # run.sh's launcher
    assert requested_processes([*quiet, "--config_file", two, *script]) == (2, f"num_processes: 2 in {two}")
    # Not an accelerate launch, or one it cannot parse: nothing to compare.
    assert requested_processes(["torchrun", "--nproc_per_node", "2", *script]) is None
    assert requested_processes([*accelerate, "--no_such_flag", *script]) is None
    assert requested_processes([*accelerate, *script]) is None  # no count asked for (no config file)

    warning = process_count_warning(1, [*accelerate, "--num_processes", "2", *script])
    assert warning.startswith("warning: the launch asked for 2 processes (--num_processes 2) but this run has 1; ")
    assert "--config_file accelerate_configs/cpu_2proc.yaml" in warning
    assert process_count_warning(2, [*quiet, "--config_file", two, *script]) is None
