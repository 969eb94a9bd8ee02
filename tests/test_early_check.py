"""run.sh's early config check (swa_accel/runner/early_check.py): it reads the recipes' options from their source and
refuses a bad config with the recipe's own line, without importing torch, transformers or datasets."""

import dataclasses
import subprocess
import sys
import typing

import pytest

from swa_accel.runner import early_check
from swa_accel.runner.config import ConfigError, RunArguments, SWAArguments, one_line_parser, parse_config
from swa_accel.runner.recipe_options import recipe_options
from tests.helpers.launch import ROOT

VISION = ROOT / "recipes" / "vision" / "train.py"
TEXT = ROOT / "recipes" / "text" / "train.py"
SMOKE = ROOT / "recipes" / "vision" / "configs" / "smoke.yaml"


def vision_classes():
    from recipes.vision.data import VisionDataArguments
    from recipes.vision.model_setup import VisionModelArguments

    return (VisionDataArguments, VisionModelArguments, RunArguments, SWAArguments)


def text_classes():
    from recipes.text.data import TextDataArguments
    from recipes.text.train import TextModelArguments

    return (TextDataArguments, TextModelArguments, RunArguments, SWAArguments)


@pytest.mark.parametrize("script,classes,recipe", [(VISION, vision_classes, "vision"), (TEXT, text_classes, "text")])
def test_the_source_reading_finds_every_field_with_its_help_and_optional_type(script, classes, recipe):
    named, read = recipe_options(script)
    assert named == recipe
    real = classes()
    assert [c.name for c in read] == [dtype.__name__ for dtype in real]
    for option_class, dtype in zip(read, real):
        fields = dataclasses.fields(dtype)
        assert [f.name for f in option_class.fields] == [f.name for f in fields]
        assert [f.help for f in option_class.fields] == [f.metadata.get("help", "") for f in fields]
        hints = typing.get_type_hints(dtype)
        assert {f.name for f in option_class.fields if f.optional} == \
            {f.name for f in fields if type(None) in typing.get_args(hints[f.name])}
    defaults = {f.name: f.default_text for c in read for f in c.fields}
    if recipe == "vision":
        assert defaults["dataset_name"] == "'digits'" and defaults["swa_start_fraction"] == "0.75"


@pytest.mark.parametrize("argv", [
    [], ["--plot", "false", "--seed", "3", "--no_decay_on_bias_and_norm"], ["--no_plot", "--max_train_steps", "7"],
    ["--swa_lr", "0.01,0.02", "--ema_warmup", "--swa_start_epoch", "2"], ["--learning-rate", "1e-3"],
    ["--verbose", "yes", "--stop_signal", "none", "--checkpointing_steps", "5"],
])
def test_the_light_parser_reads_the_runners_options_as_hf_argument_parser(argv):
    light, _ = early_check.light_parser([RunArguments, SWAArguments]).parse_known_args(argv)
    hf, _ = one_line_parser((RunArguments, SWAArguments)).parse_known_args(argv)
    assert vars(light) == vars(hf)


@pytest.mark.parametrize("argv", [
    ["--num_epochs", "5"], ["--swa_lr", "0"], ["--num_train_epochs", "abc"], ["--plot", "maybe"],
    ["--learning_rate", "-1"], ["--max_train_samples", "64", "--per_device_train_batch_size", "0"],
    ["--optimizer", "lion"], ["--swa_start_candidates", "1,0.5"], ["--mixed_precision", "bf16"],
])
def test_the_early_check_refuses_with_the_recipes_own_line(argv, capsys):
    with pytest.raises(ConfigError) as refused:
        parse_config(vision_classes(), ["--config", str(SMOKE), *argv], recipe="vision")
    assert early_check.main([str(VISION), "--config", str(SMOKE), *argv]) == 1
    assert capsys.readouterr().err == f"error: {refused.value}\n"


def test_the_early_check_passes_a_good_config_and_imports_no_heavy_library():
    result = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "swa_accel" / "runner" / "early_check.py"),
                             str(VISION), "--config", str(SMOKE), "--max_train_samples", "64", "--swa_lr", "none"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == ""
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
    assert "yaml" in imported and not imported & {"torch", "transformers", "datasets", "accelerate", "numpy"}
