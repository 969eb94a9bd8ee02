"""SWA for `transformers.Trainer` and its subclasses (TRL's trainers among them), in the Trainer's own terms.

    trainer = transformers.Trainer(model=model, args=TrainingArguments(...), train_dataset=..., eval_dataset=...)
    add_swa(trainer, SWAArguments(swa_start_epoch=3, swa_lr=0.02))
    trainer.train()            # or trainer.train(resume_from_checkpoint=True)
    trainer.save_model(out)    # the average, its BN statistics recomputed over the whole training set

or, as a class: `with_swa(Trainer)(model=..., args=..., swa_args=SWAArguments(...))`.

Steps and epochs are the Trainer's: an optimizer step is one `state.global_step` (all of a step's
`gradient_accumulation_steps` micro-batches, on every process), an epoch is the Trainer's
`num_update_steps_per_epoch` steps (the last one may take the remainder of the micro-batches), and the budget is
its `state.max_steps` (from `max_steps`, or from `num_train_epochs`, fractional ones included). So
`swa_start_epoch=k` starts averaging after `k` Trainer epochs, the anneal's default length is one Trainer epoch,
`swa_update_every_steps=N` averages every N global steps, and the epoch cadence averages at the end of every
full Trainer epoch after the SWA start (an epoch that a `max_steps` or fractional epoch budget cuts short has no
end, as the printed plan says).

What `add_swa` changes:

- after every optimizer step the `SWA` controller averages when due and, with `swa_lr`, runs the rate from the
  SWA start as torch's SWALR does, whatever scheduler the Trainer built; the logged `learning_rate` is the rate
  the step used;
- an epoch's last step does its epoch-end update in `on_step_end`, so a checkpoint or an evaluation on that
  step (both come after `on_step_end`, before `on_epoch_end`) includes it;
- `evaluate()` scores the average once averaging has begun (BN recomputed, swapped into the model and out
  again), the base model before;
- each checkpoint-N gets `swa_state.pt` (the average, its update count and step), written atomically, and
  `train(resume_from_checkpoint=...)` restores it;
- when training ends the average, BN recomputed over the whole training set, becomes the model's weights (as
  Lightning's weight averaging does), so `save_model`, `evaluate`, `from_pretrained` and `pipeline` all see it.

Candidates and the snapshot store (`swa_start_candidates`, `ema_decays`, `snapshot_every` with its families, `soup`)
work as in the recipes: the store writes into output_dir/snapshots and travels with each checkpoint's
`swa_state.pt`. When training ends every candidate is swapped into the model and scored by the Trainer's own
`evaluate()` on its `eval_dataset`, which must be a validation split (never the test set); the best by
`metric_for_best_model` (with `greater_is_better`; default: the lowest eval loss) is installed, and
output_dir/swa_candidates.json records all of them (`SWACallback.choice` holds the same). With `swa_method='none'`
and `snapshot_every` the run trains, evaluates and ends as without SWA and keeps only the store:
`callback.choose_and_install()` after `train()` then scores the store's averages and installs the best.

`load_best_model_at_end=True` is refused: the final weights are the average, not a checkpoint's, and the
Trainer's best checkpoint would be picked by comparing scores of the base model (before the SWA start) with
scores of the average (after it). With `metric_for_best_model` alone, the run says from which step on its
evaluations score the average, and that the final weights are the average.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .arguments import SWAArguments
from .candidates import Choice
from .errors import ConfigError
from .swa import SWA
from .timeline import TrainingPlan, plan_run

STATE_FILE = "swa_state.pt"
CANDIDATES_FILE = "swa_candidates.json"


def trainer_plan(trainer, args: SWAArguments, train_dataloader) -> TrainingPlan:
    """The SWA timeline in the Trainer's optimizer steps, from the Trainer's own count of steps and epochs.

    `Trainer.set_initial_training_values` is what `train()` itself calls to get the steps per epoch (the
    micro-batches per process over `gradient_accumulation_steps`, rounded up) and `max_steps`, so the plan and
    the training loop cannot disagree, whatever the accumulation, world size or budget.

    Raises:
        ConfigError: the SWA start falls at or after the end of training (the message gives the Trainer's
            numbers: steps, epochs and steps per epoch).
    """
    values = trainer.set_initial_training_values(trainer.args, train_dataloader)
    steps_per_epoch, max_steps = values[1], values[-1]
    return plan_run(steps_per_epoch, args, max_steps=max_steps)  # (already optimizer steps: no accumulation)


def first_update_step(plan: TrainingPlan) -> int:
    """The optimizer step of the first averaging update: from it on, evaluations score the average."""
    if plan.update_every_steps is not None:
        return plan.swa_start_step + plan.update_every_steps
    return (plan.swa_start_step // plan.steps_per_epoch + 1) * plan.steps_per_epoch


def refuse_best_model_at_end(training_args) -> None:
    """`load_best_model_at_end` would swap the average for a checkpoint picked by comparing unlike scores."""
    if getattr(training_args, "load_best_model_at_end", False):
        raise ConfigError("load_best_model_at_end: with add_swa the final weights are the average, and the best "
                          "checkpoint would be picked by comparing the base model's scores with the average's; "
                          "set load_best_model_at_end=False (evaluations score the average once it has begun)")


class SWACallback(TrainerCallback):
    """The callback `add_swa` installs; `swa` is the controller once training has begun."""

    def __init__(self, trainer, args: SWAArguments) -> None:
        self.trainer, self.args = trainer, args
        self.swa: Optional[SWA] = None
        self.resume_from: Optional[str] = None  # the checkpoint folder `train` resumes from (set by the mixin)
        self.installed = False  # the average has become the model's weights
        self.rate_of_last_step = None  # the first param group's rate in the last optimizer step (float or tensor)
        self.choice: Optional[Choice] = None  # the candidates scored when training ended, and the one installed

    # ----- training ------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        trainer = self.trainer
        refuse_best_model_at_end(args)
        self.installed, self.rate_of_last_step = False, None
        if self.swa is not None and self.swa.lr_phase is not None:
            self.swa.lr_phase.remove()  # (a second train() on the same optimizer: one rate phase at a time)
        plan = trainer_plan(trainer, self.args, train_dataloader)
        self.swa = SWA(trainer.accelerator, trainer.model_wrapped, optimizer, train_dataloader, self.args,
                       plan=plan, seed=args.seed, register=False, store_dir=Path(args.output_dir) / "snapshots",
                       checkpoints_kept=args.save_total_limit)
        if self.swa.placement.name != "main":
            raise ConfigError("swa_placement: with transformers.Trainer the average lives on the main process; "
                              "sharded (FSDP2) averages run in the recipes' Trainer")
        if self.swa.candidate_count() > 1 and trainer.eval_dataset is None:
            raise ConfigError("swa_start_candidates: add_swa chooses among candidates (later starts, ema_decays, the "
                              "snapshot store's families) with the Trainer's evaluate() on its eval_dataset, a "
                              "validation split; pass eval_dataset")
        if args.metric_for_best_model and trainer.accelerator.is_main_process and not self.swa.store_only:
            print(f"swa: evaluations from optimizer step {first_update_step(plan)} on score the average, earlier ones "
                  f"the base model; best_metric ({args.metric_for_best_model}) compares both kinds; the final "
                  "weights are the average", flush=True)
        if self.resume_from is not None:
            self.load(Path(self.resume_from))

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Read before the Trainer steps its scheduler: the rate this step used (in the SWA phase, SWALR's).
        # (A tensor rate is copied, not read: reading it would wait for the device at every step.)
        if self.swa.lr_phase is not None:
            rate = self.swa.lr_phase.optimizer.param_groups[0]["lr"]
            self.rate_of_last_step = rate.detach().clone() if isinstance(rate, torch.Tensor) else rate

    def on_step_end(self, args, state, control, **kwargs):
        # The epoch-end update runs here, on the epoch's last step, and not in on_epoch_end: the Trainer saves and
        # evaluates that step before on_epoch_end. An epoch the budget cuts short has no end (as in the plan).
        stepped = not self.trainer.accelerator.optimizer_step_was_skipped
        epoch_end = state.global_step % self.swa.plan.steps_per_epoch == 0
        self.swa.after_step(state.global_step, epoch_end=epoch_end, stepped=stepped)

    def on_train_end(self, args, state, control, **kwargs):
        if self.swa.lr_phase is not None:
            self.swa.lr_phase.remove()
        if self.swa.store_only:  # (trained without SWA: the store waits for choose_and_install)
            self.swa.finish_store()
        elif self.swa.candidate_count() > 1:
            self.choose_and_install()
        else:
            self.install_average()
            self.swa.finish_store()

    def correct_logged_rate(self, logs: dict, global_step: int) -> None:
        """In the SWA phase the Trainer logs its scheduler's rate; the step used SWALR's, which goes in instead."""
        swa = self.swa
        if ("learning_rate" in logs and swa is not None and swa.lr_phase is not None
                and self.rate_of_last_step is not None and swa.plan.averaging_active(global_step)):
            rate = self.rate_of_last_step
            logs["learning_rate"] = rate.item() if isinstance(rate, torch.Tensor) else rate

    # ----- checkpoints ---------------------------------------------------------------------

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not self.trainer.accelerator.is_main_process:
            return
        if not folder.is_dir():
            raise ConfigError(f"output_dir: the Trainer saved no '{folder}' for add_swa's {STATE_FILE} to go in "
                              "(hyperparameter search trials save elsewhere and are not supported)")
        temporary = folder / (STATE_FILE + ".tmp")
        torch.save({"swa": self.swa.state_dict()}, temporary)
        os.replace(temporary, folder / STATE_FILE)

    def load(self, folder: Path) -> None:
        path = folder / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"resume_from_checkpoint: '{folder}' holds no {STATE_FILE}; it was saved without "
                              "add_swa, so its average is lost: start afresh or resume from a checkpoint of this run")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.swa.load_state_dict(saved["swa"])

    # ----- the averaged model --------------------------------------------------------------

    @property
    def averaging(self) -> bool:
        """Whether evaluations score the average: it exists, the model still holds the training weights (the average
        not installed), and the run averages (not only the store)."""
        return (self.swa is not None and self.swa.averager.n_averaged > 0 and not self.installed
                and not self.swa.store_only)

    def install_average(self, candidate: Optional[str] = None) -> None:
        """The average or a candidate (BN recomputed over the whole training set) becomes the model's weights, for
        good."""
        if self.swa is None or self.swa.averager.n_averaged == 0 or self.installed:
            return
        model = self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped)
        with self.swa.average_in_model(full_bn_pass=True, candidate=candidate) as module:
            state = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
        model.load_state_dict(state)
        self.installed = True

    def selection(self) -> tuple[str, bool]:
        """The key of the Trainer's evaluate() that chooses, and whether higher is better: `metric_for_best_model`
        and `greater_is_better`, else the lowest eval loss."""
        args = self.trainer.args
        metric = args.metric_for_best_model or "loss"
        key = metric if metric.startswith("eval_") else f"eval_{metric}"
        if args.metric_for_best_model and args.greater_is_better is not None:
            return key, bool(args.greater_is_better)
        return key, not key.endswith("loss")

    def choose_and_install(self) -> Optional[Choice]:
        """Scores every candidate (BN recomputed, swapped into the model) with the Trainer's evaluate() on its
        eval_dataset, installs the best and writes output_dir/swa_candidates.json; every process calls it (the
        callback does when training ends; after a store-only run, call it yourself). None before averaging."""
        trainer = self.trainer
        if self.swa is None or self.swa.averager.n_averaged == 0 or self.installed:
            return None
        if trainer.eval_dataset is None:
            raise ConfigError("eval_dataset: choosing among the averages needs the Trainer's eval_dataset, a "
                              "validation split")
        key, higher = self.selection()

        def evaluate(module):
            trainer._swa_in_evaluation = True  # (the candidate is in the model already: no second swap)
            try:
                return {"validation": trainer.evaluate()}
            finally:
                trainer._swa_in_evaluation = False

        self.choice, _ = self.swa.score_candidates(evaluate, "validation", key, higher, in_training_model=True)
        self.install_average(self.choice.chosen)
        if trainer.accelerator.is_main_process:
            path = Path(trainer.args.output_dir) / CANDIDATES_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(path.name + ".tmp")
            temporary.write_text(json.dumps(self.choice.record(), indent=2), encoding="utf-8")
            os.replace(temporary, path)
            print(f"swa: installed {self.choice.chosen}: {self.choice.reason}; every candidate in {path}", flush=True)
        return self.choice


class SWATrainerMixin:
    """Mixed in before a `Trainer` class (`with_swa` does it): the three Trainer methods SWA needs to extend.

    A callback sees neither the checkpoint `train()` resumes from, nor the start of an evaluation, nor the logs
    before `state.log_history` keeps them; `train`, `evaluate` and `log` are the Trainer's documented methods to
    override for that. Everything else runs in `SWACallback`.
    """

    swa_callback: Optional[SWACallback] = None

    def __init__(self, *args, swa_args: Optional[SWAArguments] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if swa_args is not None:
            self.swa_callback = install_callback(self, swa_args)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        callback = self.swa_callback
        if callback is not None:
            refuse_best_model_at_end(self.args)
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise ConfigError(f"resume_from_checkpoint: no checkpoint in '{self.args.output_dir}'")
            callback.resume_from = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        callback = self.swa_callback
        if callback is None or not callback.averaging or getattr(self, "_swa_in_evaluation", False):
            return super().evaluate(*args, **kwargs)  # (a dict of eval datasets comes back here once per dataset)
        self._swa_in_evaluation = True
        try:
            with callback.swa.average_in_model(in_training_model=True):
                return super().evaluate(*args, **kwargs)
        finally:
            self._swa_in_evaluation = False

    def log(self, logs, *args, **kwargs):
        if self.swa_callback is not None:
            self.swa_callback.correct_logged_rate(logs, self.state.global_step)
        return super().log(logs, *args, **kwargs)


@functools.cache
def with_swa(trainer_class: type) -> type:
    """`trainer_class` with `SWATrainerMixin`: its constructor also takes `swa_args=SWAArguments(...)`."""
    if issubclass(trainer_class, SWATrainerMixin):
        return trainer_class
    return type(f"SWA{trainer_class.__name__}", (SWATrainerMixin, trainer_class),
                {"__module__": trainer_class.__module__, "__doc__": trainer_class.__doc__})


def refuse_unsupported(args: SWAArguments) -> None:
    if not args.enabled and not args.store_only:
        raise ConfigError("swa_method: 'none' averages nothing; leave add_swa out instead (or set snapshot_every to "
                          "keep only the snapshot store)")


def install_callback(trainer, args: SWAArguments) -> SWACallback:
    refuse_unsupported(args)
    refuse_best_model_at_end(trainer.args)
    callback = SWACallback(trainer, args)
    trainer.add_callback(callback)
    return callback


def add_swa(trainer, args: SWAArguments) -> SWACallback:
    """Installs SWA in a built `transformers.Trainer` (or a subclass) before `train()`; returns its callback.

    Raises:
        ConfigError: `swa_method` none without a store, `load_best_model_at_end`, or SWA installed already.
    """
    refuse_unsupported(args)
    if getattr(trainer, "swa_callback", None) is not None:
        raise ConfigError("add_swa: this trainer has SWA installed already; call add_swa once")
    callback = install_callback(trainer, args)
    # The instance becomes one of its class's `with_swa` subclass: the Trainer has no hook for what the mixin
    # overrides (see SWATrainerMixin), and a class change leaves every attribute and bound method of the live
    # Trainer as it was, where wrapping `train` and `evaluate` on the instance would replace them.
    trainer.__class__ = with_swa(type(trainer))
    trainer.swa_callback = callback
    return callback
