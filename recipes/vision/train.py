"""Vision recipe: SWA for image classification (PreResNet / WideResNet / a small BN CNN).

Run:  accelerate launch --config_file accelerate_configs/cpu.yaml recipes/vision/train.py \
          --config recipes/vision/configs/digits_small_cnn.yaml [--key value ...]
The recipe only says how to get the data, build the model and save it; swa_accel does the rest.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

# The recipes run as plain scripts under `accelerate launch`; put the repo root on the path so
# that `swa_accel` and `recipes` import without installing anything.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from swa_accel import SWAArguments, Task, RunArguments, make_accelerator, parse_config  # noqa: E402
from swa_accel.cli import run_recipe  # noqa: E402
from swa_accel.config import ConfigError, resolved_config  # noqa: E402
from swa_accel.field_types import check_field_types  # noqa: E402

from recipes.vision.data import VisionDataArguments, load_vision_data  # noqa: E402
from recipes.vision.image_tensors import identity_collate  # noqa: E402
from recipes.vision.models import MODEL_CLASSES, build_model  # noqa: E402


@dataclass
class VisionModelArguments:
    """Which architecture to train."""

    model_name: str = field(default="small_cnn", metadata={"help": "small_cnn, preresnet or wideresnet."})
    depth: int = field(default=164, metadata={"help": "PreResNet / WideResNet depth."})
    widen_factor: int = field(default=10, metadata={"help": "WideResNet width multiplier."})
    width: int = field(default=32, metadata={"help": "SmallCNN base width."})
    dropout: float = field(default=0.0, metadata={"help": "WideResNet dropout."})

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.model_name not in MODEL_CLASSES:
            raise ConfigError(f"model_name: unknown model {self.model_name!r}; choose one of {sorted(MODEL_CLASSES)}")

    def kwargs(self) -> dict:
        """Constructor arguments that the chosen architecture takes."""
        if self.model_name == "preresnet":
            return {"depth": self.depth}
        if self.model_name == "wideresnet":
            return {"depth": self.depth, "widen_factor": self.widen_factor, "dropout": self.dropout}
        return {"width": self.width}


def image_processor(data):
    """The training data's preprocessing as a transformers image processor, saved beside every export: resize to
    the training size, scale pixels to [0, 1] by the split's scale (255, or 16 for digits), normalise by the
    training split's mean and std. `AutoImageProcessor.from_pretrained(folder)` then prepares new images exactly
    as the recipe's evaluation did."""
    import transformers

    # The PIL flavour needs no torchvision (transformers 5 falls back to it anyway); it saves as ViTImageProcessor.
    kind = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    return kind(do_resize=True, size={"height": data.image_size, "width": data.image_size}, do_rescale=True,
                rescale_factor=1.0 / data.train.scale, do_normalize=True, image_mean=list(data.mean),
                image_std=list(data.std))


def make_save_model(processor):
    def save_model(module, folder: Path) -> None:
        """safetensors + config.json (reloadable with `<ModelClass>.from_pretrained(folder)`) + the image processor
        (`AutoImageProcessor.from_pretrained(folder)`)."""
        module.save_pretrained(folder)
        processor.save_pretrained(folder)

    return save_model


def setup(argv: list[str]):
    data_args, model_args, training, swa = parse_config(
        (VisionDataArguments, VisionModelArguments, RunArguments, SWAArguments), argv, recipe="vision"
    )
    accelerator = make_accelerator(training)
    with accelerator.main_process_first():
        data = load_vision_data(data_args)

    # (A channels_last option was measured on an H200 and dropped: PreResNet-164 eager, batch 128, bf16 took
    # 55.7 ms per recipe step against 51.6 ms contiguous; see benchmarks/README.md.)
    def model_factory():
        return build_model(model_args.model_name, num_classes=data.num_labels, in_channels=data.in_channels,
                           **model_args.kwargs())

    task = Task(build_model=model_factory, train_dataset=data.train, eval_datasets=data.evals,
                save_model=make_save_model(image_processor(data)),
                collate_fn=identity_collate, validation_split=data.validation_split)
    config = resolved_config((data_args, model_args, training, swa))
    config["label_names"] = list(data.label_names)
    return task, training, swa, accelerator, config


def main() -> None:
    """Trains with the command line's arguments; accelerate's TPU launcher imports this file and calls it."""
    run_recipe(setup)


if __name__ == "__main__":
    main()
