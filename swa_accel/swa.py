"""SWA in any accelerate loop, as one object: when to average, the SWA phase's learning rate, where the average
lives, its candidates, the averaged model with BN recomputed across ranks, checkpointing and the export.

In your own loop (see recipes/own_loop.py), after `accelerator.prepare`:

    swa = SWA(accelerator, model, optimizer, train_loader, SWAArguments(swa_start_epoch=6, swa_lr=0.05),
              num_epochs=10)
    for epoch in range(10):
        for x, y in train_loader:
            ...  # forward, backward, optimizer.step(), your scheduler's step()
            swa.step()  # averages when due, and runs the LR from the SWA start (torch's SWALR)
    with swa.average_in_model(full_bn_pass=True) as swa_model:  # on every rank; BN statistics recomputed
        evaluate(swa_model)  # (swa_model is None until the first averaging update: check swa.has_average)

accelerate's `save_state`/`load_state` then hold the average too (`state_dict` holds all of it). The recipes'
Trainer and the `transformers.Trainer` callback (`hf_trainer.py`) drive the same object. Built, it checks the
loop it is handed (`loop_checks.py`) and prints its plan on the main process (`verbose=False` keeps it quiet).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Callable, ContextManager, Optional

from torch import nn

from .averaging import WeightAverager
from .placement import MainProcessPlacement, choose_placement
from .batchnorm import bn_loader_from
from .candidates import Candidate, Choice, choose
from .arguments import SWAArguments
from .errors import ConfigError
from .loop_checks import (batches_per_epoch, launch_warning, refuse_lone_processes, refuse_unprepared,
                          resume_order_warning)
from .plan_report import plan_line, plan_warnings
from .timeline import TrainingPlan, plan_run
from .sharded import ShardedPlacement
from .soup import greedy_soup
from .store_families import (attach_store, dropped_candidates, family_names, lawa_start_step,
                             posthoc_ema_warnings)
from .swa_lr import SWALRPhase

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
        optimizer: the prepared optimizer; from the SWA start on, its rates follow `swa_lr` as with torch's
            `SWALR` (one rate, or one per param group), annealed from the last rate used. `swa_lr` None leaves
            the rates to your scheduler.
        train_loader: the prepared training loader: its length fixes the steps per epoch, and the BN
            recompute reads its dataset (each rank its share, no duplicates) unless `bn_loader` is given.
        args: the SWA settings.
        num_epochs, max_steps: the training budget (one of them), to place the SWA start and candidates in.
        plan: the timeline, when the loop has made it already (`schedule.make_plan`); replaces the budget.
        build_model: a fresh module of the model's architecture, for the averaged module and the export
            (default: a copy of the unwrapped model; needed under FSDP2).
        bn_loader: see `BNLoader`.
        seed: seeds the BN passes' random order.
        phase: see `Phase`.
        register: register with accelerate's checkpointing (off where the loop saves the state itself).
        verbose: print the plan line and the plan's warnings on the main process (the recipes print their own).
        store_dir: where the snapshot store writes (`snapshot_every`); the recipes use output_dir/snapshots.
            With `swa_method` none the object keeps only the store (`store_only`): it folds from step 1 at the
            averaging cadence and leaves the learning rate alone; the average it holds is the store's widest
            window, and the candidates are built from the store after training.
        avg_fn, multi_avg_fn: a custom average, in the forms of torch's `AveragedModel`.
        checkpoints_kept: how many checkpoints the run keeps (default: the accelerator's
            `ProjectConfiguration.total_limit`; None: all). The store keeps every weight file a kept checkpoint
            names, so a resume from any of them finds its LAWA and BEMA weights.

    Raises:
        ConfigError: the loader or optimizer is not what `accelerator.prepare` returned, the launcher started
            more processes than the Accelerator sees, the launch shards the weights in a way no placement
            averages (FSDP1, ZeRO-3), the budget is missing (or in epochs over a loader without a length), or
            `swa_lr` does not fit the optimizer's param groups.
    """

    def __init__(self, accelerator, model: nn.Module, optimizer, train_loader, args: SWAArguments, *,
                 num_epochs: Optional[int] = None, max_steps: Optional[int] = None,
                 plan: Optional[TrainingPlan] = None, build_model: Optional[Callable[[], nn.Module]] = None,
                 bn_loader: Optional[BNLoader] = None, seed: int = 0, phase: Phase = _no_phase,
                 register: bool = True, verbose: bool = True, store_dir=None, avg_fn: Optional[Callable] = None,
                 multi_avg_fn: Optional[Callable] = None, checkpoints_kept: Optional[int] | str = "accelerator"
                 ) -> None:
        # A store-only run (swa_method none with snapshot_every) records the store as an SWA run from step 0 would,
        # with no SWA learning rate; its loop evaluates and exports the trained model (see `store_only`).
        self.store_only = args.store_only
        if self.store_only:
            args = args.store_only_view()
            if plan is not None:  # (the loop's plan has no SWA start: the store's is step 0)
                plan = plan_run(plan.steps_per_epoch, args, max_steps=plan.total_steps)
        if not args.enabled:
            raise ConfigError("swa_method: 'none' averages nothing; build no SWA object for such a run (or set "
                              "snapshot_every to keep only the snapshot store)")
        refuse_lone_processes(accelerator)
        refuse_unprepared(train_loader, optimizer)
        self.accelerator, self.model, self.args = accelerator, model, args
        self.train_loader, self.seed, self.phase = train_loader, seed, phase
        self.plan = plan or plan_run(batches_per_epoch(train_loader, num_epochs, max_steps, args), args, num_epochs,
                                     max_steps, accelerator.gradient_accumulation_steps)
        deepspeed = getattr(accelerator.state, "deepspeed_plugin", None)
        fsdp = getattr(accelerator.state, "fsdp_plugin", None)
        try:
            placement_name = choose_placement(args.swa_placement, accelerator.distributed_type.value,
                                              getattr(deepspeed, "zero_stage", None),
                                              getattr(fsdp, "fsdp_version", None))
        except ValueError as error:
            raise ConfigError(str(error)) from None
        placement_type = ShardedPlacement if placement_name == "sharded" else MainProcessPlacement
        if build_model is None and placement_type is ShardedPlacement:
            raise ConfigError("build_model: a sharded average is exported into a fresh module; pass build_model")
        self.placement = placement_type(accelerator.device, offload_to_cpu=args.swa_offload_to_cpu,
                                        trainable_only=args.average_trainable_only)
        self.build_model = build_model or self._copy_of_model
        self.bn_loader = bn_loader or self._bn_loader_from_train_loader
        self.averager = WeightAverager(model, args.swa_method, self.placement, accelerator.process_index,
                                       args.ema_decay, args.ema_warmup, args.ema_buffers, args.ema_decay_values(),
                                       args.ema_warmup_power, args.ema_warmup_gamma, args.ema_min_decay,
                                       avg_fn=avg_fn, multi_avg_fn=multi_avg_fn)
        self.averager.build_phase = lambda: self.phase("candidate_builds")
        self.store_dir = store_dir
        if checkpoints_kept == "accelerator":
            checkpoints_kept = getattr(getattr(accelerator, "project_configuration", None), "total_limit", None)
        self.store_plan = attach_store(self.averager, model, self.plan, args, store_dir, accelerator.process_index,
                                       checkpoints_kept)
        self.dropped = set(dropped_candidates(self.plan, self.store_plan, args))
        self.steps_done = 0  # real optimizer steps so far: the one count, which the LR phase reads
        self.reset_step: Optional[int] = None  # the step of the last `reset_average`
        self.lr_phase = None
        if args.swa_lr is not None:
            self.lr_phase = SWALRPhase(optimizer, args.swa_lr_values(), self.plan.swa_start_step,
                                       self.plan.anneal_steps, args.swa_anneal_strategy,
                                       steps_done=lambda: self.steps_done)
        if register:
            self.placement.register_checkpointing(accelerator, self)
        if verbose:
            self._say_plan()

    def _say_plan(self) -> None:
        plan = ["swa: none (the snapshot store only)"] if self.store_only else [
            f"swa {plan_line(self.plan, self.args)}", *plan_warnings(self.plan, self.args)]
        lines = [launch_warning(self.accelerator), *plan, resume_order_warning(self.accelerator, self.train_loader),
                 *self.store_lines()]
        if self.accelerator.is_main_process:
            for line in filter(None, lines):
                print(line, flush=True)

    def candidate_count(self) -> int:
        """How many candidates the end scores: the SWA starts the store kept, side EMAs, the store's families and
        the soup."""
        return (len(self.plan.candidates) - len(self.dropped) + len(self.args.ema_decay_values())
                + len(family_names(self.args)) + int(self.args.soup))

    def store_lines(self) -> list[str]:
        """The store's plan, and what a disk budget dropped, for the run's console."""
        if self.store_plan is None:
            return []
        cuts = self.store_plan.cut_steps
        where = f"{len(cuts)} points (steps {cuts[0]} to {cuts[-1]})" if len(cuts) > 1 else f"1 point (step {cuts[0]})"
        lines = [f"snapshot store: {where}, folds after step "
                 f"{self.store_plan.first_fold_after}; families: {', '.join(family_names(self.args)) or 'windows'}"]
        if self.store_plan.dropped_steps:
            lines.append(f"snapshot_disk_budget_mb: {self.args.snapshot_disk_budget_mb:g} MB keeps {len(cuts)} of "
                         f"{len(cuts) + len(self.store_plan.dropped_steps)} points; dropped candidates: "
                         f"{', '.join(sorted(self.dropped)) or 'none (no start fell on a dropped point)'}")
        return lines + posthoc_ema_warnings(self.store_plan, self.plan.steps_per_epoch, self.args)

    def _copy_of_model(self) -> nn.Module:
        return copy.deepcopy(self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False))

    def _bn_loader_from_train_loader(self, full_bn_pass: bool) -> Callable[[], Any]:
        acc = self.accelerator
        cap = None if full_bn_pass else self.args.bn_recompute_max_samples
        return bn_loader_from(self.train_loader, acc.num_processes, acc.process_index, cap, self.seed,
                              self.steps_done, self.args.bn_recompute_batch_size)

    @property
    def n_averaged(self) -> int:
        return self.averager.n_averaged

    @property
    def has_average(self) -> bool:
        """Whether an averaging update has happened: before it `average_in_model` yields None and `export` returns
        None (there is nothing to evaluate but the training model)."""
        return self.averager.n_averaged > 0

    # ----- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything the average needs to go on: the optimizer-step count and this rank's averager state (the
        average, its update count, the candidates' starts and side EMAs; with the sharded placement, this rank's
        shards). The SWA phase's rate lives in the optimizer's param groups (`swa_lr.py`), so it travels with
        the optimizer's own state. Registered with accelerate by the placement: the main process's copy through
        `register_for_checkpointing`, shards through one file per rank."""
        return {"steps_done": self.steps_done, "reset_step": self.reset_step, "averager": self.averager.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = int(state["steps_done"])
        self.reset_step = state.get("reset_step")
        self.averager.load_state_dict(state["averager"])

    # ----- during training ------------------------------------------------------------------

    def step(self) -> None:
        """Call after every `optimizer.step()` (also inside gradient accumulation: only real optimizer steps
        count). Updates the average when due and sets the SWA phase's rate for the next step."""
        acc = self.accelerator
        if not acc.sync_gradients:
            return
        done = self.steps_done + 1
        self.after_step(done, epoch_end=done % self.plan.steps_per_epoch == 0,
                        stepped=not acc.optimizer_step_was_skipped)

    def after_step(self, global_step: int, epoch_end: bool, stepped: bool) -> None:
        """What `step` does, for a loop that counts steps and epochs itself: after optimizer step `global_step`
        (1-based). `stepped` False (an fp16 overflow skipped the step): the average does not move."""
        self.steps_done = global_step
        if global_step == self.plan.total_steps + 1 and self.accelerator.is_main_process:
            warnings.warn(f"SWA: optimizer step {global_step} is past the budget SWA was planned for "
                          f"({self.plan.total_steps} steps, from num_epochs or max_steps): its rate schedule, later "
                          "starts and snapshot store end there, so the store's averages miss every step after it; "
                          "give SWA the budget the loop trains for", stacklevel=3)
        if self.lr_phase is not None:
            self.lr_phase.apply(global_step)  # the next step's rate, set now so that logs show it
        # A candidate starting at step c averages the updates after step c: its copy is taken before them (or it is
        # the store's window from its point at c).
        for name, start in self.plan.candidates:
            if (start < global_step and name not in self.averager.starts and name not in self.dropped
                    and (self.reset_step is None or start >= self.reset_step)):  # (began before a reset: dropped)
                with self.phase("candidate_starts"):
                    self.averager.start_candidate(name, self._store_point_at(start))
        average = stepped and (self.plan.update_after_step(global_step)
                               or (epoch_end and self.plan.update_at_epoch_end(global_step)))
        fold = stepped and self.store_plan is not None and self.store_plan.fold_due(global_step, epoch_end)
        if average or fold:
            with self.phase("averaging_updates"):
                self.averager.update(self.model, average=average, store_step=global_step if fold else None)
        if self.store_plan is not None and self.store_plan.cut_due(global_step):
            with self.phase("store_points"):
                self.averager.cut_store(self.model, global_step)

    def start_candidates_from_store(self) -> None:
        """After a finished run (the runner's `choose_from_store`): this config's later starts that the run did
        not keep but that fall on the store's points become windows of it. The main process reads the store's index
        (store.json, which rank 0 writes) and every rank gets what it found, so that all name the same candidates
        without a shared filesystem."""
        from accelerate.utils import broadcast_object_list

        from .store_reader import StoreReader

        if self.store_plan is None:
            return
        found = [None]
        if self.accelerator.is_main_process:
            found[0] = self._windows_in_store(StoreReader(self.store_dir))
        if self.accelerator.num_processes > 1:
            broadcast_object_list(found, from_process=0)
        starts, windows = dict(self.averager.starts), dict(self.averager.store_starts)
        for name, (n_start, index) in found[0].items():
            if name not in starts:
                starts[name], windows[name] = (n_start, None), index
        # (in the plan's order: the SWA start, then the later starts)
        order = [name for name, _ in self.plan.candidates] + list(starts)
        self.averager.starts = {name: starts[name] for name in dict.fromkeys(order) if name in starts}
        self.averager.store_starts = windows

    def _windows_in_store(self, reader) -> dict[str, tuple[int, int]]:
        """The later starts that fall on the store's points: name -> (folds before it, counted from the SWA start;
        the point's index)."""
        at_start = reader.point_at_step(self.plan.swa_start_step)
        folds_before = at_start.folds if at_start is not None else 0
        found = {}
        for name, step in self.plan.candidates[1:]:
            point = reader.point_at_step(step)
            if point is not None:
                found[name] = (point.folds - folds_before, point.index)
        return found

    def _store_point_at(self, step: int) -> Optional[int]:
        """The index of the store's point at `step`, where the store holds the candidate's window (None: a copy)."""
        store = self.averager.store
        if store is None or not store.points or store.points[-1].step != step:
            return None
        return store.points[-1].index

    def finish_store(self) -> None:
        """At the end of a run that scores no candidates (a store-only run): every point on disk, stale weight files
        gone but those a kept checkpoint names."""
        if self.averager.store is not None:
            self.averager.store.drop_stale_weights()

    def reset_average(self) -> None:
        """Restarts the average from the model's current weights (timm's `ModelEmaV3.set`): it then holds one update,
        and from then on it is the candidate `swa_reset_at_epoch_E` (or `swa_reset_at_step_S`). Candidates that
        began before are dropped, those that start later begin as planned; the snapshot store and its families go
        on (they are the run's record, not differences from the average)."""
        self.reset_step = self.steps_done
        self.averager.reset_to(self.model, self.reset_name())

    def reset_name(self) -> Optional[str]:
        """The restarted average's candidate name (None: never reset)."""
        if self.reset_step is None:
            return None
        epochs, rest = divmod(self.reset_step, self.plan.steps_per_epoch)
        return f"swa_reset_at_epoch_{epochs}" if rest == 0 else f"swa_reset_at_step_{self.reset_step}"

    # ----- the averaged model ---------------------------------------------------------------

    def eval_input_dtype(self, training_input_dtype):
        """The input dtype for evaluating `average_in_model`'s module: the training model's where the average is
        swapped into it; a separate module is fp32."""
        return None if self.placement.separate_module else training_input_dtype

    @contextlib.contextmanager
    def average_in_model(self, full_bn_pass: bool = False, candidate: Optional[str] = None,
                         in_training_model: bool = False):
        """Yields a module holding the average (or a candidate), BN recomputed, on every rank; None before averaging.

        Main placement: a separate fp32 module (it outlives the block), or with `in_training_model` the
        training model itself (as Lightning and `transformers.Trainer` evaluate). Sharded placement: always the
        training model, with the averaged shards swapped in (no full gather). A training model gets its own
        weights and buffers back bit for bit when the block ends. Intermediate uses recompute BN over
        `bn_recompute_max_samples` random training samples; `full_bn_pass` (the export) reads them all.
        """
        if self.averager.n_averaged == 0:
            yield None
            return
        acc = self.accelerator
        with self.placement.holding_average(self.averager, self.model, acc.unwrap_model(self.model),
                                            self.build_model, acc.num_processes, candidate,
                                            in_model=in_training_model) as module:
            if self.args.swa_method == "swa":  # (an EMA averages the BN buffers, or copies them)
                with self.phase("bn_recompute"):
                    self.placement.recompute_bn(module, self.bn_loader(full_bn_pass), acc.device, acc.num_processes,
                                                acc.autocast)
            yield module

    def module_to_keep(self, module: Optional[nn.Module]) -> Optional[nn.Module]:
        """`average_in_model`'s module if it outlives its block (a separate module), else None."""
        return module if self.placement.separate_module else None

    def module_for_checkpoint(self, evaluated: Optional[nn.Module]) -> Optional[nn.Module]:
        """The averaged module a checkpoint saves beside the training state: the one just evaluated or exported,
        else a new one; None before averaging, and where the average lives in shards (the checkpoint holds
        them, and a full module would be a gather at every checkpoint)."""
        if evaluated is not None or not self.placement.separate_module:
            return evaluated
        with self.average_in_model() as module:
            return module

    def export(self, candidate: Optional[str] = None) -> Optional[nn.Module]:
        """The average (or a candidate) as an fp32 module with BN recomputed over the whole training set, on the
        main process (None elsewhere, and before averaging). Call it on every rank."""
        acc = self.accelerator
        with self.average_in_model(full_bn_pass=True, candidate=candidate) as module:
            if module is None:
                return None
            if self.placement.separate_module:
                return module if acc.is_main_process else None
            state = self.placement.full_state(self.averager, module, acc.process_index)
        if state is None:
            return None
        exported = self.build_model()
        exported.load_state_dict(state)
        return exported.float()

    # ----- at the end ----------------------------------------------------------------------

    def score_candidates(self, evaluate: Callable[[nn.Module], dict], split: Optional[str], metric: str,
                         higher: Optional[bool] = None,
                         in_training_model: bool = False) -> tuple[Optional[Choice], Optional[nn.Module]]:
        """Scores every candidate average (full BN pass each) with `evaluate(module) -> {split: metrics}`: the
        choice on `split` and the chosen average's module (in shards: on the main process only).

        One candidate module exists at a time besides the best so far. (None, None) before averaging.
        `higher`: whether a higher `metric` is better, for a metric outside `SELECTION_METRICS` (a Trainer's).
        `in_training_model`: each candidate is swapped into the training model for `evaluate` (as
        `transformers.Trainer` evaluates); no module is kept then: (choice, None).
        """
        if self.averager.n_averaged == 0:
            return None, None
        if self.averager.store is not None:
            # Every point on disk; stale weight files go, but not those a kept checkpoint names (a run stopped
            # before its final checkpoint resumes from one of them).
            self.averager.store.drop_stale_weights()
        best_module, scored, choice = None, [], None
        for name in self.averager.candidate_names():
            updates = self.averager.candidate_updates(name)
            if updates == 0:
                continue
            with self.average_in_model(full_bn_pass=True, candidate=name,
                                       in_training_model=in_training_model) as module:
                metrics = evaluate(module)
            scored.append(self._candidate_record(name, updates, metrics))
            choice = choose(scored, split, metric, higher)  # (so far: keep this module only if it leads)
            if choice.chosen == name and not in_training_model:
                best_module = self.module_to_keep(module)
            del module
        if self.args.soup and split is not None and len(scored) > 1:
            self._score_soup(scored, evaluate, split, metric, higher, in_training_model)
            choice = choose(scored, split, metric, higher)
            if choice.chosen == "soup" and not in_training_model and self.placement.separate_module:
                # (the trials' modules are gone: the chosen soup's is built again; elsewhere `export` builds it)
                with self.average_in_model(full_bn_pass=True, candidate="soup") as module:
                    best_module = self.module_to_keep(module)
        if in_training_model:
            return choice, None
        if not self.placement.separate_module:  # the BN pass is seeded by the step: the export is what was scored
            best_module = self.export(choice.chosen)
        return choice, best_module

    def _candidate_record(self, name: str, updates: int, metrics: dict) -> Candidate:
        starts = dict(self.plan.candidates)
        families = family_names(self.args)
        decays = {self.averager.ema_name(decay): decay for decay in self.averager.emas}
        start = starts.get(name, self.plan.swa_start_step)
        if name in families and self.store_plan is not None:
            start = self.store_plan.first_fold_after
        restarted = name == self.reset_name()
        if restarted:
            start = self.reset_step
        kind, settings = (("swa", {}) if name in starts or restarted else ("ema", {}) if name in decays
                          else families[name])
        if kind == "window":
            after = settings["after_epoch"] * self.plan.steps_per_epoch
            start = max(after, self.store_plan.first_fold_after)
        if kind == "lawa":  # (the weights at its k points: it starts at the first)
            start = lawa_start_step(self.averager.store, settings["k"]) or start
        return Candidate(name=name, kind=kind, start_step=start, start_epoch=start / self.plan.steps_per_epoch,
                         decay=decays.get(name), n_averaged=updates, metrics=metrics, settings=settings)

    def _score_soup(self, scored: list[Candidate], evaluate, split: str, metric: str, higher: Optional[bool],
                    in_training_model: bool) -> None:
        """Adds the greedy soup of the scored candidates to `scored`. The soup stays a candidate ("soup"), holding
        the chosen ingredients' mean."""
        trial: dict = {}
        self.averager.extra_candidates["soup"] = lambda: trial["tensors"]

        def score(tensors):
            trial["tensors"] = tensors
            with self.average_in_model(full_bn_pass=True, candidate="soup",
                                       in_training_model=in_training_model) as module:
                return evaluate(module)

        ingredients, metrics, tensors = greedy_soup(scored, split, metric, self.averager.tensors_of, score, higher)
        trial["tensors"] = tensors
        first = min((c for c in scored if c.name in ingredients), key=lambda c: c.start_step)
        scored.append(Candidate(name="soup", kind="soup", start_step=first.start_step,
                                start_epoch=first.start_epoch, decay=None,
                                n_averaged=sum(c.n_averaged for c in scored if c.name in ingredients),
                                metrics=metrics, settings={"ingredients": ingredients}))
