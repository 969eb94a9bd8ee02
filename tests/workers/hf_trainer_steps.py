"""`transformers.Trainer` runs with `add_swa` and gradient accumulation, on what the launch gives (2 processes in
tests/test_hf_trainer.py), recording what each optimizer step did; the test compares the records with the
documented SWA timeline.

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml tests/workers/hf_trainer_steps.py OUT

The digits ResNet of recipes/hf_trainer.py on 900 training images, 16 per process: 29 micro-batches per process
and epoch, so with gradient_accumulation_steps=2 an epoch is 15 optimizer steps, the last of one micro-batch.
Four runs, each saved on the main process as OUT/<run>.pt:

- per_step: 4 epochs, swa_start_epoch=1, swa_update_every_steps=1, swa_lr=0.02 (constant 0.05 before);
- epoch_ends: 4 epochs, epoch cadence, a checkpoint and an evaluation every 15 steps (each an epoch's last),
  metric_for_best_model set;
- resumed: epoch_ends again from a copy of its checkpoint-30 (the with_swa class this time, not add_swa);
- max_steps: 50 optimizer steps, epoch cadence (its last epoch ends after 5 steps);
- candidates: epoch_ends with later starts and the snapshot store (LAWA, post-hoc EMA, BEMA), scored with the
  Trainer's evaluate() when training ends, a checkpoint at every epoch end;
- candidates_resumed: candidates again from its checkpoint-30, in a copy of its output folder (the store's files
  included) from which the later checkpoints are gone, as after a preemption.
"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from recipes.hf_trainer import DigitsDataset, image_task
from swa_accel import SWAArguments
from swa_accel.hf_trainer import add_swa, with_swa
from swa_accel.runner.launch import end_process


class StepRecorder(TrainerCallback):
    """After every optimizer step: its rate and the weights (float64); at every evaluation: the update count."""

    def __init__(self, swa_callback) -> None:
        self.swa_callback = swa_callback
        self.rates, self.weights, self.evaluations = {}, {}, []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.rates[state.global_step + 1] = float(optimizer.param_groups[0]["lr"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.detach().double().clone() for k, v in model.named_parameters()}

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations.append((state.global_step, self.swa_callback.swa.averager.n_averaged))


def build(output: Path, swa_args: SWAArguments, as_class: bool = False, **training):
    set_seed(0)
    model = image_task()[0]
    train_set = torch.utils.data.Subset(DigitsDataset("train"), range(900))
    arguments = TrainingArguments(
        output_dir=str(output), per_device_train_batch_size=16, gradient_accumulation_steps=2,
        per_device_eval_batch_size=150, learning_rate=0.05, lr_scheduler_type="constant", optim="sgd",
        logging_steps=5, report_to="none", seed=0, use_cpu=True, disable_tqdm=True,
        **{"save_strategy": "no", **training})
    common = dict(model=model, args=arguments, train_dataset=train_set, eval_dataset=DigitsDataset("validation"))
    if as_class:
        trainer = with_swa(Trainer)(**common, swa_args=swa_args)
        callback = trainer.swa_callback
    else:
        trainer = Trainer(**common)
        callback = add_swa(trainer, swa_args)
    recorder = StepRecorder(callback)
    trainer.add_callback(recorder)
    return trainer, callback, recorder


def run(out: Path, name: str, swa_args: SWAArguments, resume=None, as_class=False, **training) -> None:
    trainer, callback, recorder = build(out / name, swa_args, as_class, **training)
    trainer.train(resume_from_checkpoint=resume)
    plan = callback.swa.plan
    windows = {}
    if callback.choice is not None:  # (the later starts' windows of the store, on the copy-holding rank)
        windows = {c.name: callback.swa.averager.candidate_tensors(c.name) for c in callback.choice.candidates
                   if c.kind == "swa"}
    if trainer.is_world_process_zero():
        final = {k: v.detach().double().clone() for k, v in trainer.model.named_parameters()}
        logged = [(row["step"], row["learning_rate"]) for row in trainer.state.log_history if "learning_rate" in row]
        torch.save({"processes": trainer.accelerator.num_processes, "rates": recorder.rates,
                    "weights": recorder.weights, "evaluations": recorder.evaluations, "logged": logged,
                    "final": final, "n_averaged": callback.swa.averager.n_averaged,
                    "choice": callback.choice.record() if callback.choice is not None else None,
                    "windows": {n: {k: v.double().clone() for k, v in w.items()} for n, w in windows.items()},
                    "plan": {"steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps,
                             "swa_start_step": plan.swa_start_step, "anneal_steps": plan.anneal_steps}},
                   out / f"{name}.pt")
    trainer.accelerator.wait_for_everyone()


def main(out: Path) -> None:
    per_step = SWAArguments(swa_start_epoch=1, swa_lr="0.02", swa_update_every_steps=1)
    epoch_ends = SWAArguments(swa_start_epoch=1, swa_lr="0.02")
    run(out, "per_step", per_step, num_train_epochs=4)
    checkpoints = dict(num_train_epochs=4, save_strategy="steps", save_steps=15, eval_strategy="steps",
                       eval_steps=15, metric_for_best_model="loss")
    run(out, "epoch_ends", epoch_ends, **checkpoints)
    if torch.distributed.get_rank() == 0:  # the run stopped after step 30: only its checkpoint-30 is left
        shutil.copytree(out / "epoch_ends" / "checkpoint-30", out / "resumed" / "checkpoint-30")
    torch.distributed.barrier()
    run(out, "resumed", epoch_ends, resume=True, as_class=True, **checkpoints)
    run(out, "max_steps", epoch_ends, max_steps=50)
    candidates = SWAArguments(swa_start_epoch=1, swa_lr="0.02", swa_start_candidates="every_epoch",
                              snapshot_every="every_epoch", lawa_ks="1", posthoc_ema_widths="0.1", bema=True)
    by_epoch = dict(num_train_epochs=4, save_strategy="steps", save_steps=15, eval_strategy="no")
    run(out, "candidates", candidates, **by_epoch)
    if torch.distributed.get_rank() == 0:  # preempted after step 30: the later checkpoints are gone
        shutil.copytree(out / "candidates", out / "candidates_resumed")
        for later in ("checkpoint-45", "checkpoint-60"):
            shutil.rmtree(out / "candidates_resumed" / later)
    torch.distributed.barrier()
    run(out, "candidates_resumed", candidates, resume=True, **by_epoch)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_process(0)  # past gloo's teardown on CPU processes (see swa_accel.runner.launch.end_process)
