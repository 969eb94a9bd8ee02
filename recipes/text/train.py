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
from typing import Any, Optional

# The recipes run as plain scripts under `accelerate launch`; put the repo root on the path so
# that `swa_accel` and `recipes` import without installing anything.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from swa_accel import SWAArguments, Task, RunArguments, make_accelerator, parse_config  # noqa: E402
from swa_accel.cli import run_recipe  # noqa: E402
from swa_accel.config import ConfigError, first_line, resolved_config  # noqa: E402
from swa_accel.field_types import check_field_types  # noqa: E402
from swa_accel.xla import is_xla  # noqa: E402

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
        if not self.config_overrides:
            return {}
        pairs = {}
        for item in self.config_overrides.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ConfigError(f"config_overrides: expected key=value items separated by commas, got {item!r}")
            pairs[key.strip()] = value.strip()
        return pairs



def _convert(key: str, raw: str, current: Any) -> Any:
    """Parses an override string with the type of the config field it replaces."""
    if raw.lower() == "none":
        return None
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false"):
            raise ConfigError(f"config_overrides: {key}={raw!r} is not true or false")
        return raw.lower() == "true"
    for kind in ((int,) if isinstance(current, int) else (float,) if isinstance(current, float)
                 else (int, float) if current is None else ()):
        try:
            return kind(raw)
        except ValueError:
            continue
    if isinstance(current, (int, float)):
        raise ConfigError(f"config_overrides: {key}={raw!r} is not a valid {type(current).__name__}")
    return raw


def load_model_config(model_args: TextModelArguments, path: str, label_names: list[str]):
    """The checkpoint's config with this task's labels, overrides and (optionally) no dropout."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            path, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"model_name_or_path: cannot load a model config from {path!r}: {first_line(error)}") from None
    for key, raw in model_args.overrides().items():
        if not hasattr(config, key):
            raise ConfigError(f"config_overrides: {type(config).__name__} has no field {key!r}")
        setattr(config, key, _convert(key, raw, getattr(config, key)))
    if model_args.dropout_off:
        # BERT/RoBERTa: hidden_dropout_prob, attention_probs_dropout_prob, classifier_dropout;
        # DeBERTa: pooler_dropout; DistilBERT: dropout, attention_dropout, seq_classif_dropout ...
        for key, value in list(config.to_dict().items()):
            if "dropout" in key and (isinstance(value, float) or value is None) and hasattr(config, key):
                setattr(config, key, 0.0)
    return config


def task_metrics(dataset_config_name: Optional[str]) -> tuple[str, ...]:
    """Metric names for a task: the GLUE ones (Matthews correlation for CoLA) plus NLL and ECE."""
    return BASE_METRICS + EXTRA_METRICS.get(dataset_config_name or "", ())


def make_save_model(tokenizer):
    def save_model(module, folder: Path) -> None:
        """safetensors + config.json (with id2label) + tokenizer: loadable by from_pretrained and pipeline()."""
        module.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return save_model


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
    model_config = load_model_config(model_args, path, data.label_names)
    # Under XLA, SDPA that never asks the device whether it may skip the padding mask (static_attention.py).
    attention = {"attn_implementation": static_attention.register()} if is_xla(accelerator) else {}

    built: list = []

    def model_factory():
        # The first call (right after set_seed) loads the pretrained weights and seeds the new head;
        # later calls only need the architecture, since the loop loads a full state dict into it.
        if built or model_args.train_from_scratch:
            model = AutoModelForSequenceClassification.from_config(built[0].config if built else model_config,
                                                                   **attention)
        else:
            try:
                model = AutoModelForSequenceClassification.from_pretrained(path, config=model_config, **attention)
            except OSError as error:
                raise ValueError(f"model_name_or_path: cannot load weights from {path!r}: {first_line(error)}") \
                    from None
        if not built:
            built.append(model)
        return model

    metric_names = task_metrics(data_args.dataset_config_name)
    task = Task(build_model=model_factory, train_dataset=data.train, eval_datasets=data.evals,
                save_model=make_save_model(tokenizer), collate_fn=data.collate_fn, metric_names=metric_names,
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
