"""What the `SWA` object checks of the loop a user hands it, before training: each mistake users make gets one
line naming the fix (an error where the run would be wrong, a warning where it would only be wasteful).

accelerate is imported inside the functions: they run when `SWA` is built, after the user's Accelerator, so
`import swa_accel` stays at torch's cost.
"""

from __future__ import annotations

import os
from typing import Optional

from .errors import ConfigError
from .launcher_request import process_count_warning


def is_prepared_loader(loader) -> bool:
    """Whether `loader` came out of `accelerator.prepare` (a shard of the data per process, or XLA's wrapper)."""
    from accelerate.data_loader import DataLoaderAdapter

    return isinstance(loader, DataLoaderAdapter) or type(loader).__module__ == "accelerate.data_loader"


def refuse_unprepared(train_loader, optimizer) -> None:
    """Refuses a loader or optimizer that `accelerator.prepare` has not returned.

    Built before `prepare`, the plan would count the unsharded loader's batches (on 2 processes twice the steps
    per epoch there are, so averaging might never start), and the SWA phase's rate would go to an optimizer the
    loop does not step.
    """
    from accelerate.optimizer import AcceleratedOptimizer

    fix = ("build SWA after `model, optimizer, train_loader = accelerator.prepare(model, optimizer, "
           "train_loader)`, with the objects prepare returned")
    if not is_prepared_loader(train_loader):
        raise ConfigError(f"train_loader: a {type(train_loader).__name__} that accelerator.prepare has not "
                          f"returned, so its length is not the steps each process takes; {fix}")
    if not isinstance(optimizer, AcceleratedOptimizer):
        raise ConfigError(f"optimizer: a {type(optimizer).__name__} that accelerator.prepare has not returned; {fix}")


def batches_per_epoch(train_loader, num_epochs: Optional[int], max_steps: Optional[int], args) -> int:
    """The loader's length, for placing epochs in the plan; without one, `max_steps` (one "epoch" is then the whole
    budget).

    Raises:
        ConfigError: the loader has no length (an iterable dataset) and the budget, or a setting of `args`
            (`SWAArguments`), is counted in epochs: each would silently span the whole run (one average at the end,
            an anneal as long as the run, a single store point).
    """
    try:
        return len(train_loader)
    except TypeError:
        pass
    loader = type(train_loader).__name__
    if max_steps is None:
        raise ConfigError(f"num_epochs: the train loader ({loader}) has no length, so an epoch cannot be counted; "
                          "give the budget as max_steps=N (optimizer steps) and place the SWA start with "
                          "swa_start_step or swa_start_fraction")
    from .arguments import store_cadence

    cadence = store_cadence(args.snapshot_every) if args.snapshot_every is not None else None
    in_epochs = [
        ("swa_start_epoch", args.swa_start_epoch is not None, "place the start with swa_start_step or "
         "swa_start_fraction"),
        ("swa_update_every_steps", args.swa_method == "swa" and args.swa_update_every_steps is None,
         "its default averages at epoch ends; set swa_update_every_steps=N"),
        ("swa_anneal_steps", args.swa_lr is not None and args.swa_anneal_steps is None,
         "its default anneals over one epoch; set swa_anneal_steps=N (0: none)"),
        ("swa_start_candidates", args.start_candidates_spec()[0] in ("every_epoch", "epochs"),
         "give fractions of the budget (0.8,0.9)"),
        ("snapshot_every", cadence is not None and cadence[1] == "epochs", "use every_N_steps"),
        ("store_windows", args.store_windows is not None, "build windows after the run with StoreReader.window"),
    ]
    for name, counted_in_epochs, fix in in_epochs:
        if counted_in_epochs:
            raise ConfigError(f"{name}: the train loader ({loader}) has no length, so it has no epochs to count in; "
                              f"{fix}")
    return max_steps


def refuse_lone_processes(accelerator, environ=os.environ) -> None:
    """Refuses an Accelerator that sees fewer processes than the launcher started: each would train alone.

    A plain `Accelerator()` launched with a multi-process config on a machine without GPUs does this.
    """
    launched = int(environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"launch: the launcher started {launched} processes but this Accelerator sees "
            f"{accelerator.num_processes}; each would train and average alone on all the data (on a machine "
            "without GPUs build Accelerator(cpu=True), or set ACCELERATE_USE_CPU=1)")


def launch_warning(accelerator) -> Optional[str]:
    """A warning when `accelerate launch` asked for another process count than this run has (see
    `launcher_request`)."""
    return process_count_warning(accelerator.num_processes)


def resume_order_warning(accelerator, train_loader) -> Optional[str]:
    """A warning when the train loader shuffles with an order that a resume from `save_state` cannot replay.

    accelerate draws the shuffle from a generator that its checkpoints do not restore unless the Accelerator was
    built with `use_seedable_sampler=True`, which makes the order a function of (seed, epoch).
    """
    from accelerate.data_loader import RandomSampler, SeedableRandomSampler, get_sampler

    try:
        sampler = get_sampler(train_loader)
    except AttributeError:  # an iterable dataset, or XLA's wrapper: no sampler to look at
        return None
    if not isinstance(sampler, RandomSampler) or isinstance(sampler, SeedableRandomSampler):
        return None
    config = getattr(accelerator, "dataloader_config", None)
    if config is not None and getattr(config, "use_seedable_sampler", False):
        return None
    return ("warning: the train loader shuffles from a generator that accelerator.save_state does not save, so a "
            "run resumed with load_state sees another order than an uninterrupted one; for exact resumes build "
            "Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)) and call "
            "train_loader.set_epoch(epoch) before each epoch")
