"""Vision recipe: SWA for image classification (PreResNet / WideResNet / a small BN CNN, or any transformers image
classifier such as ResNet, ConvNeXt or ViT).

Run:  accelerate launch --config_file accelerate_configs/cpu.yaml recipes/vision/train.py \
          --config recipes/vision/configs/digits_small_cnn.yaml [--key value ...]
The recipe only says how to get the data, build the model and save it; swa_accel does the rest.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The recipes run as plain scripts under `accelerate launch`; put the repo root on the path so
# that `swa_accel` and `recipes` import without installing anything.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from swa_accel import SWAArguments  # noqa: E402
from swa_accel.runner import RunArguments, Task, make_accelerator, parse_config  # noqa: E402
from swa_accel.runner.cli import run_recipe  # noqa: E402
from swa_accel.runner.config import resolved_config  # noqa: E402

from recipes.model_config import saver_with  # noqa: E402
from recipes.vision.data import VisionDataArguments, load_vision_data  # noqa: E402
from recipes.vision.image_tensors import identity_collate  # noqa: E402
from recipes.vision.image_processing import image_processor  # noqa: E402
from recipes.vision.model_setup import VisionModelArguments, model_factory  # noqa: E402


def setup(argv: list[str]):
    data_args, model_args, training, swa = parse_config(
        (VisionDataArguments, VisionModelArguments, RunArguments, SWAArguments), argv, recipe="vision"
    )
    accelerator = make_accelerator(training)
    with accelerator.main_process_first():
        data = load_vision_data(data_args)

    # (A channels_last option was measured on an H200 and dropped: PreResNet-164 eager, batch 128, bf16 took
    # 55.7 ms per recipe step against 51.6 ms contiguous; see benchmarks/README.md.)
    processor = image_processor(data.image_size, data.in_channels, data.train.scale, data.mean, data.std)
    task = Task(build_model=model_factory(model_args, data), train_dataset=data.train, eval_datasets=data.evals,
                save_model=saver_with(processor),
                collate_fn=identity_collate, validation_split=data.validation_split)
    config = resolved_config((data_args, model_args, training, swa))
    config["label_names"] = list(data.label_names)
    return task, training, swa, accelerator, config


def main() -> None:
    """Trains with the command line's arguments; accelerate's TPU launcher imports this file and calls it."""
    run_recipe(setup)


if __name__ == "__main__":
    main()
