"""Typed run configuration: dataclasses filled from a recipe YAML, then `--key value` overrides.

The parsing itself is `transformers.HfArgumentParser`; this module only adds the YAML layer,
rejects unknown keys by name and turns every config error into one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from transformers import HfArgumentParser

from .errors import ConfigError, first_line
from .field_types import check_field_types
from .preemption import signal_number


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


@dataclass
class SWAArguments:
    """When and how weights are averaged, and how the LR behaves during averaging."""

    swa_method: str = _help("swa (equal weights), ema, or none (plain training).", default="swa")
    swa_start_fraction: float = _help("Start averaging after this fraction of the optimizer steps.", default=0.75)
    swa_start_epoch: Optional[int] = _help("Start averaging at this epoch (0-based); overrides the fraction.", default=None)
    swa_start_step: Optional[int] = _help("Start averaging at this optimizer step; overrides the fraction.", default=None)
    # (Typed str for the command line; it holds a float, or a list of floats, once parsed.)
    swa_lr: Optional[str] = _help(
        "Constant LR of the SWA phase, as torch's SWALR: one rate for every param group, or one per group "
        "('0.05,0.01'); the anneal starts from the last rate used. None keeps the pre-SWA schedule.", default=None)
    swa_anneal_steps: Optional[int] = _help("Steps of the anneal to swa_lr; None means one epoch of steps.", default=None)
    swa_anneal_strategy: str = _help("cos or linear anneal to swa_lr.", default="cos")
    swa_update_every_steps: Optional[int] = _help("Average every N optimizer steps; None averages at each epoch end.",
                                                  default=None)
    ema_decay: float = _help("EMA decay per averaging update.", default=0.999)
    ema_warmup: bool = _help("Use min(ema_decay, (1 + n) / (10 + n)) so early EMA is not stuck at init.", default=False)
    ema_buffers: str = _help("EMA buffers: average or copy.", default="average")
    swa_start_candidates: Optional[str] = _help(
        "One run, many averages: later starts whose averages are kept beside the main one and chosen from at the "
        "end on the validation split. 'every_epoch' (each epoch from the SWA start), 'every_2_epochs' (or any N), "
        "epochs ('12,16,20') or "
        "fractions of the budget ('0.5,0.75'); the SWA start itself is always the first candidate. "
        "One averaged copy per candidate, no extra work per update.", default=None)
    ema_decays: Optional[str] = _help(
        "Side EMAs of the same averaging updates, as more candidates ('0.9,0.99'; decay per update), "
        "one fp32 copy each.", default=None)
    selection_metric: str = _help(
        "Validation metric that picks the exported candidate: nll or ece (lower is better), accuracy or f1 "
        "(higher is better).", default="nll")
    swa_placement: str = _help(
        "Where the fp32 average lives. auto: 'sharded' under FSDP2, else 'main'. main: one copy on the main "
        "process. sharded: every rank averages its own shards (FSDP2; under DDP each rank averages its replica).",
        default="auto")
    swa_offload_to_cpu: bool = _help("Keep the averaged copy in CPU memory.", default=False)
    bn_recompute_max_samples: Optional[int] = _help(
        "Training samples (all ranks together) of the BN recompute before an intermediate evaluation or "
        "checkpoint, drawn at random; precise-BN work finds 10^3 to 10^4 enough. The final export always uses "
        "a full pass. None: always full.",
        default=4096)
    bn_recompute_batch_size: Optional[int] = _help(
        "Per-process batch size of the BN recompute's forwards. They keep no gradients, so they can be as large as "
        "evaluation batches; each batch's mean and unbiased variance estimate the data's at any batch size, and "
        "larger batches need fewer forwards. None: the training batch size (what torch's update_bn over the "
        "train loader uses).", default=None)

    def __post_init__(self) -> None:
        # (The three lists normalise themselves below: one value, a comma string or a YAML list.)
        check_field_types(self, skip=frozenset({"swa_lr", "swa_start_candidates", "ema_decays"}))
        if self.swa_method not in ("swa", "ema", "none"):
            raise ConfigError(f"swa_method: must be swa, ema or none, got {self.swa_method!r}")
        if not 0.0 <= self.swa_start_fraction < 1.0:
            raise ConfigError(f"swa_start_fraction: must be in [0, 1), got {self.swa_start_fraction}")
        if self.swa_start_epoch is not None and self.swa_start_step is not None:
            raise ConfigError("swa_start_epoch: set either swa_start_epoch or swa_start_step, not both")
        for name in ("swa_start_epoch", "swa_start_step"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name}: must be >= 0, got {value}")
        self.swa_lr = _rates(self.swa_lr)
        if self.swa_anneal_steps is not None and self.swa_anneal_steps < 0:
            raise ConfigError(f"swa_anneal_steps: must be >= 0, got {self.swa_anneal_steps}")
        if self.swa_anneal_strategy not in ("cos", "linear"):
            raise ConfigError(f"swa_anneal_strategy: must be cos or linear, got {self.swa_anneal_strategy!r}")
        if self.swa_update_every_steps is not None and self.swa_update_every_steps < 1:
            raise ConfigError(f"swa_update_every_steps: must be >= 1, got {self.swa_update_every_steps}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: must be in (0, 1), got {self.ema_decay}")
        if self.ema_buffers not in ("average", "copy"):
            raise ConfigError(f"ema_buffers: must be average or copy, got {self.ema_buffers!r}")
        self.swa_start_candidates = _comma_list(self.swa_start_candidates)
        self.ema_decays = _comma_list(self.ema_decays)
        self.start_candidates_spec()  # validates
        for decay in self.ema_decay_values():
            if not 0.0 < decay < 1.0:
                raise ConfigError(f"ema_decays: each decay must be in (0, 1), got {decay}")
        # (With swa_method none nothing is averaged, and a config's candidates are simply unused.)
        if (self.swa_start_candidates or self.ema_decays) and self.swa_method == "ema":
            raise ConfigError(f"swa_start_candidates: candidates are averages of an SWA run; swa_method is "
                              f"{self.swa_method!r}: pass --swa_start_candidates none --ema_decays none, or "
                              "--swa_method swa")
        if self.selection_metric not in SELECTION_METRICS:
            raise ConfigError(f"selection_metric: must be one of {', '.join(SELECTION_METRICS)}, "
                              f"got {self.selection_metric!r}")
        if self.swa_placement not in ("auto", "main", "sharded"):
            raise ConfigError(f"swa_placement: must be auto, main or sharded, got {self.swa_placement!r}")
        if self.bn_recompute_batch_size is not None and self.bn_recompute_batch_size < 1:
            raise ConfigError(f"bn_recompute_batch_size: must be >= 1, got {self.bn_recompute_batch_size}")
        if self.bn_recompute_max_samples is not None and self.bn_recompute_max_samples < 1:
            raise ConfigError(f"bn_recompute_max_samples: must be >= 1, got {self.bn_recompute_max_samples}")

    @property
    def enabled(self) -> bool:
        return self.swa_method != "none"

    def start_candidates_spec(self) -> tuple[str, tuple[float, ...]]:
        """('none' | 'every_epoch' (values: the spacing) | 'epochs' | 'fractions', values) from `swa_start_candidates`."""
        text = self.swa_start_candidates
        if text is None:
            return "none", ()
        if text == "every_epoch":
            return "every_epoch", (1.0,)
        every = re.fullmatch(r"every_([1-9][0-9]*)_epochs", text)
        if every:
            return "every_epoch", (float(every.group(1)),)
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise ConfigError(f"swa_start_candidates: must be every_epoch, every_N_epochs or a list of epochs or fractions, "
                              f"got {text!r}") from None
        if all(v.is_integer() and v >= 0 and "." not in t for v, t in zip(values, text.split(","))):
            return "epochs", values
        if all(0.0 < v < 1.0 for v in values):
            return "fractions", values
        raise ConfigError(f"swa_start_candidates: list whole epochs (>= 0) or fractions in (0, 1), not a mix; "
                          f"got {text!r}")

    def swa_lr_values(self) -> tuple[float, ...]:
        """`swa_lr` as a tuple: one rate, or one per param group (empty when None)."""
        if self.swa_lr is None:
            return ()
        return tuple(self.swa_lr) if isinstance(self.swa_lr, list) else (self.swa_lr,)

    def ema_decay_values(self) -> tuple[float, ...]:
        if self.ema_decays is None:
            return ()
        try:
            return tuple(float(v) for v in self.ema_decays.split(","))
        except ValueError:
            raise ConfigError(f"ema_decays: must be a list of decays such as 0.9,0.99, got {self.ema_decays!r}") \
                from None


#: Metrics `selection_metric` may name, and whether higher is better.
SELECTION_METRICS = {"nll": False, "ece": False, "accuracy": True, "f1": True}


def _comma_list(value: Any) -> Optional[str]:
    """A YAML list or a comma-separated string, as one normalised comma string (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    text = ",".join(part.strip() for part in str(value).split(",") if part.strip())
    return text or None


def _rates(value: Any) -> Any:
    """`swa_lr` from the command line, YAML or code: None, one rate (a float) or one per param group (a list)."""
    text = _comma_list(value)
    if text is None:
        return None
    try:
        rates = [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"swa_lr: must be a rate or a list of rates such as 0.05,0.01, got {value!r}") from None
    for rate in rates:
        if not rate > 0:
            raise ConfigError(f"swa_lr: must be > 0, got {rate}")
    return rates[0] if len(rates) == 1 else rates


class _OneLineArgumentParser(HfArgumentParser):
    """HfArgumentParser whose errors raise ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # argparse calls this for unknown or malformed flags
        # "argument --num_train_epochs/--num-train-epochs: invalid int value: 'abc'" -> "num_train_epochs: ..."
        named = re.match(r"^argument --([A-Za-z0-9_]+)(?:/--[A-Za-z0-9_-]+)?: (.*)$", message)
        raise ConfigError(f"{named.group(1)}: {named.group(2)}" if named else message)


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
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = _OneLineArgumentParser(dataclass_types)
    if known.config is not None:
        values = load_yaml(known.config)
        named = values.pop(RECIPE_KEY, None)
        if named is not None and recipe is not None and named != recipe:
            raise ConfigError(f"recipe: {known.config} is a config of the {named!r} recipe, not of {recipe!r}")
        unknown = sorted(set(values) - field_names(dataclass_types))
        if unknown:
            raise unknown_option(unknown[0], field_names(dataclass_types), f"key in {known.config}")
        # Argparse converts string defaults with the field's type, so YAML's '1e-3' still becomes a float.
        parser.set_defaults(**values)
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
