"""A transformers checkpoint's config for a recipe's task: its labels, `config_overrides`, and no dropout on request.
Both recipes load models this way (the text recipe always, the vision recipe for `model_name_or_path`)."""

from __future__ import annotations

from typing import Any

from swa_accel.runner.config import ConfigError, first_line


def parse_overrides(text: str | None) -> dict[str, str]:
    """`config_overrides` ('hidden_size=32,num_hidden_layers=2') as {field: raw value}."""
    if not text:
        return {}
    pairs = {}
    for item in text.split(","):
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


def label_maps(label_names: list[str]) -> dict:
    """`id2label` and `label2id` of a transformers config, for the task's label names in id order."""
    return {"id2label": dict(enumerate(label_names)), "label2id": {name: i for i, name in enumerate(label_names)}}


def saver_with(companion):
    """`Task.save_model` for a transformers model and the `companion` that prepares its inputs (a tokenizer or an
    image processor), saved into the same folder: what `from_pretrained` and `pipeline` load."""
    def save_model(module, folder) -> None:
        module.save_pretrained(folder)
        companion.save_pretrained(folder)

    return save_model


def load_model_config(path: str, label_names: list[str], overrides: dict[str, str], dropout_off: bool = False):
    """The config at `path` (a hub id or a folder with config.json) with this task's labels and `overrides`, and
    every dropout probability at 0 when `dropout_off`."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, num_labels=len(label_names), **label_maps(label_names))
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"model_name_or_path: cannot load a model config from {path!r}: {first_line(error)}") from None
    for key, raw in overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"config_overrides: {type(config).__name__} has no field {key!r}")
        setattr(config, key, _convert(key, raw, getattr(config, key)))
    if dropout_off:
        # BERT/RoBERTa: hidden_dropout_prob, attention_probs_dropout_prob, classifier_dropout;
        # DeBERTa: pooler_dropout; DistilBERT: dropout, attention_dropout, seq_classif_dropout; ViT, ConvNeXt ...
        for key, value in list(config.to_dict().items()):
            if "dropout" in key and (isinstance(value, float) or value is None) and hasattr(config, key):
                setattr(config, key, 0.0)
    return config


class ModelFactory:
    """Builds a transformers model of `auto_class` for the loop: the first call (right after `set_seed`) loads the
    pretrained weights, with a new head for this task's labels, unless `from_scratch`; every later call only needs
    the architecture, since the loop loads a full state dict into it.

    `check(model)` runs on the first model, so that a model that does not fit the data is refused in one line before
    training starts.
    """

    def __init__(self, auto_class, path: str, config, from_scratch: bool, check=None, **model_kwargs) -> None:
        self.auto_class, self.path, self.config, self.from_scratch = auto_class, path, config, from_scratch
        self.check, self.model_kwargs, self.first = check, model_kwargs, None

    def __call__(self):
        if self.first is not None or self.from_scratch:
            config = self.first.config if self.first is not None else self.config
            model = self.auto_class.from_config(config, **self.model_kwargs)
        else:
            try:
                # A new task's head never matches the checkpoint's; transformers re-initialises it (and says so).
                model = self.auto_class.from_pretrained(self.path, config=self.config, ignore_mismatched_sizes=True,
                                                        **self.model_kwargs)
            except OSError as error:
                raise ValueError(f"model_name_or_path: cannot load weights from {self.path!r}: "
                                 f"{first_line(error)}") from None
        if self.first is None:
            if self.check is not None:
                self.check(model)
            self.first = model
        return model
