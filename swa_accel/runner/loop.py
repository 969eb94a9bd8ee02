"""The recipes' training loop: a generic accelerate loop that calls the SWA controller (`swa.py`) at named points.

A recipe describes its task with a `Task` (task.py) and calls `train`. The loop trains, evaluates, checkpoints
and exports; everything about the average (when to update it, its LR phase, placement, candidates, BN recompute)
is the controller's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from ..averaging import clean_name
from ..batches import forward_logits
from ..candidates import Choice, check_selection
from ..errors import ConfigError
from .checkpointing import (TrainState, check_output_dir, checkpoint_name, clear_previous_run, list_checkpoints,
                            resolve_resume_path, restore, save_checkpoint)
from .config import RunArguments, SWAArguments
from .console import divergence_advice, evaluation_line, plan_line, plan_warnings, say
from .evaluation import evaluate_model, load_metrics
from .health import Health, TrainingDiverged
from .optim import build_optimizer
from .outputs import (MetricsLog, finished_run, launch_record, log_evaluation, plot_curves, print_closing_table,
                      write_final_records, write_resolved_config)
from .phases import PhaseClock
from .lr_schedule import TrainingPlan, lr_curve, make_plan, make_scheduler, rates_from_config
from ..swa import SWA
from .task import Task, TaskData, set_epoch
from .sync_bn import synced_batchnorm
from .preemption import PREEMPTED_EXIT_CODE, StopSignals
from .xla import expose_loader_dataset, is_xla, on_host, refuse_bf16_storage, seed_step

logger = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

__all__ = ["DTYPES", "RecipeTrainer", "Task", "TrainingDiverged", "train"]


class RecipeTrainer:
    """Owns one run's state; `train()` below is the entry point recipes use."""

    def __init__(self, task: Task, training: RunArguments, swa: SWAArguments, accelerator,
                 config: dict, argv: list[str]) -> None:
        self.task, self.training, self.swa, self.accelerator = task, training, swa, accelerator
        self.output_dir = Path(training.output_dir)
        check_output_dir(self.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        # Resolve the checkpoint before anything heavy, so a bad path fails fast.
        if training.choose_from_store and not swa.store_enabled:
            raise ConfigError("choose_from_store: this config keeps no snapshot store; pass the run's snapshot_every "
                              "(and the families to build)")
        if training.choose_from_store and not list_checkpoints(self.checkpoint_root):
            raise ConfigError(f"choose_from_store: no checkpoint in {self.checkpoint_root}; the run to choose from "
                              "needs its last checkpoint (checkpointing_steps) and its snapshot store")
        self.resume_path = resolve_resume_path("latest" if training.choose_from_store else
                                               training.resume_from_checkpoint, self.checkpoint_root)
        clear_previous_run(accelerator, self.output_dir, self.resume_path is not None, training.overwrite_output_dir,
                           auto=training.resume_from_checkpoint == "auto")
        self.xla = is_xla(accelerator)
        if self.xla:
            refuse_bf16_storage(swa.enabled)
        self.dtype = DTYPES[training.model_dtype]
        self.input_dtype = None if self.dtype == torch.float32 else self.dtype

        set_seed(training.seed)  # before the model is built, so that the seed also controls initialisation
        model = synced_batchnorm(task.build_model().to(self.dtype), training.sync_batchnorm, accelerator)
        optimizer = build_optimizer(model, training)
        self.data = TaskData(task, training, accelerator.device, self.xla)
        self.model, self.optimizer, self.train_loader = accelerator.prepare(model, optimizer, self.data.train_loader())
        self.eval_loaders = {name: accelerator.prepare(loader) for name, loader in self.data.eval_loaders().items()}
        if self.xla:
            for loader in (self.train_loader, *self.eval_loaders.values()):
                expose_loader_dataset(loader)
        self.plan: TrainingPlan = make_plan(len(self.train_loader), training, swa)
        self.scheduler = make_scheduler(self.optimizer, self.plan, training)
        self.state = TrainState()
        accelerator.register_for_checkpointing(self.scheduler, self.state)
        self.clock = PhaseClock(self.xla)  # seconds (and under XLA, graphs and copies) per phase
        self.averaging: Optional[SWA] = None  # everything about the average, its LR phase included
        if swa.enabled or swa.store_only:  # (store only: the store is kept; the run trains as without SWA)
            self.averaging = SWA(accelerator, self.model, self.optimizer, self.train_loader, swa, plan=self.plan,
                                 build_model=task.build_model, bn_loader=self.bn_loader, seed=training.seed,
                                 phase=self.clock.timed, verbose=False, store_dir=self.output_dir / "snapshots",
                                 checkpoints_kept=training.checkpoints_total_limit)
            check_selection(self.averaging.candidate_count(), task.validation_split, swa.selection_metric,
                            task.metric_names, swa.candidate_options())
        self.health = Health(accelerator, self.checkpoint_root, training.divergence_bound)
        self.signals = StopSignals(training.stop_signal)  # installed while `run` runs
        self.stop_signalled = False  # some rank got a stop signal, as every rank learned at a logging step
        self.exit_code = 0  # PREEMPTED_EXIT_CODE after a stop signal
        self.metrics = load_metrics(list(task.metric_names), accelerator.main_process_first)
        self.log = MetricsLog(self.output_dir / "metrics.jsonl")
        if self.resume_path is not None:  # before anything is written: a checkpoint that does not fit changes nothing
            configured = [group["initial_lr"] for group in self.optimizer.param_groups]  # (LambdaLR's base)
            restore(accelerator, self.resume_path)
            rates_from_config(self.optimizer, self.scheduler, configured)  # never the checkpoint's stale rates
            if self.averaging is not None and self.averaging.lr_phase is not None:
                self.averaging.lr_phase.apply(self.state.global_step)
            say(accelerator, f"resumed from {self.resume_path} at optimizer step {self.state.global_step} (epoch "
                             f"{self.state.epoch})")
        # A requeued job of a run that finished: nothing to train, nothing to rewrite.
        self.finished_before = self.resume_path is not None and finished_run(self.output_dir, self.plan.total_steps)
        if accelerator.is_main_process and not self.finished_before:
            write_resolved_config(self.output_dir, config, argv, launch_record(accelerator, self.model))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and not self.finished_before:
            self.log.start(resumed_at=self.state.global_step if self.resume_path is not None else None)
        if training.report_to != "none":
            # Trackers such as TensorBoard accept only scalar hyperparameters.
            scalars = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers("swa_accel", config=scalars)

    def bn_loader(self, full_bn_pass: bool):
        """This rank's share of a BN pass at the current step (capped unless `full_bn_pass`)."""
        acc = self.accelerator
        return self.data.bn_loader(self.state.global_step,
                                   self.swa.bn_recompute_batch_size or self.training.per_device_train_batch_size,
                                   None if full_bn_pass else self.swa.bn_recompute_max_samples,
                                   acc.num_processes, acc.process_index)

    def base_for_export(self) -> Optional[nn.Module]:
        """The last iterate as a module on the main process (FSDP: gathered once from the shards); None elsewhere."""
        acc = self.accelerator
        if acc.distributed_type.value != "FSDP":
            return acc.unwrap_model(self.model) if acc.is_main_process else None
        state = acc.get_state_dict(self.model)  # a collective under FSDP: every rank calls it
        if not acc.is_main_process:
            return None
        module = self.task.build_model().to(self.dtype)
        module.load_state_dict({clean_name(k): v for k, v in state.items()})
        return module

    def save_model(self, module: nn.Module, folder: Path) -> None:
        """The task's `save_model`; on XLA from host memory, since the files are written from there."""
        if not self.xla:
            self.task.save_model(module, folder)
            return
        with on_host(module, self.accelerator.device):
            self.task.save_model(module, folder)

    # ----- evaluation and checkpoints ----------------------------------------------------

    @property
    def advice(self) -> str:
        """The end of a divergence line: the rate of the phase that diverged (console.py)."""
        return divergence_advice(self.plan, self.training, self.swa if self.swa.enabled else None,
                                 self.state.global_step)

    def read_health(self, weights: bool, stop: float = 0.0) -> float:
        """The mean training loss since the last reset; raises `TrainingDiverged` if anything is not finite."""
        flag = self.averaging.averager.nonfinite_seen if self.averaging is not None else None
        return self.health.read(self.state.global_step, self.model if weights else None, flag, self.advice, stop)

    @property
    def scores_average(self) -> bool:
        """Whether evaluations score the average: in an SWA run, and when choosing from a store-only run's store (which
        otherwise trains, evaluates and exports as a run without SWA)."""
        return self.averaging is not None and (self.swa.enabled or self.training.choose_from_store)

    def evaluate(self, final: bool = False) -> tuple[dict, Optional[nn.Module], Optional[Choice]]:
        """Evaluates the base model and, once averaging has begun, the averaged one; logs both.

        The final evaluation scores every candidate average and returns the choice among them too (else None);
        its "swa" model is the chosen one.
        """
        self.read_health(weights=True)  # never log or export metrics of diverged weights
        acc = self.accelerator
        base = acc.unwrap_model(self.model)
        with self.clock.timed("evaluation"):
            results = {"base": {split: evaluate_model(base, loader, acc, self.metrics, self.input_dtype)
                                for split, loader in self.eval_loaders.items()}}
        choice, swa_module = None, None
        if final and self.scores_average:  # every candidate scored, the choice on the validation split
            choice, swa_module = self.averaging.score_candidates(self.evaluate_average, self.task.validation_split,
                                                                 self.swa.selection_metric)
            if choice is not None:
                results["swa"] = choice.best.metrics
                logger.info(f"chosen average: {choice.chosen}: {choice.reason}", main_process_only=True)
        elif self.scores_average:
            with self.averaging.average_in_model() as module:
                if module is not None:
                    results["swa"] = self.evaluate_average(module)
                swa_module = self.averaging.module_to_keep(module)  # (None: it was the training model)
        if not final:
            say(acc, evaluation_line(results, self.state.global_step, self.state.epoch, self.task.validation_split,
                                     self.task.primary_metric))
        log_evaluation(self.log if acc.is_main_process else None, acc, results, choice, self.state.global_step,
                       self.state.epoch, self.optimizer.param_groups[0]["lr"],
                       self.averaging.n_averaged if self.scores_average else 0, final)
        return results, swa_module, choice

    def evaluate_average(self, module: nn.Module) -> dict[str, dict[str, float]]:
        """Metrics of `average_in_model`'s module on every eval split."""
        dtype = self.averaging.eval_input_dtype(self.input_dtype)
        with self.clock.timed("evaluation"):
            return {split: evaluate_model(module, loader, self.accelerator, self.metrics, dtype)
                    for split, loader in self.eval_loaders.items()}

    def checkpoint(self, swa_module: Optional[nn.Module]) -> None:
        """Saves the training state; once averaging has begun, also the BN-recomputed averaged model."""
        self.read_health(weights=True)  # a diverged state must never replace a good checkpoint
        if self.scores_average:  # (sharded: the shards are in the checkpoint, no full model)
            swa_module = self.averaging.module_for_checkpoint(swa_module)
        self.health.check_average(swa_module, self.state.global_step, self.advice)
        writer = None
        if swa_module is not None:
            writer = lambda folder: self.save_model(swa_module, folder / "swa_model")  # noqa: E731
        with self.clock.timed("checkpointing"):
            path = save_checkpoint(self.accelerator, self.checkpoint_root, self.state.global_step,
                                   self.training.checkpoints_total_limit, writer)
        logger.info(f"saved checkpoint {path}")

    def eval_due(self, epoch_end: bool) -> bool:
        if self.training.eval_steps is not None:
            return self.state.global_step % self.training.eval_steps == 0
        return epoch_end and self.state.epoch % self.training.eval_every_epochs == 0

    def checkpoint_due(self, epoch_end: bool) -> bool:
        every = self.training.checkpointing_steps
        if every is None:
            return False
        return epoch_end if every == "epoch" else self.state.global_step % int(every) == 0

    # ----- the loop ------------------------------------------------------------------------

    def train_step(self, batch) -> None:
        acc = self.accelerator
        with acc.accumulate(self.model):
            logits, labels = forward_logits(self.model, batch, self.input_dtype)
            loss = F.cross_entropy(logits.float(), labels)
            acc.backward(loss)
            if acc.sync_gradients and self.training.max_grad_norm is not None:
                acc.clip_grad_norm_(self.model.parameters(), self.training.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.health.add(loss)  # on the device: nothing waits for it until the next logging step

    def log_training_progress(self, progress) -> None:
        """Every `logging_steps`: the mean training loss since the last read, over ranks, to the bar and trackers.

        This is the loop's only read of a training value; between two logging steps nothing waits on the device.
        A non-finite loss stops the run here (`health.py`).
        """
        step = self.state.global_step
        if step % self.training.logging_steps and step < self.plan.total_steps:
            return
        self.clock.mark("log_intervals", step=step)
        with self.clock.counted("logging"):
            mean_loss = self.read_health(weights=False, stop=self.signals.pending)
            self.health.reset()
        self.stop_signalled = self.health.stop_agreed  # every rank stops after this same step
        lr = self.optimizer.param_groups[0]["lr"]
        progress.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.4g}")
        self.accelerator.log({"train/loss": mean_loss, "train/lr": lr,
                              "train/epoch": step / self.plan.steps_per_epoch}, step=step)

    def after_optimizer_step(self) -> None:
        """Schedule and average after a real optimizer step, counted by `sync_gradients`."""
        self.state.global_step += 1
        # An fp16 overflow skips the step: neither the LR schedule nor the average may move then.
        stepped = not self.accelerator.optimizer_step_was_skipped
        if stepped:
            self.scheduler.step()
        epoch_end = self.state.batches_in_epoch == len(self.train_loader)
        if epoch_end:
            self.state.epoch += 1
            self.state.batches_in_epoch = 0
        if self.averaging is not None:  # (under XLA its work runs as graphs of its own: see `PhaseClock`)
            self.averaging.after_step(self.state.global_step, epoch_end, stepped)
        if epoch_end:
            self.clock.mark("epochs", epoch=self.state.epoch)
        if self.state.global_step >= self.plan.total_steps:
            return  # the last step's evaluation and checkpoint happen in finish()
        swa_module = None
        if self.eval_due(epoch_end):
            with self.clock.counted("evaluation"):  # (its health read, BN pass and scoring included)
                _, swa_module, _ = self.evaluate()
        if self.checkpoint_due(epoch_end) or self.state.global_step == self.training.stop_after_step:
            with self.clock.counted("checkpointing"):
                self.checkpoint(swa_module)

    def run(self) -> dict:
        """Trains to the end of the budget (or a requested stop), then `finish`; stop signals are noted meanwhile."""
        self.signals.install()  # (noted only: a checkpoint or evaluation in progress finishes as if nothing happened)
        try:
            return self.run_with_signals_noted()
        finally:
            self.signals.uninstall()

    def run_with_signals_noted(self) -> dict:
        acc, plan = self.accelerator, self.plan
        if self.training.choose_from_store:
            return self.choose_from_store()
        if self.finished_before:
            if acc.is_main_process:
                print(f"finished already: {self.output_dir}/final holds this run's models and results; nothing to do",
                      flush=True)
            acc.end_training()
            return {}
        run_start = time.perf_counter()
        store = self.averaging.store_lines() if self.averaging is not None else []
        for line in [plan_line(plan, self.swa), *plan_warnings(plan, self.swa), *store]:
            say(acc, line)
        progress = tqdm(total=plan.total_steps, initial=self.state.global_step,
                        # (None: off where stderr is no terminal, so a log file gets no bar fragments)
                        disable=None if acc.is_local_main_process else True, desc="train")
        self.model.train()
        self.clock.mark("epochs", epoch=self.state.epoch)  # (the first call opens the interval)
        self.clock.mark("log_intervals", step=self.state.global_step)
        try:
            stopped = self.train_loop(progress)
        finally:
            progress.close()  # before any error line, so that the line is the last one printed
        if self.stop_signalled:
            return self.stop_on_signal()
        if stopped:
            say(acc, f"stopped after optimizer step {self.state.global_step} as asked (stop_after_step): saved "
                     f"{self.checkpoint_root / checkpoint_name(self.state.global_step)}; continue with "
                     "--resume_from_checkpoint latest")
            acc.end_training()
            return {}
        self.clock.close_loop(time.perf_counter() - run_start)
        return self.finish()

    def train_loop(self, progress) -> bool:
        """Epochs of steps until the budget is spent; True when the run stopped early as asked."""
        acc, plan, state = self.accelerator, self.plan, self.state
        while state.global_step < plan.total_steps:
            self.train_loader.set_epoch(state.epoch)
            set_epoch(self.data.train_view, state.epoch)
            loader = self.train_loader
            if state.batches_in_epoch:
                loader = acc.skip_first_batches(self.train_loader, state.batches_in_epoch)
            for batch in loader:
                if self.xla:
                    seed_step(self.training.seed, state.epoch, state.batches_in_epoch)
                self.train_step(batch)
                state.batches_in_epoch += 1
                if acc.sync_gradients:
                    self.after_optimizer_step()
                    progress.update(1)
                    self.log_training_progress(progress)
                    if state.global_step >= plan.total_steps or self.stop_requested() or self.stop_signalled:
                        break
            if self.stop_requested() or self.stop_signalled:
                return True
        return False

    def stop_on_signal(self) -> dict:
        """After a stop signal: a checkpoint of the step every rank finished, one line, status 143."""
        acc, step = self.accelerator, self.state.global_step
        saved = list_checkpoints(self.checkpoint_root)
        if not saved or saved[-1].name != checkpoint_name(step):  # (unless this very step was just saved)
            with self.clock.counted("checkpointing"):
                self.checkpoint(None)
        if acc.is_main_process:
            print(f"stopped by {self.signals.received or 'a stop signal on another rank'} after optimizer step {step}: "
                  f"saved {self.checkpoint_root / checkpoint_name(step)}; continue with --resume_from_checkpoint "
                  "auto (or latest)", file=sys.stderr, flush=True)
        acc.end_training()
        self.exit_code = PREEMPTED_EXIT_CODE
        return {}

    def choose_from_store(self) -> dict:
        """`choose_from_store`: every candidate of the finished run scored again, the chosen one exported into
        output_dir/chosen; nothing of the run itself is rewritten."""
        acc = self.accelerator
        if self.state.global_step != self.plan.total_steps:
            raise ConfigError(f"choose_from_store: the latest checkpoint is at step {self.state.global_step} of "
                              f"{self.plan.total_steps}; finish the run first (--resume_from_checkpoint latest)")
        self.averaging.start_candidates_from_store()
        self.log = None  # (the run's metrics.jsonl stays as the run left it)
        results, swa_module, choice = self.evaluate(final=True)
        chosen_dir = self.output_dir / "chosen"
        if acc.is_main_process:
            if swa_module is not None:
                self.save_model(swa_module, chosen_dir / "swa")
            write_final_records(chosen_dir, results, choice, dict(self.clock.timings), None)
            print_closing_table(results, choice)
            print(f"chosen from the store: {chosen_dir / 'swa'}", flush=True)
        acc.wait_for_everyone()
        acc.end_training()
        return results

    def stop_requested(self) -> bool:
        return self.state.global_step == self.training.stop_after_step

    def finish(self) -> dict:
        """Final evaluation, last checkpoint, exports, plot and the closing table."""
        acc = self.accelerator
        # The final/swa export is the very module evaluated here, so its logged metrics reproduce on reload.
        with self.clock.timed("final_evaluation"):  # includes scoring every candidate average
            results, swa_module, choice = self.evaluate(final=True)
        # A run that keeps the snapshot store also checkpoints its last step (where it checkpoints at all): that is
        # where --choose_from_store starts from.
        keeps_store = self.averaging is not None and self.averaging.store_plan is not None
        if self.checkpoint_due(epoch_end=self.state.batches_in_epoch == 0) or (
                keeps_store and self.training.checkpointing_steps is not None):
            with self.clock.counted("checkpointing"):
                self.checkpoint(swa_module)
        if self.averaging is not None:  # (after the last checkpoint: the weight files only older ones named go)
            self.averaging.finish_store()
        final_dir = self.output_dir / "final"
        with self.clock.counted("export"):
            base = self.base_for_export()
            if acc.is_main_process:
                self.save_model(base, final_dir / "base")
                if swa_module is not None:  # on the main process, the chosen average with BN recomputed
                    self.save_model(swa_module, final_dir / "swa")
        if acc.is_main_process:
            counters = self.clock.xla_counters
            write_final_records(final_dir, results, choice, dict(self.clock.timings),
                                counters.report() if counters is not None else None)
            if self.training.plot:
                plot_curves(self.log.read(), lr_curve(self.plan, self.training, self.swa), self.plan.swa_start_step,
                            self.task.primary_metric, self.output_dir / "curves.png", choice, self.plan.steps_per_epoch)
            print_closing_table(results, choice)
        acc.wait_for_everyone()
        acc.end_training()
        return results


def train(task: Task, training: RunArguments, swa: SWAArguments, accelerator, config: dict,
          argv: list[str]) -> dict:
    """Runs a whole training job and returns the final evaluation {model: {split: {metric: value}}}."""
    return RecipeTrainer(task, training, swa, accelerator, config, argv).run()
