"""The average during a run, in one object: when to update it, where it lives, its candidates, the averaged model
with BN recomputed, checkpointing, the export.

A training loop builds one `SWA` after `accelerator.prepare` and calls it at named points:

    swa = SWA(accelerator, model, swa_args, plan, build_model, bn_loader)
    ...  # after every real optimizer step (counted by `accelerator.sync_gradients`):
    swa.after_step(global_step, epoch_end, stepped=not accelerator.optimizer_step_was_skipped)
    ...  # to evaluate or save the average, on every rank:
    with swa.average_in_model() as module:  # BN statistics recomputed; None before the first update
        evaluate(module)
    choice, module = swa.score_candidates(evaluate_fn, validation_split, metric)  # at the end

The LR of the SWA phase is the scheduler's (`schedule.make_scheduler`); the loop steps it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Optional

from torch import nn

from .averaging import MainProcessPlacement, WeightAverager, choose_placement
from .batchnorm import recompute_bn
from .candidates import Candidate, Choice, choose
from .config import ConfigError, SWAArguments
from .schedule import TrainingPlan
from .sharded import (ShardedPlacement, gather_full_state, recompute_bn_sharded, register_shard_checkpointing,
                      swapped_in)

#: `bn_loader(full_pass)`: a factory of this rank's loader for one BN pass (capped unless `full_pass`).
BNLoader = Callable[[bool], Callable[[], Any]]
#: `phase(name)`: a context in which the loop times (and under XLA counts) a phase of the average's work.
Phase = Callable[[str], ContextManager]


def _no_phase(name: str) -> ContextManager:
    return contextlib.nullcontext()


class SWA:
    """One run's average and everything done with it.

    Args:
        accelerator: the run's Accelerator.
        model: the prepared (possibly wrapped, compiled or sharded) model.
        args: the SWA settings.
        plan: the run's timeline in optimizer steps (`schedule.make_plan`): the SWA start, update cadence,
            later candidate starts.
        build_model: returns a fresh module of the model's architecture (for the averaged module and exports).
        bn_loader: see `BNLoader`.
        phase: see `Phase`.

    Raises:
        ConfigError: the launch shards the weights in a way no placement averages (FSDP1, ZeRO-3).
    """

    def __init__(self, accelerator, model: nn.Module, args: SWAArguments, plan: TrainingPlan,
                 build_model: Callable[[], nn.Module], bn_loader: BNLoader, phase: Phase = _no_phase) -> None:
        self.accelerator, self.model, self.args, self.plan = accelerator, model, args, plan
        self.build_model, self.bn_loader, self.phase = build_model, bn_loader, phase
        deepspeed = getattr(accelerator.state, "deepspeed_plugin", None)
        fsdp = getattr(accelerator.state, "fsdp_plugin", None)
        try:
            placement_name = choose_placement(args.swa_placement, accelerator.distributed_type.value,
                                              getattr(deepspeed, "zero_stage", None),
                                              getattr(fsdp, "fsdp_version", None))
        except ValueError as error:
            raise ConfigError(str(error)) from None
        # Sharded: the average lives in shards and is used by swapping it into the model (sharded.py).
        self.sharded = placement_name == "sharded"
        placement = (ShardedPlacement if self.sharded else MainProcessPlacement)(
            accelerator.device, offload_to_cpu=args.swa_offload_to_cpu)
        self.averager = WeightAverager(model, args.swa_method, placement, accelerator.process_index, args.ema_decay,
                                       args.ema_warmup, args.ema_buffers, args.ema_decay_values())

    def register_for_checkpointing(self) -> None:
        """accelerate's `save_state`/`load_state` then save and restore the average (sharded: one file per rank)."""
        if self.sharded:
            register_shard_checkpointing(self.accelerator, self.averager)
        else:
            self.accelerator.register_for_checkpointing(self.averager)

    @property
    def n_averaged(self) -> int:
        return self.averager.n_averaged

    # ----- during training ------------------------------------------------------------------

    def after_step(self, global_step: int, epoch_end: bool, stepped: bool) -> None:
        """Starts the candidates due and folds the weights in when the plan says so, after optimizer step
        `global_step`. `stepped` False (an fp16 overflow skipped the step): the average does not move."""
        # A candidate starting at step c averages the updates after step c: its copy is taken before them.
        for name, start in self.plan.candidates:
            if start < global_step and name not in self.averager.starts:
                with self.phase("candidate_starts"):
                    self.averager.start_candidate(name)
        if stepped and (self.plan.update_after_step(global_step)
                        or (epoch_end and self.plan.update_at_epoch_end(global_step))):
            with self.phase("averaging_updates"):
                self.averager.update(self.model)

    # ----- the averaged model ---------------------------------------------------------------

    def eval_input_dtype(self, training_input_dtype):
        """The input dtype for evaluating `average_in_model`'s module: a sharded average is evaluated in the
        training model, in its dtype; the main placement's module is fp32."""
        return training_input_dtype if self.sharded else None

    @contextlib.contextmanager
    def average_in_model(self, full_bn_pass: bool = False, candidate: Optional[str] = None):
        """Yields a module holding the average (or a candidate), BN recomputed, on every rank; None before averaging.

        Main placement: a separate fp32 module (it outlives the block). Sharded placement: the training model
        itself, with the averaged shards swapped in until the block ends (no full gather); its weights and
        buffers are then restored bit for bit. Intermediate uses recompute BN over `bn_recompute_max_samples`
        random training samples; `full_bn_pass` (the final export) reads the whole training set.
        """
        if self.averager.n_averaged == 0:
            yield None
            return
        acc = self.accelerator
        if not self.sharded:
            module = self.averager.materialize(self.build_model, acc.unwrap_model(self.model), acc.device,
                                               acc.num_processes, candidate)
            self._recompute_bn(recompute_bn, module, full_bn_pass)
            yield module
            return
        with swapped_in(self.averager, self.model, candidate):
            module = acc.unwrap_model(self.model)
            self._recompute_bn(recompute_bn_sharded, module, full_bn_pass)
            yield module

    def _recompute_bn(self, recompute: Callable, module: nn.Module, full_bn_pass: bool) -> None:
        if self.args.swa_method == "swa":  # (an EMA averages the BN buffers, or copies them)
            acc = self.accelerator
            with self.phase("bn_recompute"):
                recompute(module, self.bn_loader(full_bn_pass), acc.device, acc.num_processes, acc.autocast)

    def module_to_keep(self, module: Optional[nn.Module]) -> Optional[nn.Module]:
        """`average_in_model`'s module if it outlives its block (main placement), else None (the training model)."""
        return None if self.sharded else module

    def module_for_checkpoint(self, evaluated: Optional[nn.Module]) -> Optional[nn.Module]:
        """The averaged module a checkpoint saves beside the training state: the one just evaluated or exported,
        else a new one; None before averaging, and under the sharded placement (its checkpoint holds the shards,
        and a full module would be a gather at every checkpoint)."""
        if evaluated is not None or self.sharded:
            return evaluated
        with self.average_in_model() as module:
            return module

    def export(self, candidate: Optional[str]) -> Optional[nn.Module]:
        """The sharded average gathered once into an fp32 module on the main process (None elsewhere), for saving."""
        with self.average_in_model(full_bn_pass=True, candidate=candidate):
            state = gather_full_state(self.averager, self.model, self.accelerator.process_index)
        if state is None:
            return None
        module = self.build_model()
        module.load_state_dict(state)
        return module.float()

    # ----- at the end ----------------------------------------------------------------------

    def score_candidates(self, evaluate: Callable[[nn.Module], dict], split: Optional[str],
                         metric: str) -> tuple[Optional[Choice], Optional[nn.Module]]:
        """Scores every candidate average (full BN pass each) with `evaluate(module) -> {split: metrics}`: the
        choice on `split` and the chosen average's module (sharded: on the main process only).

        One candidate module exists at a time besides the best so far. (None, None) before averaging.
        """
        if self.averager.n_averaged == 0:
            return None, None
        starts = dict(self.plan.candidates)
        decays = {self.averager.ema_name(decay): decay for decay in self.averager.emas}
        best_module, scored, choice = None, [], None
        for name in self.averager.candidate_names():
            updates = self.averager.candidate_updates(name)
            if updates == 0:
                continue
            with self.average_in_model(full_bn_pass=True, candidate=name) as module:
                metrics = evaluate(module)
            start = starts.get(name, self.plan.swa_start_step)
            scored.append(Candidate(name=name, kind="swa" if name in starts else "ema", start_step=start,
                                    start_epoch=start / self.plan.steps_per_epoch, decay=decays.get(name),
                                    n_averaged=updates, metrics=metrics))
            choice = choose(scored, split, metric)  # (so far: keep this module only if it leads)
            if choice.chosen == name:
                best_module = self.module_to_keep(module)
            del module
        if self.sharded:  # the BN pass is seeded by the step, so this export is the module just scored
            best_module = self.export(choice.chosen)
        return choice, best_module
