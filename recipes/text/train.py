"""Text recipe: SWA for sequence classification with any transformers encoder (BERT / RoBERTa / DeBERTa ...).

Run:  accelerate launch --config_file accelerate_configs/cpu.yaml recipes/text/train.py \
          --config recipes/text/configs/wordnet_sentiment_minilm.yaml [--key value ...]
The recipe only says how to get the data, build the model and save it; swa_accel does the rest.
Padding follows the device: lengths rounded up to multiples of 8 on CUDA GPUs, static max_length batches
(and no short last training batch) under XLA; --pad_to_max_length true/false forces static shapes on/off.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# The recipes run as plain scripts under `accelerate launch`; put the repo root on the path so
# that `swa_accel` and `recipes` import without installing anything.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from swa_accel import SWAArguments  # noqa: E402
from swa_accel.runner import RunArguments, Task, make_accelerator, parse_config  # noqa: E402
from swa_accel.runner.cli import run_recipe  # noqa: E402
from swa_accel.runner.config import first_line, resolved_config  # noqa: E402
from swa_accel.field_types import check_field_types  # noqa: E402
from swa_accel.runner.xla import is_xla  # noqa: E402

from recipes.model_config import ModelFactory, load_model_config, parse_overrides, saver_with  # noqa: E402
from recipes.text import static_attention  # noqa: E402
from recipes.text.data import TextDataArguments, load_text_data, padding_plan  # noqa: E402

#: GLUE reports Matthews correlation for CoLA; every task also gets accuracy, F1 (macro for >2
#: classes), NLL and expected calibration error.
BASE_METRICS = ("accuracy", "f1", "nll", "ece")
EXTRA_METRICS = {"cola": ("matthews_correlation",)}


@dataclass
class TextModelArguments:
    """How the model is built from `model_name_or_path` (which lives in the data arguments)."""

    dropout_off: bool = field(
        default=False,
        metadata={"help": "Set every dropout probability of the model config to 0 (deterministic training)."},
    )
    train_from_scratch: bool = field(
        default=False,
        metadata={"help": "Randomly initialise from the checkpoint's config (plus config_overrides) instead of "
                          "loading its weights; the tokenizer still comes from model_name_or_path."},
    )
    config_overrides: Optional[str] = field(
        default=None,
        metadata={"help": "Comma list of config fields to change, e.g. 'hidden_size=32,num_hidden_layers=2'."},
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.config_overrides is not None and self.config_overrides.strip().lower() in ("", "none"):
            self.config_overrides = None
        self.overrides()  # fail at parse time on a malformed list

    def overrides(self) -> dict[str, str]:
        """`config_overrides` as {field: raw value}."""
        return parse_overrides(self.config_overrides)


def task_metrics(dataset_config_name: Optional[str]) -> tuple[str, ...]:
    """Metric names for a task: the GLUE ones (Matthews correlation for CoLA) plus NLL and ECE."""
    return BASE_METRICS + EXTRA_METRICS.get(dataset_config_name or "", ())


def device_padding_plan(accelerator, data_args: TextDataArguments) -> tuple[bool, Optional[int]]:
    """`padding_plan` for the accelerator's device: (static_shapes, pad_to_multiple_of)."""
    return padding_plan(
        data_args.pad_to_max_length,
        is_xla=is_xla(accelerator),
        is_cuda=accelerator.device.type == "cuda",
    )


def setup(argv: list[str]):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data_args, model_args, training, swa = parse_config(
        (TextDataArguments, TextModelArguments, RunArguments, SWAArguments), argv, recipe="text"
    )
    accelerator = make_accelerator(training)
    path = data_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"model_name_or_path: cannot load a tokenizer from {path!r}: {first_line(error)}") from None
    static_shapes, pad_to_multiple_of = device_padding_plan(accelerator, data_args)
    data = load_text_data(data_args, tokenizer, main_process_first=accelerator.main_process_first,
                          pad_to_multiple_of=pad_to_multiple_of, static_shapes=static_shapes)
    model_config = load_model_config(path, data.label_names, model_args.overrides(), model_args.dropout_off)
    # Under XLA, SDPA that never asks the device whether it may skip the padding mask (static_attention.py).
    attention = {"attn_implementation": static_attention.register()} if is_xla(accelerator) else {}
    model_factory = ModelFactory(AutoModelForSequenceClassification, path, model_config,
                                 model_args.train_from_scratch, **attention)

    metric_names = task_metrics(data_args.dataset_config_name)
    task = Task(build_model=model_factory, train_dataset=data.train, eval_datasets=data.evals,
                save_model=saver_with(tokenizer), collate_fn=data.collate_fn, metric_names=metric_names,
                primary_metric="accuracy", drop_last=data.drop_last,
                random_transforms=False,  # tokenized rows are fixed: no per-sample RNG to seed
                # Selection (among SWA candidates) reads the dataset's validation split, when it is evaluated.
                validation_split="validation" if "validation" in data.evals else None)
    config = resolved_config((data_args, model_args, training, swa))
    config["label_names"] = list(data.label_names)
    # What pad_to_max_length=None resolved to on this device, so config.yaml shows what actually ran.
    config["static_shapes"], config["pad_to_multiple_of"] = static_shapes, pad_to_multiple_of
    return task, training, swa, accelerator, config


def main() -> None:
    """Trains with the command line's arguments; accelerate's TPU launcher imports this file and calls it."""
    run_recipe(setup)


if __name__ == "__main__":
    main()
