"""The training loop every recipe shares: train, average, recompute BN, evaluate, checkpoint, export.

A recipe describes its task with a `Task` (how to build the model, the datasets, the metrics, how to
save a model) and calls `train`. Everything SWA-specific happens here and in the modules it calls.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import is_compiled_module, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .averaging import clean_name
from .batches import SelfBatchingDataset, forward_logits
from .candidates import Choice
from .batchnorm import bn_order, shard_loader
from .checkpointing import TrainState, list_checkpoints, resolve_resume_path, save_checkpoint
from .config import ConfigError, SWAArguments, RunArguments, first_line
from .evaluation import evaluate_model, load_metrics
from .optim import build_optimizer
from .outputs import (MetricsLog, candidates_table, plot_curves, summary_table, write_candidates,
                      write_resolved_config)
from .schedule import TrainingPlan, lr_curve, make_plan, make_scheduler
from .sharded import local_shard
from .seeding import BN_STREAM, TRAIN_STREAM, SeededView, loader_generator
from .swa import SWA
from .xla import PhaseCounters, expose_loader_dataset, is_xla, on_host, refuse_bf16_storage, seed_step

logger = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Task:
    """What a recipe hands the loop.

    Attributes:
        build_model: returns a fresh model of the task's architecture; called once (after
            `set_seed`) for training, and again whenever the averaged weights need a module.
        train_dataset: indexable dataset yielding what `collate_fn` batches into model inputs plus
            `labels` (dict batches) or `(inputs, labels)` tuples.
        eval_datasets: split name -> dataset.
        save_model: writes a `from_pretrained`-loadable folder for a module.
        collate_fn: batches samples; None uses torch's default collate.
        metric_names: evaluate modules to report (local ones ship in swa_accel/metrics).
        primary_metric: the metric plotted in curves.png.
        validation_split: the eval split that model selection reads (the choice among SWA candidates);
            never a split that results are reported on. None: the data has none.
        drop_last: drop the last incomplete training batch (static shapes); always on under XLA, where a
            new batch shape compiles a new graph.
        random_transforms: the training dataset draws from the torch RNG per sample (random
            augmentation); the loop then seeds each sample from (seed, epoch, index) with
            `SeededView`. A `SelfBatchingDataset` seeds its own augmentation and ignores this.
    """

    build_model: Callable[[], nn.Module]
    train_dataset: Any
    eval_datasets: dict[str, Any]
    save_model: Callable[[nn.Module, Path], None]
    collate_fn: Optional[Callable] = None
    metric_names: tuple[str, ...] = ("accuracy", "nll", "ece")
    primary_metric: str = "accuracy"
    validation_split: Optional[str] = None
    drop_last: bool = False
    random_transforms: bool = True


def seeded_dataset(task: Task, seed: int, stream: int):
    """The training data under a per-sample augmentation seed: (seed, stream, epoch, index) fixes every draw."""
    dataset = task.train_dataset
    if isinstance(dataset, SelfBatchingDataset):
        return dataset.view(seed, stream)
    return SeededView(dataset, seed, stream) if task.random_transforms else dataset


def check_output_dir(path: Path) -> None:
    """Refuses, before anything is built, an output_dir that cannot be a folder."""
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "it is a file" if existing == path else f"'{existing}' is a file"
                raise ConfigError(f"output_dir: '{path}' cannot be a folder: {where}; choose another output_dir")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a read-only or virtual file system, no permission
        raise ConfigError(f"output_dir: cannot create '{path}': {error.strerror}; choose another output_dir") \
            from None


def set_epoch(dataset, epoch: int) -> None:
    """Tells a seeded dataset which epoch it serves (a dataset without random transforms has nothing to set)."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def keep_on_device(nbytes: int, device: torch.device, placement: str) -> bool:
    """Whether decoded tensors of `nbytes` live on the training device ('auto': when they take a quarter of it)."""
    if placement != "auto" or device.type != "cuda":
        return placement != "host"
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= free // 4


class TrainingDiverged(RuntimeError):
    """A non-finite loss or non-finite weights: the run stops before it saves or averages anything more."""


def _tracker_config(config: dict) -> dict:
    # Trackers such as TensorBoard accept only scalar hyperparameters.
    return {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}


class RecipeTrainer:
    """Owns one run's state; `train()` below is the entry point recipes use."""

    def __init__(self, task: Task, training: RunArguments, swa: SWAArguments, accelerator,
                 config: dict, argv: list[str]) -> None:
        self.task, self.training, self.swa, self.accelerator = task, training, swa, accelerator
        self.output_dir = Path(training.output_dir)
        check_output_dir(self.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        # Resolve the checkpoint before anything heavy, so a bad path fails fast.
        self.resume_path = resolve_resume_path(training.resume_from_checkpoint, self.checkpoint_root)
        previous = [p for p in (self.checkpoint_root, self.output_dir / "final") if p.exists()]
        if self.resume_path is None and previous:
            if not training.overwrite_output_dir:
                # Starting afresh would prune or overwrite another run's checkpoints and averaged weights.
                raise ConfigError(f"output_dir: '{self.output_dir}' already holds a run; resume it with "
                                  "--resume_from_checkpoint latest, choose another output_dir, or pass "
                                  "--overwrite_output_dir true")
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                for path in previous:
                    shutil.rmtree(path)
        self.xla = is_xla(accelerator)
        if self.xla:
            refuse_bf16_storage(swa.enabled)
        self.dtype = DTYPES[training.model_dtype]
        self.input_dtype = None if self.dtype == torch.float32 else self.dtype

        # We build the model after set_seed so that the seed also controls initialisation.
        set_seed(training.seed)
        model = task.build_model().to(self.dtype)
        optimizer = build_optimizer(model, training)
        self.place_tensor_datasets()
        self.train_view = seeded_dataset(task, training.seed, TRAIN_STREAM)
        self.bn_view = seeded_dataset(task, training.seed, BN_STREAM)
        train_loader = DataLoader(self.train_view, batch_size=training.per_device_train_batch_size, shuffle=True,
                                  collate_fn=task.collate_fn, num_workers=self.num_workers(task.train_dataset),
                                  generator=loader_generator(training.seed), drop_last=task.drop_last or self.xla,
                                  pin_memory=self.pin_memory(task.train_dataset))
        self.model, self.optimizer, self.train_loader = accelerator.prepare(model, optimizer, train_loader)
        self.eval_loaders = {
            name: accelerator.prepare(DataLoader(ds, batch_size=training.per_device_eval_batch_size,
                                                 collate_fn=task.collate_fn, num_workers=self.num_workers(ds),
                                                 generator=loader_generator(training.seed),
                                                 pin_memory=self.pin_memory(ds)))
            for name, ds in task.eval_datasets.items()
        }
        if self.xla:
            for loader in (self.train_loader, *self.eval_loaders.values()):
                expose_loader_dataset(loader)
        self.plan: TrainingPlan = make_plan(len(self.train_loader), training, swa)
        self.scheduler = make_scheduler(self.optimizer, self.plan, training)
        self.state = TrainState()
        accelerator.register_for_checkpointing(self.scheduler, self.state)
        self.averaging: Optional[SWA] = None  # everything about the average, its LR phase included (swa.py)
        if swa.enabled:
            self.averaging = SWA(accelerator, self.model, self.optimizer, self.train_loader, swa, plan=self.plan,
                                 build_model=task.build_model, bn_loader=self.bn_loader_factory, seed=training.seed,
                                 phase=self.timed)
            self.check_selection()
        # The training loss stays on the device between logging steps, so no step waits for it.
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.loss_count = 0
        self.timings: dict[str, float] = defaultdict(float)  # seconds per phase, written to final/timings.json
        # XLA's compile and transfer counts per phase, written to final/xla_counters.json.
        self.xla_counters = PhaseCounters() if self.xla else None
        self.metrics = load_metrics(list(task.metric_names), accelerator.main_process_first)
        self.log = MetricsLog(self.output_dir / "metrics.jsonl")

        if self.resume_path is not None:
            # Before anything is written: a checkpoint that does not fit must leave the run's files as they are.
            try:
                accelerator.load_state(str(self.resume_path))
            except Exception as error:  # noqa: BLE001 - torch, safetensors and pickle each raise their own types
                raise ConfigError(f"resume_from_checkpoint: cannot restore '{self.resume_path}' into this run "
                                  f"({first_line(error)}); it holds another model or optimizer, or a damaged "
                                  "file") from error
            logger.info(f"resumed from {self.resume_path} at optimizer step {self.state.global_step}")
        if accelerator.is_main_process:  # (check_output_dir created the folder)
            launch = {"num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
                      "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device),
                      "dynamo_backend": str(accelerator.state.dynamo_plugin.backend.value).lower(),
                      "compiled": is_compiled_module(self.model)}
            write_resolved_config(self.output_dir, config, argv, launch)
        accelerator.wait_for_everyone()
        if self.resume_path is not None:
            if accelerator.is_main_process:
                self.log.truncate_after(self.state.global_step)
        elif accelerator.is_main_process and self.log.path.exists():
            self.log.path.unlink()
        if training.report_to != "none":
            accelerator.init_trackers("swa_accel", config=_tracker_config(config))

    def check_selection(self) -> None:
        """Candidates need a validation split to be chosen on, and a metric the task computes."""
        count = len(self.plan.candidates) + len(self.swa.ema_decay_values())
        if count > 1 and self.task.validation_split is None:
            raise ConfigError("swa_start_candidates: choosing among candidates needs a validation split; "
                              "vision: set validation_fraction (or validation_split), text: an eval_split "
                              "named validation")
        if count > 1 and self.swa.selection_metric not in self.task.metric_names:
            raise ConfigError(f"selection_metric: this recipe computes {', '.join(self.task.metric_names)}, "
                              f"not {self.swa.selection_metric!r}")

    # ----- data ---------------------------------------------------------------------------

    def place_tensor_datasets(self) -> None:
        """Moves self-batching datasets (decoded image tensors) to the training device, or keeps them in host
        memory, once."""
        datasets = [self.task.train_dataset, *self.task.eval_datasets.values()]
        tensors = [ds for ds in datasets if isinstance(ds, SelfBatchingDataset)]
        if not tensors:
            return
        device = self.accelerator.device
        if self.xla:
            # XLA: batches are built on the host and accelerate's loader wrapper copies them in, in a background
            # thread; a batch already on the XLA device makes that copy fail.
            device = torch.device("cpu")
        on_device = keep_on_device(sum(ds.nbytes for ds in tensors), device, self.training.data_placement)
        for ds in tensors:
            ds.place(device, on_device)
        logger.info(f"image tensors ({sum(ds.nbytes for ds in tensors) / 2**20:.1f} MiB) kept in "
                    f"{'the memory of ' + str(device) if on_device else 'host memory'}", main_process_only=True)

    def num_workers(self, dataset) -> int:
        # A self-batching dataset's batch is a few tensor ops on the device: worker processes would only copy.
        return 0 if isinstance(dataset, SelfBatchingDataset) else self.training.dataloader_num_workers

    def pin_memory(self, dataset) -> bool:
        # Host-collated batches (text) go to a GPU through pinned memory, so the copy does not block.
        return self.accelerator.device.type == "cuda" and not isinstance(dataset, SelfBatchingDataset)

    # ----- the averaged model -------------------------------------------------------------

    def bn_loader_factory(self, full_bn_pass: bool) -> Callable[[], Any]:
        """This rank's share of a BN pass: a seeded permutation (new at every step), capped unless `full_bn_pass`."""
        acc, step = self.accelerator, self.state.global_step
        set_epoch(self.bn_view, step)
        cap = None if full_bn_pass else self.swa.bn_recompute_max_samples

        def loader():
            order = bn_order(len(self.bn_view), self.training.seed, step)
            batch_size = self.swa.bn_recompute_batch_size or self.training.per_device_train_batch_size
            return shard_loader(self.bn_view, batch_size, self.task.collate_fn,
                                acc.num_processes, acc.process_index, self.num_workers(self.bn_view),
                                order=order, max_samples=cap)

        return loader

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

    @contextmanager
    def timed(self, phase: str):
        """Times a phase; after the loop (`finish`), as `final_<phase>`, so the loop's own shares stay readable."""
        key = f"final_{phase}" if "total" in self.timings and not phase.startswith("final_") else phase
        start = time.perf_counter()
        with self.counted(phase):
            yield
        self.timings[key] += time.perf_counter() - start

    @contextmanager
    def counted(self, phase: str):
        """Under XLA, a phase with graphs of its own, whose compiles and transfers are counted (elsewhere nothing)."""
        if self.xla_counters is None:
            yield
            return
        with self.xla_counters.phase(phase):
            yield

    def mark_interval(self, series: str, **key) -> None:
        """Under XLA, closes an interval of training counts (per epoch, per logging step); elsewhere nothing."""
        if self.xla_counters is not None:
            self.xla_counters.mark(series, **key)

    # ----- evaluation and checkpoints ----------------------------------------------------

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def evaluate(self, final: bool = False) -> tuple[dict, Optional[nn.Module], Optional[Choice]]:
        """Evaluates the base model and, once averaging has begun, the averaged one; logs both.

        The final evaluation scores every candidate average and returns the choice among them too (else None);
        its "swa" model is the chosen one.
        """
        self.read_health(weights=True)  # never log or export metrics of diverged weights
        acc = self.accelerator
        results: dict[str, dict[str, dict[str, float]]] = {"base": {}}
        base = acc.unwrap_model(self.model)
        with self.timed("evaluation"):
            for split, loader in self.eval_loaders.items():
                results["base"][split] = evaluate_model(base, loader, acc, self.metrics, self.input_dtype)
        choice, swa_module = None, None
        if final:
            choice, swa_module = self.score_candidates()  # (sharded: the module on the main process only)
            if choice is not None:
                results["swa"] = choice.best.metrics
        elif self.averaging is not None:
            with self.averaging.average_in_model() as module:
                if module is not None:
                    results["swa"] = self.evaluate_average(module)
                swa_module = self.averaging.module_to_keep(module)  # (None: it was the training model)
        step, epoch = self.state.global_step, self.state.epoch
        # Every candidate's scores, when there was a choice (a single candidate is the "swa" record itself).
        candidates = choice.candidates if choice is not None and choice.is_a_choice else []
        if acc.is_main_process:
            scored = [(model_name, by_split, {}) for model_name, by_split in results.items()]
            scored += [("candidate", c.metrics, {"candidate": c.name}) for c in candidates]
            for model_name, by_split, extra in scored:
                for split, values in by_split.items():
                    record = {"step": step, "epoch": epoch, "model": model_name, "split": split, **values,
                              "lr": self.current_lr(), "n_averaged": self.averaging.n_averaged if self.averaging else 0,
                              **extra}
                    if final:
                        record["final"] = True
                    self.log.append(record)
        scalars = {f"{m}/{s}/{k}": v for m, by in results.items() for s, vals in by.items() for k, v in vals.items()}
        scalars.update({f"candidates/{c.name}/{s}/{k}": v for c in candidates
                        for s, vals in c.metrics.items() for k, v in vals.items()})
        acc.log(scalars, step=step)
        return results, swa_module, choice

    def evaluate_average(self, module: nn.Module) -> dict[str, dict[str, float]]:
        """Metrics of `average_in_model`'s module on every eval split."""
        dtype = self.averaging.eval_input_dtype(self.input_dtype)
        with self.timed("evaluation"):
            return {split: evaluate_model(module, loader, self.accelerator, self.metrics, dtype)
                    for split, loader in self.eval_loaders.items()}

    def score_candidates(self) -> tuple[Optional[Choice], Optional[nn.Module]]:
        """Every candidate average scored, the choice on the validation split (the other splits only report),
        and the chosen one's module; (None, None) before averaging."""
        if self.averaging is None:
            return None, None
        choice, module = self.averaging.score_candidates(self.evaluate_average, self.task.validation_split,
                                                         self.swa.selection_metric)
        if choice is not None:
            logger.info(f"chosen average: {choice.chosen}: {choice.reason}", main_process_only=True)
        return choice, module

    def checkpoint(self, swa_module: Optional[nn.Module]) -> None:
        """Saves the training state; once averaging has begun, also the BN-recomputed averaged model."""
        self.read_health(weights=True)  # a diverged state must never replace a good checkpoint
        if self.averaging is not None:  # (sharded: the shards are in the checkpoint, no full model)
            swa_module = self.averaging.module_for_checkpoint(swa_module)
        writer = None
        if swa_module is not None:
            writer = lambda folder: self.save_model(swa_module, folder / "swa_model")  # noqa: E731
        with self.timed("checkpointing"):
            path = save_checkpoint(self.accelerator, self.checkpoint_root, self.state.global_step,
                                   self.training.checkpoints_total_limit, writer)
        logger.info(f"saved checkpoint {path}")

    def save_model(self, module: nn.Module, folder: Path) -> None:
        """The task's `save_model`; on XLA from host memory, since the files are written from there."""
        if not self.xla:
            self.task.save_model(module, folder)
            return
        with on_host(module, self.accelerator.device):
            self.task.save_model(module, folder)

    def eval_due(self, epoch_end: bool) -> bool:
        if self.training.eval_steps is not None:
            return self.state.global_step % self.training.eval_steps == 0
        return epoch_end and self.state.epoch % self.training.eval_every_epochs == 0

    def checkpoint_due(self, epoch_end: bool) -> bool:
        every = self.training.checkpointing_steps
        if every is None:
            return False
        if every == "epoch":
            return epoch_end
        return self.state.global_step % int(every) == 0

    # ----- the loop ------------------------------------------------------------------------

    def train_step(self, batch) -> torch.Tensor:
        acc = self.accelerator
        with acc.accumulate(self.model):
            logits, labels = forward_logits(self.model, batch, self.input_dtype)
            loss = F.cross_entropy(logits.float(), labels)
            acc.backward(loss)
            if acc.sync_gradients and self.training.max_grad_norm is not None:
                acc.clip_grad_norm_(self.model.parameters(), self.training.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.loss_sum += loss.detach().float()
        self.loss_count += 1
        return loss

    def read_health(self, weights: bool) -> float:
        """The mean training loss since the last read (over ranks); raises `TrainingDiverged` if anything is not finite.

        One collective and one read for everything: the loss, the averager's non-finite flag and, with
        `weights`, a norm of the model's weights (before anything is saved from them).
        """
        acc = self.accelerator
        zero = torch.zeros((), device=acc.device)
        skipped = self.averaging.averager.nonfinite_seen.to(acc.device) if self.averaging is not None else zero
        bad_weights = zero
        if weights:
            norms = torch._foreach_norm([local_shard(p.detach()) for p in self.model.parameters()])
            bad_weights = ~torch.stack(norms).float().sum().isfinite()
        # The loss sum, not a mean: a step count in the graph would make XLA compile one graph per count.
        values = acc.reduce(torch.stack([self.loss_sum, skipped.float(), bad_weights.float()]),
                            reduction="sum").tolist()
        mean_loss = values[0] / (max(self.loss_count, 1) * acc.num_processes)  # (every rank counts the same steps)
        problems = [what for what, bad in (
            (f"the training loss is {mean_loss}", not math.isfinite(mean_loss)),
            ("an averaging update met non-finite weights and skipped them", values[1] > 0),
            ("the weights are not finite", values[2] > 0)) if bad]
        if problems:
            checkpoints = list_checkpoints(self.checkpoint_root)
            saved = (f"the last checkpoint, {checkpoints[-1]}, and the average are intact" if checkpoints
                     else "no checkpoint was saved yet, and the average is intact")
            raise TrainingDiverged(
                f"training: diverged by optimizer step {self.state.global_step} ({'; '.join(problems)}); stopped "
                f"before saving anything: {saved}; resume with a lower learning_rate or with max_grad_norm set")
        return mean_loss

    def log_training_progress(self, progress) -> None:
        """Every `logging_steps`: the mean training loss since the last read, over ranks, to the bar and trackers.

        This is the loop's only read of a training value; between two logging steps nothing waits on the device.
        A non-finite loss stops the run here (`read_health`).
        """
        acc = self.accelerator
        step = self.state.global_step
        if step % self.training.logging_steps and step < self.plan.total_steps:
            return
        self.mark_interval("log_intervals", step=step)
        with self.counted("logging"):
            mean_loss = self.read_health(weights=False)
            self.loss_sum.zero_()
        self.loss_count = 0
        lr = self.current_lr()
        progress.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.4g}")
        acc.log({"train/loss": mean_loss, "train/lr": lr, "train/epoch": step / self.plan.steps_per_epoch}, step=step)

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
        if self.averaging is not None:  # (under XLA its work runs as graphs of its own: see `counted`)
            self.averaging.after_step(self.state.global_step, epoch_end, stepped)
        if epoch_end:
            self.mark_interval("epochs", epoch=self.state.epoch)
        if self.state.global_step >= self.plan.total_steps:
            return  # the last step's evaluation and checkpoint happen in finish()
        swa_module = None
        if self.eval_due(epoch_end):
            with self.counted("evaluation"):  # (its health read, BN pass and scoring included)
                _, swa_module, _ = self.evaluate()
        if self.checkpoint_due(epoch_end) or self.state.global_step == self.training.stop_after_step:
            with self.counted("checkpointing"):
                self.checkpoint(swa_module)

    def run(self) -> dict:
        acc, plan = self.accelerator, self.plan
        run_start = time.perf_counter()
        logger.info(f"{plan.total_steps} optimizer steps ({plan.num_epochs} epochs of {plan.steps_per_epoch}); "
                    f"averaging ({self.swa.swa_method}) from step {plan.swa_start_step}", main_process_only=True)
        progress = tqdm(total=plan.total_steps, initial=self.state.global_step,
                        disable=not acc.is_local_main_process, desc="train")
        self.model.train()
        self.mark_interval("epochs", epoch=self.state.epoch)  # (the first call opens the interval)
        self.mark_interval("log_intervals", step=self.state.global_step)
        try:
            stopped = self.train_loop(progress)
        finally:
            progress.close()  # before any error line, so that the line is the last one printed
        if stopped:
            logger.info(f"stopped after step {self.state.global_step} as asked (stop_after_step); "
                        "continue with --resume_from_checkpoint latest", main_process_only=True)
            acc.end_training()
            return {}
        self.timings["total"] = time.perf_counter() - run_start
        return self.finish()

    def train_loop(self, progress) -> bool:
        """Epochs of steps until the budget is spent; True when the run stopped early as asked."""
        acc, plan = self.accelerator, self.plan
        while self.state.global_step < plan.total_steps:
            self.train_loader.set_epoch(self.state.epoch)
            set_epoch(self.train_view, self.state.epoch)
            loader = self.train_loader
            if self.state.batches_in_epoch:
                loader = acc.skip_first_batches(self.train_loader, self.state.batches_in_epoch)
            for batch in loader:
                if self.xla:
                    seed_step(self.training.seed, self.state.epoch, self.state.batches_in_epoch)
                self.train_step(batch)
                self.state.batches_in_epoch += 1
                if acc.sync_gradients:
                    self.after_optimizer_step()
                    progress.update(1)
                    self.log_training_progress(progress)
                    if self.state.global_step >= plan.total_steps or self.stop_requested():
                        break
            if self.stop_requested():
                return True
        return False

    def stop_requested(self) -> bool:
        return self.state.global_step == self.training.stop_after_step

    def finish(self) -> dict:
        """Final evaluation, last checkpoint, exports, plot and the closing table."""
        acc = self.accelerator
        # The final/swa export is the very module evaluated here, so its logged metrics reproduce on reload.
        with self.timed("final_evaluation"):  # includes scoring every candidate average
            results, swa_module, choice = self.evaluate(final=True)
        if self.checkpoint_due(epoch_end=self.state.batches_in_epoch == 0):
            with self.counted("checkpointing"):
                self.checkpoint(swa_module)
        final_dir = self.output_dir / "final"
        with self.counted("export"):
            base = self.base_for_export()
            if acc.is_main_process:
                self.save_model(base, final_dir / "base")
                if swa_module is not None:  # on the main process, the chosen average with BN recomputed
                    self.save_model(swa_module, final_dir / "swa")
        if acc.is_main_process:
            if choice is not None:
                write_candidates(final_dir / "candidates.json", choice)
            (final_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
            # Phase timings of this process (total = the training loop, before the final evaluation).
            (final_dir / "timings.json").write_text(json.dumps(self.timings, indent=2), encoding="utf-8")
            if self.xla_counters is not None:  # graphs compiled and device-to-host copies, per phase
                (final_dir / "xla_counters.json").write_text(json.dumps(self.xla_counters.report(), indent=2),
                                                             encoding="utf-8")
            if self.training.plot:
                lrs = lr_curve(self.plan, self.training, self.swa)
                plot_curves(self.log.read(), lrs, self.plan.swa_start_step, self.task.primary_metric,
                            self.output_dir / "curves.png", choice)
            print("\nfinal evaluation (base = last iterate, swa = the chosen average):")
            print(summary_table(results))
            if choice is not None and choice.is_a_choice:
                print(f"\ncandidates (scored on '{choice.selection_split}'; the other splits only report):")
                print(candidates_table(choice))
            if choice is not None:
                print(f"chosen: {choice.chosen}: {choice.reason}")
        acc.wait_for_everyone()
        acc.end_training()
        return results


def train(task: Task, training: RunArguments, swa: SWAArguments, accelerator, config: dict,
          argv: list[str]) -> dict:
    """Runs a whole training job and returns the final evaluation {model: {split: {metric: value}}}."""
    return RecipeTrainer(task, training, swa, accelerator, config, argv).run()
