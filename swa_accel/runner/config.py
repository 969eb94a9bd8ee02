"""The recipes' typed run configuration: dataclasses filled from a recipe YAML, then `--key value` overrides.

The parsing itself is `transformers.HfArgumentParser`; this module only adds the YAML layer,
rejects unknown keys by name, answers --help and turns every config error into one line. It imports transformers
only inside `parse_config`, so that run.sh's early check (early_check.py) can use the rest without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..arguments import SWAArguments  # noqa: F401  (the recipes' configs name it beside RunArguments)
from ..errors import ConfigError, first_line
from ..field_types import check_field_types
from .preemption import signal_number
from .recipe_options import options_help, read_classes


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class RunArguments:
    """Loop, optimiser and bookkeeping settings shared by every recipe (named apart from transformers'
    `TrainingArguments`, whose fields differ)."""

    output_dir: str = _help("Where checkpoints, metrics and final models go.", default="outputs/run")
    overwrite_output_dir: bool = _help("Start afresh in an output_dir that already holds a run, deleting its "
                                       "checkpoints and final models.", default=False)
    seed: int = _help("Seeds Python, NumPy and torch (model init, shuffling, augmentation).", default=0)
    num_train_epochs: int = _help("Training budget in epochs (ignored when max_train_steps is set).", default=3)
    max_train_steps: Optional[int] = _help("Training budget in optimizer steps; overrides num_train_epochs.", default=None)
    per_device_train_batch_size: int = _help("Micro-batch size on each process.", default=32)
    per_device_eval_batch_size: int = _help("Evaluation batch size on each process.", default=256)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    optimizer: str = _help("sgd or adamw.", default="sgd")
    learning_rate: float = _help("Peak learning rate of the pre-SWA schedule.", default=0.1)
    momentum: float = _help("SGD momentum.", default=0.9)
    weight_decay: float = _help("Weight decay.", default=0.0)
    no_decay_on_bias_and_norm: bool = _help("Exclude biases and norm-layer weights from weight decay.", default=False)
    adam_beta1: float = _help("AdamW beta1.", default=0.9)
    adam_beta2: float = _help("AdamW beta2.", default=0.999)
    adam_epsilon: float = _help("AdamW epsilon.", default=1e-8)
    model_dtype: str = _help("Weight dtype of the trained model: float32 or bfloat16 (the average stays fp32).",
                             default="float32")
    sync_batchnorm: bool = _help(
        "On a multi-process launch, normalise BatchNorm layers with the statistics of the global batch (all "
        "processes' micro-batches) in training, as timm's --sync-bn; false: each process's own micro-batch, as DDP "
        "does. One process: nothing changes. See docs/batchnorm.md.", default=False)
    max_grad_norm: Optional[float] = _help("Clip gradients to this norm; None disables clipping.", default=None)
    lr_scheduler_type: str = _help("Pre-SWA schedule: cosine, linear, constant or one_cycle.", default="cosine")
    num_warmup_steps: int = _help("Linear warmup in optimizer steps.", default=0)
    eval_every_epochs: int = _help("Evaluate every N epochs (the last epoch is always evaluated).", default=1)
    eval_steps: Optional[int] = _help("Evaluate every N optimizer steps instead of per epoch.", default=None)
    checkpointing_steps: Optional[str] = _help("'epoch', an integer number of optimizer steps, or None.", default="epoch")
    checkpoints_total_limit: int = _help("Keep only the newest K checkpoints.", default=2)
    resume_from_checkpoint: Optional[str] = _help(
        "'latest', a checkpoint folder, or 'auto': the latest checkpoint when there is one, else a fresh start (one "
        "job script for the first start and every requeue or restart).", default=None)
    choose_from_store: bool = _help(
        "Train nothing: the finished run in output_dir (its last checkpoint and snapshots/) has every candidate of "
        "this config's store families and later starts scored on validation, and the chosen one exported into "
        "output_dir/chosen (final/ stays as it was). See docs/every_average.md.", default=False)
    stop_after_step: Optional[int] = _help(
        "End this run right after this optimizer step, with a checkpoint, as a preemption would; "
        "continue later with --resume_from_checkpoint latest.", default=None)
    logging_steps: int = _help("Read the training loss (averaged over ranks and steps) every N optimizer steps, "
                               "for the progress bar and the trackers; the steps between never wait on the device.",
                               default=10)
    data_placement: str = _help("Where decoded image tensors live: auto (on the training device when they take at "
                                "most a quarter of its free memory, else host memory), device, or host.",
                                default="auto")
    report_to: str = _help("Accelerate trackers: none, all, or a comma list (tensorboard, wandb, ...).", default="none")
    dataloader_num_workers: int = _help("DataLoader worker processes.", default=0)
    plot: bool = _help("Write curves.png at the end.", default=True)
    verbose: bool = _help(
        "Show the libraries' own progress bars, load reports and known-harmless warnings (quieted by default; "
        "TRANSFORMERS_VERBOSITY, DATASETS_VERBOSITY or HF_DATASETS_DISABLE_PROGRESS_BARS, when set, are obeyed).",
        default=False)
    stop_signal: Optional[str] = _help(
        "A signal that stops the run cleanly, as SIGTERM does: every rank finishes the same optimizer step (at the "
        "next logging step), a checkpoint is saved and the run exits with status 143. SLURM's --signal=USR1@120 "
        "sends the default. none: SIGTERM only.", default="SIGUSR1")
    divergence_bound: float = _help(
        "A weight larger than this in magnitude counts as diverged, like a NaN: nothing past it is checkpointed or "
        "exported.", default=1e6)

    def __post_init__(self) -> None:
        check_field_types(self)
        positive = ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "eval_every_epochs", "checkpoints_total_limit", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_steps", "eval_steps", "stop_after_step"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1 when set, got {value}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer: must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.model_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model_dtype: must be float32 or bfloat16, got {self.model_dtype!r}")
        if self.lr_scheduler_type not in ("cosine", "linear", "constant", "one_cycle"):
            raise ConfigError(
                f"lr_scheduler_type: must be cosine, linear, constant or one_cycle, got {self.lr_scheduler_type!r}"
            )
        if self.data_placement not in ("auto", "device", "host"):
            raise ConfigError(f"data_placement: must be auto, device or host, got {self.data_placement!r}")
        if self.num_warmup_steps < 0:
            raise ConfigError(f"num_warmup_steps: must be >= 0, got {self.num_warmup_steps}")
        if self.checkpointing_steps in ("None", "none", ""):
            self.checkpointing_steps = None
        if self.checkpointing_steps not in (None, "epoch") and not (
            str(self.checkpointing_steps).isdigit() and int(self.checkpointing_steps) > 0
        ):
            raise ConfigError(
                f"checkpointing_steps: must be 'epoch', a positive integer or None, got {self.checkpointing_steps!r}"
            )
        if self.stop_signal in ("None", "none", ""):
            self.stop_signal = None
        if self.stop_signal is not None:
            try:
                signal_number(self.stop_signal)
            except ValueError:
                raise ConfigError(f"stop_signal: no signal named {self.stop_signal!r} here; e.g. SIGUSR1, SIGUSR2, "
                                  "or none") from None
        if not self.divergence_bound > 0:
            raise ConfigError(f"divergence_bound: must be > 0, got {self.divergence_bound}")
        if self.resume_from_checkpoint in ("None", "none", ""):
            self.resume_from_checkpoint = None


class OneLineErrors:
    """An argparse parser mixin whose errors raise ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # argparse calls this for unknown or malformed flags
        # "argument --num_train_epochs/--num-train-epochs: invalid int value: 'abc'" -> "num_train_epochs: ..."
        named = re.match(r"^argument --([A-Za-z0-9_]+)(?:/--[A-Za-z0-9_-]+)?: (.*)$", message)
        raise ConfigError(f"{named.group(1)}: {named.group(2)}" if named else message)


def one_line_parser(dataclass_types: tuple[type, ...]) -> Any:
    """transformers.HfArgumentParser for these dataclasses, with one-line errors."""
    from transformers import HfArgumentParser  # (here: transformers takes a second or more to import)

    class OneLineArgumentParser(OneLineErrors, HfArgumentParser):
        pass

    return OneLineArgumentParser(dataclass_types)


#: Set to 1 to see the full traceback instead of the one-line error.
TRACEBACK_VARIABLE = "SWA_ACCEL_TRACEBACK"
#: The YAML key that names the recipe a config belongs to, so that run.sh finds the script wherever the file is.
RECIPE_KEY = "recipe"
#: Command-line words that unset an optional value.
UNSET_WORDS = ("none", "null")


#: Options of `accelerate launch` (and run.sh's --accelerate_config) that users pass to a recipe by mistake.
LAUNCHER_OPTIONS = ("accelerate_config", "config_file", "mixed_precision", "num_processes", "num_machines",
                    "machine_rank", "main_process_ip", "main_process_port", "gpu_ids", "dynamo_backend", "multi_gpu",
                    "cpu", "use_fsdp", "use_deepspeed", "max_restarts", "same_network", "rdzv_backend")


def unknown_option(name: str, known: set[str], where: str = "option") -> ConfigError:
    """One line for an option no dataclass has: the launcher's, or the closest known one."""
    if name == "accelerate_config":
        return ConfigError("accelerate_config: run.sh reads it only as its first argument: ./run.sh "
                           "--accelerate_config FILE [config.yaml] [--key value ...]")
    if name in LAUNCHER_OPTIONS:
        return ConfigError(f"{name}: an option of the launcher, not of the recipe; set it in the accelerate config "
                           f"(./run.sh --accelerate_config FILE ...) or before the script (accelerate launch --{name} "
                           "... recipes/<recipe>/train.py ...)")
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; --help lists every option"
    return ConfigError(f"{name}: unknown {where}{hint}")


def check_option_names(argv: list[str], known: set[str]) -> None:
    """Refuses the first `--name` on the command line that no dataclass field (nor --config) has."""
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name = token[2:].partition("=")[0].replace("-", "_")
            if name not in known and name != "config":
                raise unknown_option(name, known)


def field_names(dataclass_types: tuple[type, ...]) -> set[str]:
    return {f.name for dtype in dataclass_types for f in dataclasses.fields(dtype)}


def optional_field_names(dataclass_types: tuple[type, ...]) -> set[str]:
    """Fields typed `Optional[...]`: the ones `--key none` may unset."""
    names = set()
    for dtype in dataclass_types:
        hints = typing.get_type_hints(dtype)
        names |= {f.name for f in dataclasses.fields(dtype) if type(None) in typing.get_args(hints[f.name])}
    return names


def split_unset_flags(argv: list[str], optional: set[str]) -> tuple[list[str], list[str]]:
    """Takes `--key none` / `--key=null` for optional fields out of `argv`; returns (rest, keys to unset).

    argparse would convert 'none' with the field's type (int('none') fails), so these are applied as
    parser defaults instead, after the YAML values. As with any flag, the last occurrence of a key wins:
    an unset drops the key's earlier values, and a later value overrides an earlier unset.
    """
    occurrences = []  # (name, first token index, token count, unsets)
    i = 0
    while i < len(argv):
        token = argv[i]
        name, sep, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        name = name.replace("-", "_")
        if name in optional:
            has_next_value = not sep and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value = value if sep else (argv[i + 1] if has_next_value else "")
            count = 2 if has_next_value else 1
            occurrences.append((name, i, count, value.lower() in UNSET_WORDS))
            i += count
            continue
        i += 1
    last = {name: unsets for name, _, _, unsets in occurrences}
    dropped = set()
    for name, start, count, unsets in occurrences:
        if unsets or last[name]:
            dropped.update(range(start, start + count))
    rest = [token for index, token in enumerate(argv) if index not in dropped]
    return rest, [name for name, unsets in last.items() if unsets]


def wants_help(argv: list[str]) -> bool:
    return any(token in ("-h", "--help") for token in argv)


def recipe_help(dataclass_types: tuple[type, ...], recipe: Optional[str], usage: str) -> str:
    """The --help text: every option of these dataclasses with its type, default and help, read from their source
    (the same reading run.sh's early check does, so both list the same)."""
    return options_help(read_classes(dataclass_types), usage=usage, description=help_description(recipe))


def help_description(recipe: Optional[str]) -> str:
    name = f"the {recipe} recipe" if recipe else "this recipe"
    return (f"Options of {name}. Each one is a key of the config file or a --key value override on the command "
            "line (which wins).")


def split_config_flag(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """(`--config FILE` or None, the other arguments)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    return known.config, rest


def config_file_values(path: str, known: set[str], recipe: Optional[str] = None) -> dict[str, Any]:
    """A config file's values, refused in one line when its `recipe:` key names another recipe than `recipe` or a key
    is not one of the `known` options."""
    values = load_yaml(path)
    named = values.pop(RECIPE_KEY, None)
    if named is not None and recipe is not None and named != recipe:
        raise ConfigError(f"recipe: {path} is a config of the {named!r} recipe, not of {recipe!r}")
    unknown = sorted(set(values) - known)
    if unknown:
        raise unknown_option(unknown[0], known, f"key in {path}")
    return values


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a recipe YAML file into a flat dict, naming the file in every error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config: '{path}' is not valid YAML ({first_line(error)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: '{path}' must be a mapping of key: value")
    return data


def parse_config(dataclass_types: tuple[type, ...], argv: list[str], recipe: Optional[str] = None) -> tuple[Any, ...]:
    """Fills the dataclasses from `--config FILE.yaml` and then `--key value` overrides.

    `--key none` (or `null`) unsets an optional value, also one the YAML file sets.

    Args:
        dataclass_types: the recipe's argument dataclasses, e.g. (VisionDataArguments, ModelArguments,
            RunArguments, SWAArguments).
        argv: command-line arguments without the program name.
        recipe: the calling recipe's name; a YAML `recipe:` key must match it.

    Returns:
        One instance per dataclass type, in order.

    Raises:
        ConfigError: unknown key in the YAML or on the command line, or a value a dataclass rejects.
        SystemExit: with status 0, after printing every option, for `-h` or `--help`.
    """
    if wants_help(argv):
        print(recipe_help(dataclass_types, recipe, usage=f"{sys.argv[0]} --config FILE.yaml [--key value ...]"))
        raise SystemExit(0)
    config, rest = split_config_flag(argv)
    parser = one_line_parser(dataclass_types)
    if config is not None:
        # Argparse converts string defaults with the field's type, so YAML's '1e-3' still becomes a float.
        parser.set_defaults(**config_file_values(config, field_names(dataclass_types), recipe))
    check_option_names(rest, field_names(dataclass_types))
    rest, unset = split_unset_flags(rest, optional_field_names(dataclass_types))
    parser.set_defaults(**{name: None for name in unset})
    try:
        return tuple(parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False))
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(first_line(error)) from None


def resolved_config(configs: tuple[Any, ...]) -> dict[str, Any]:
    """Flattens parsed dataclasses into one dict, as written to the run's config.yaml."""
    merged: dict[str, Any] = {}
    for config in configs:
        merged.update(dataclasses.asdict(config))
    return merged
