"""The vision recipe's test runs: a tiny CIFAR-schema folder and the command line every run of it starts from."""

from pathlib import Path

from tests.helpers.launch import ROOT
from tests.helpers.tiny_datasets import make_cifar_like

SCRIPT = ROOT / "recipes" / "vision" / "train.py"
SMOKE = ROOT / "recipes" / "vision" / "configs" / "smoke.yaml"


def make_cifar_dir(folder: Path) -> Path:
    return make_cifar_like(folder, n_train=80, n_test=32, image_size=8)


def common(cifar_dir, out, *extra):
    # 80 rows, 16 held out (stratified) for validation: 64 samples, global batch 16, so 4 optimizer steps per
    # epoch, 16 in all; averaging every 2 steps from step 8.
    return ["--config", str(SMOKE), "--dataset_name", str(cifar_dir), "--label_noise", "0", "--augment", "true",
            "--max_train_samples", "80", "--validation_fraction", "0.2", "--model_name", "preresnet", "--depth", "8",
            "--output_dir", str(out), "--num_train_epochs", "4", "--swa_start_epoch", "2",
            "--swa_update_every_steps", "2", "--checkpointing_steps", "3", "--eval_steps", "2",
            "--per_device_eval_batch_size", "8", *extra]
