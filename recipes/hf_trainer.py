"""SWA in `transformers.Trainer`: its own TrainingArguments and loop, plus `add_swa(trainer, SWAArguments(...))`.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/hf_trainer.py --output_dir outputs/hf_image
    accelerate launch ... recipes/hf_trainer.py --gradient_accumulation_steps 2   # 19 optimizer steps per epoch
    accelerate launch ... recipes/hf_trainer.py --task text --model_name_or_path google-bert/bert-base-uncased \\
        --dataset_name nyu-mll/glue --output_dir outputs/hf_sst2

image (the offline default): a small transformers ResNet (BatchNorm) on scikit-learn's digits; text: a sequence
classifier on a GLUE task's `sentence` column (a hub dataset or a local folder laid out like it). The export in
`<output_dir>/final` is the average, BN recomputed, loadable with `from_pretrained` (text: also `pipeline`).
Epochs and steps are the Trainer's (docs/hf_trainer.md): `--swa_start_epoch 3` starts averaging after 3 of them.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from swa_accel import SWAArguments
from swa_accel.hf_trainer import add_swa
from swa_accel.runner.launch import end_process


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("image", "text"), default="image")
    parser.add_argument("--output_dir", default="outputs/hf_trainer")
    parser.add_argument("--model_name_or_path", help="text: a hub id or a local folder")
    parser.add_argument("--dataset_name", default="nyu-mll/glue", help="text: a hub id or a local GLUE-like folder")
    parser.add_argument("--dataset_config_name", default="sst2")
    parser.add_argument("--epochs", type=float, default=6)
    parser.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    parser.add_argument("--batch_size", type=int, default=32, help="per process")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=0.05)
    parser.add_argument("--swa_start_epoch", type=int, default=3)
    parser.add_argument("--swa_lr", default="0.02")
    parser.add_argument("--swa_update_every_steps", type=int, default=None)
    parser.add_argument("--save_steps", type=int, default=None, help="checkpoint every N steps (default: per epoch)")
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    parser.add_argument("--save_snapshots", action="store_true",
                        help="also save the weights at every averaging update (to check the average against them)")
    return parser.parse_args(argv)


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's 8x8 digits as `pixel_values` (1 x 8 x 8, scaled to [0, 1]) and `labels`."""

    def __init__(self, split: str) -> None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.tensor(bunch.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        rows = {"train": slice(0, 1200), "validation": slice(1200, 1500), "test": slice(1500, None)}[split]
        self.images, self.labels = images[rows], torch.tensor(bunch.target)[rows]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


def image_task():
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                          layer_type="basic", downsample_in_first_stage=False, num_labels=10,
                          id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)})
    model = ResNetForImageClassification(config)
    return model, DigitsDataset("train"), DigitsDataset("validation"), None


def text_task(args):
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    if args.model_name_or_path is None:
        raise SystemExit("error: model_name_or_path: the text task needs a model (a hub id or a local folder)")
    raw = load_dataset(args.dataset_name, args.dataset_config_name)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    names = raw["train"].features["label"].names
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_name_or_path, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)})
    encoded = raw.map(lambda rows: tokenizer(rows["sentence"], truncation=True), batched=True)
    encoded = encoded.remove_columns([c for c in raw["train"].column_names if c != "label"])
    return model, encoded["train"], encoded["validation"], (tokenizer, DataCollatorWithPadding(tokenizer))


class SnapshotSaver(TrainerCallback):
    """Saves the weights each time the average takes them in (after the SWA callback, so it sees the update)."""

    def __init__(self, swa_callback, folder: Path) -> None:
        self.swa_callback, self.folder, self.saved = swa_callback, folder, 0

    def _maybe_save(self, model) -> None:
        swa = self.swa_callback.swa
        if swa.n_averaged > self.saved and swa.accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            weights = {k: v.detach().float().cpu().clone() for k, v in model.named_parameters()}
            save_file(weights, str(self.folder / f"{swa.n_averaged:03d}.safetensors"))
        self.saved = swa.n_averaged

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._maybe_save(model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._maybe_save(model)


def accuracy(prediction) -> dict:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def main(argv=None) -> None:
    args = parse_args(argv)
    set_seed(0)
    model, train_set, eval_set, text = image_task() if args.task == "image" else text_task(args)
    output = Path(args.output_dir)
    training = TrainingArguments(
        output_dir=str(output), num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        per_device_eval_batch_size=128, learning_rate=args.learning_rate, lr_scheduler_type="constant",
        optim="sgd", eval_strategy="epoch", save_strategy="steps" if args.save_steps else "epoch",
        save_steps=args.save_steps or 500, logging_steps=10, report_to="none", seed=0,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, save_total_limit=None)
    trainer = Trainer(model=model, args=training, train_dataset=train_set, eval_dataset=eval_set,
                      compute_metrics=accuracy, processing_class=text[0] if text else None,
                      data_collator=text[1] if text else None)
    swa = add_swa(trainer, SWAArguments(swa_start_epoch=args.swa_start_epoch, swa_lr=args.swa_lr,
                                        swa_update_every_steps=args.swa_update_every_steps))
    if args.save_snapshots:
        trainer.add_callback(SnapshotSaver(swa, output / "snapshots"))
    resume = True if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate()  # the average, now the model's weights
    trainer.save_model(str(output / "final"))
    if trainer.is_world_process_zero():
        (output / "final" / "swa_eval.json").write_text(json.dumps({**metrics, "n_averaged": swa.swa.n_averaged}))
        print(f"swa eval accuracy {metrics['eval_accuracy']:.4f}; {swa.swa.n_averaged} snapshots averaged")
    trainer.accelerator.wait_for_everyone()
    end_process(0)  # past gloo's teardown on CPU processes (see swa_accel.runner.launch.end_process)


if __name__ == "__main__":
    main()
