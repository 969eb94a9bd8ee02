"""The vision recipe's model: its arguments, and a factory for the loop that builds one of the recipe's own CNNs
(as a transformers image classifier, hf_models.py) or any `AutoModelForImageClassification` checkpoint or config
with a new head for the data's labels, refused in one line before training when it does not take the data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from recipes.model_config import ModelFactory, label_maps, load_model_config, parse_overrides
from recipes.vision.hf_models import SWACNNConfig, SWACNNForImageClassification
from recipes.vision.models import MODEL_CLASSES
from swa_accel.runner.config import ConfigError, first_line
from swa_accel.field_types import check_field_types


@dataclass
class VisionModelArguments:
    """Which architecture to train: one of the recipe's own CNNs, or any transformers image classifier."""

    model_name: str = field(default="small_cnn", metadata={"help": "small_cnn, preresnet or wideresnet."})
    depth: int = field(default=164, metadata={"help": "PreResNet / WideResNet depth."})
    widen_factor: int = field(default=10, metadata={"help": "WideResNet width multiplier."})
    width: int = field(default=32, metadata={"help": "SmallCNN base width."})
    dropout: float = field(default=0.0, metadata={"help": "WideResNet dropout."})
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Instead of model_name: any AutoModelForImageClassification checkpoint (a hub id such as "
                          "'microsoft/resnet-18', or a folder with config.json and weights), fine-tuned with a new "
                          "head for the data's labels."},
    )
    train_from_scratch: bool = field(
        default=False,
        metadata={"help": "With model_name_or_path: randomly initialise from its config (plus config_overrides); "
                          "a config.json alone is then enough. The data's image size and channels go into it."},
    )
    config_overrides: Optional[str] = field(
        default=None,
        metadata={"help": "With model_name_or_path: comma list of scalar config fields to change, e.g. "
                          "'embedding_size=16,hidden_act=gelu'."},
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("model_name_or_path", "config_overrides"):
            value = getattr(self, name)
            if value is not None and value.strip().lower() in ("", "none"):
                setattr(self, name, None)
        if self.model_name_or_path is None:
            if self.model_name not in MODEL_CLASSES:
                raise ConfigError(f"model_name: unknown model {self.model_name!r}; choose one of "
                                  f"{sorted(MODEL_CLASSES)}, or give a transformers checkpoint as model_name_or_path")
            if self.config_overrides or self.train_from_scratch:
                raise ConfigError("config_overrides and train_from_scratch apply to model_name_or_path; set it, or "
                                  "drop them (model_name's own CNNs take depth, widen_factor, width, dropout)")
        parse_overrides(self.config_overrides)  # fail at parse time on a malformed list

    def kwargs(self) -> dict:
        """Constructor arguments that the chosen architecture takes."""
        if self.model_name == "preresnet":
            return {"depth": self.depth}
        if self.model_name == "wideresnet":
            return {"depth": self.depth, "widen_factor": self.widen_factor, "dropout": self.dropout}
        return {"width": self.width}


def own_cnn_factory(model_args: VisionModelArguments, data):
    """One of models.py's CNNs as a transformers image classifier (hf_models.py), labelled with the data's names."""
    config = SWACNNConfig(model_args.model_name, num_channels=data.in_channels,
                          architecture_args=model_args.kwargs(), **label_maps(list(data.label_names)))
    return lambda: SWACNNForImageClassification(config)


def fit_config_to_data(config, data, from_scratch: bool, path: str, overridden) -> None:
    """A config trained from scratch takes the data's channels and image size (unless config_overrides set them); a
    pretrained one must already take the data's channels."""
    fields = {"num_channels": data.in_channels, "image_size": data.image_size}
    for key, value in fields.items():
        if not hasattr(config, key) or key in overridden:
            continue
        if from_scratch:
            setattr(config, key, value)
        elif key == "num_channels" and config.num_channels != value:
            raise ConfigError(f"model_name_or_path: {path} takes {config.num_channels}-channel images and the data "
                              f"has {value}; use a {value}-channel checkpoint, or --train_from_scratch true")


def fits_the_data(data, path: str):
    """A check of the first model: one forward pass of a blank image of the data's shape, so that a checkpoint made
    for another image size fails before training in one line, not in the first step."""
    def check(model) -> None:
        probe = torch.zeros(1, data.in_channels, data.image_size, data.image_size)
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval()(pixel_values=probe)
        except (RuntimeError, ValueError) as error:
            size = getattr(model.config, "image_size", None)
            resize = f"--image_size {size} (the data resized as the checkpoint expects)" if isinstance(size, int) \
                else "--image_size with the checkpoint's size"
            raise ConfigError(f"model_name_or_path: {path} does not take the data's {data.image_size}x"
                              f"{data.image_size} images with {data.in_channels} channel(s): "
                              f"{first_line(error).rstrip('.')}; use {resize}, or --train_from_scratch true (the "
                              "config then takes the data's size)") from None
        finally:
            model.train(was_training)

    return check


def transformers_factory(model_args: VisionModelArguments, data):
    """Any AutoModelForImageClassification checkpoint or config, with a new head for the data's labels."""
    from transformers import AutoModelForImageClassification

    path = model_args.model_name_or_path
    overrides = parse_overrides(model_args.config_overrides)
    config = load_model_config(path, list(data.label_names), overrides)
    fit_config_to_data(config, data, model_args.train_from_scratch, path, overrides)
    return ModelFactory(AutoModelForImageClassification, path, config, model_args.train_from_scratch,
                        check=fits_the_data(data, path))


def model_factory(model_args: VisionModelArguments, data):
    """What the loop calls for a fresh model: `model_name_or_path`'s transformers model, else `model_name`'s CNN."""
    return (transformers_factory if model_args.model_name_or_path else own_cnn_factory)(model_args, data)
