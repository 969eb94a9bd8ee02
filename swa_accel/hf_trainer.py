"""SWA for `transformers.Trainer` and its subclasses (TRL's trainers among them): one call installs it.

    trainer = transformers.Trainer(model=model, args=TrainingArguments(...), train_dataset=..., eval_dataset=...)
    add_swa(trainer, SWAArguments(swa_start_fraction=0.75, swa_lr=1e-5))
    trainer.train()            # or trainer.train(resume_from_checkpoint=True)
    trainer.save_model(out)    # the average, its BN statistics recomputed over the whole training set

`TrainingArguments` and the Trainer keep their own meaning; the SWA settings are swa_accel's `SWAArguments`.
What `add_swa` changes:

- after every optimizer step the same `SWA` controller as the recipes' averages when due (per step with
  `swa_update_every_steps`, else at epoch ends) and, with `swa_lr`, runs the rate from the SWA start as torch's
  SWALR does, whatever scheduler the Trainer built (the logged learning_rate is that rate);
- `trainer.evaluate()` evaluates the average once averaging has begun (BN recomputed, swapped into the model and
  swapped out again), the base model before;
- each checkpoint-N folder gets `swa_state.pt` (the average, its update count and step), written atomically, and
  `train(resume_from_checkpoint=...)` restores it;
- when training ends the average, BN recomputed over the whole training set, becomes the model's weights (as
  Lightning's weight averaging does), so `save_model`, `evaluate`, `from_pretrained` and `pipeline` all see it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .arguments import SWAArguments
from .errors import ConfigError
from .swa import SWA

STATE_FILE = "swa_state.pt"


class SWACallback(TrainerCallback):
    """The callback `add_swa` installs; `swa` is the controller once training has begun."""

    def __init__(self, trainer, args: SWAArguments) -> None:
        self.trainer, self.args = trainer, args
        self.swa: Optional[SWA] = None
        self.resume_from: Optional[str] = None  # the checkpoint folder `train` resumes from (set by add_swa)
        self.installed = False  # the average has become the model's weights
        self._last_epoch_update = -1  # the step of the last epoch-end update (none yet)

    # ----- training ------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        trainer = self.trainer
        self.installed, self._last_epoch_update = False, -1
        self.swa = SWA(trainer.accelerator, trainer.model_wrapped, optimizer, train_dataloader, self.args,
                       max_steps=state.max_steps, seed=args.seed, register=False)
        if self.swa.placement.name != "main":
            raise ConfigError("swa_placement: with transformers.Trainer the average lives on the main process; "
                              "sharded (FSDP2) averages run in the recipes' Trainer")
        if self.resume_from is not None:
            self.load(Path(self.resume_from))

    def on_optimizer_step(self, args, state, control, lr_scheduler=None, **kwargs):
        # The Trainer logs its scheduler's last rate; in the SWA phase the rate is the controller's.
        swa = self.swa
        if swa.lr_phase is not None and swa.plan.averaging_active(state.global_step + 1) and lr_scheduler:
            lr_scheduler._last_lr = [group["lr"] for group in swa.lr_phase.optimizer.param_groups]

    def on_step_end(self, args, state, control, **kwargs):
        stepped = not self.trainer.accelerator.optimizer_step_was_skipped
        self.swa.after_step(state.global_step, epoch_end=False, stepped=stepped)

    def on_epoch_end(self, args, state, control, **kwargs):
        swa = self.swa
        if swa.plan.update_at_epoch_end(state.global_step) and state.global_step > self._last_epoch_update:
            swa.after_step(state.global_step, epoch_end=True, stepped=True)
            self._last_epoch_update = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self.install_average()

    # ----- checkpoints ---------------------------------------------------------------------

    def on_save(self, args, state, control, **kwargs):
        folder = Path(self.trainer._get_output_dir(trial=None)) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if self.trainer.accelerator.is_main_process and folder.is_dir():
            temporary = folder / (STATE_FILE + ".tmp")
            torch.save({"swa": self.swa.state_dict(), "averager": self.swa.averager.state_dict(),
                        "last_epoch_update": self._last_epoch_update}, temporary)
            os.replace(temporary, folder / STATE_FILE)

    def load(self, folder: Path) -> None:
        path = folder / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"resume_from_checkpoint: '{folder}' holds no {STATE_FILE}; it was saved without "
                              "add_swa, so its average is lost: start afresh or resume from a checkpoint of this run")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.swa.load_state_dict(saved["swa"])
        self.swa.averager.load_state_dict(saved["averager"])
        self._last_epoch_update = int(saved["last_epoch_update"])

    # ----- the averaged model --------------------------------------------------------------

    def install_average(self) -> None:
        """The average (BN recomputed over the whole training set) becomes the model's weights, for good."""
        swa = self.swa
        if swa is None or swa.n_averaged == 0 or self.installed:
            return
        model = self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped)
        with swa.average_in_model(full_bn_pass=True) as module:
            state = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
        model.load_state_dict(state)
        self.installed = True

    def evaluating(self, evaluate, *args, **kwargs):
        """`trainer.evaluate`, run on the average (swapped into the model) once averaging has begun."""
        swa = self.swa
        if swa is None or swa.n_averaged == 0 or self.installed:
            return evaluate(*args, **kwargs)
        with swa.average_in_model(in_training_model=True):
            return evaluate(*args, **kwargs)


def add_swa(trainer, args: SWAArguments) -> SWACallback:
    """Installs SWA in a `transformers.Trainer` (or a subclass) before `train()`; returns its callback."""
    if not args.enabled:
        raise ConfigError("swa_method: 'none' averages nothing; leave add_swa out instead")
    if args.swa_start_candidates or args.ema_decays:
        name = "swa_start_candidates" if args.swa_start_candidates else "ema_decays"
        raise ConfigError(f"{name}: add_swa keeps one average; candidates and the choice among them run in the "
                          "recipes' loop (swa_accel.runner.train)")
    callback = SWACallback(trainer, args)
    trainer.add_callback(callback)
    train, evaluate = trainer.train, trainer.evaluate

    @functools.wraps(train)
    def train_with_swa(resume_from_checkpoint=None, *rest, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(trainer.args.output_dir)
            if resume_from_checkpoint is None:
                raise ConfigError(f"resume_from_checkpoint: no checkpoint in '{trainer.args.output_dir}'")
        callback.resume_from = resume_from_checkpoint or None
        return train(resume_from_checkpoint, *rest, **kwargs)

    trainer.train = train_with_swa
    trainer.evaluate = functools.wraps(evaluate)(functools.partial(callback.evaluating, evaluate))
    return callback
