"""Builds the Accelerator, picking CPU mode when there is no accelerator and refusing broken launches."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    is_mps_available,
    is_npu_available,
    is_torch_xla_available,
    is_xpu_available,
)

from .config import ConfigError, RunArguments
from ..launcher_request import process_count_warning


def has_accelerator_device() -> bool:
    """Whether any device accelerate can train on (GPU, XPU, NPU, MPS, TPU) is present."""
    return (
        torch.cuda.is_available() or is_xpu_available() or is_npu_available() or is_mps_available()
        or is_torch_xla_available()
    )


def launched_world_size() -> int:
    """How many processes the launcher (accelerate launch, torchrun) says it started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cache_accelerate_package_probes() -> None:
    """Answers accelerate's "is lomo_optim installed?" once per process instead of at every optimizer step.

    accelerate 1.15 asks importlib twice in each `AcceleratedOptimizer.step` (about 0.15 ms on a
    2-core CPU, 5% of a small model's step); installed packages do not change during a run.
    """
    import accelerate.accelerator
    import accelerate.optimizer
    from accelerate.utils import imports

    cached = functools.cache(imports.is_lomo_available)
    accelerate.optimizer.is_lomo_available = cached
    accelerate.accelerator.is_lomo_available = cached


#: What an accelerate config can ask for through `accelerate launch`, and the distributed type it should give.
ASKED_BY_LAUNCHER = (("FSDP", "ACCELERATE_USE_FSDP", DistributedType.FSDP),
                     ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED))


def refuse_silent_downgrade(distributed_type: DistributedType, environ=os.environ) -> None:
    """Stops a run whose accelerate config asked for FSDP or DeepSpeed but which accelerate set up otherwise.

    Without GPUs accelerate 1.15 ignores both and trains as DDP without a word; a user who asked for sharding
    must not get a different run.
    """
    for name, variable, expected in ASKED_BY_LAUNCHER:
        if environ.get(variable, "false").lower() in ("1", "true", "yes") and distributed_type != expected:
            raise ConfigError(
                f"launch: the accelerate config asks for {name} (distributed_type: {expected.value}), but accelerate "
                f"set up {distributed_type.value} here (it needs GPUs); use a config without {name} on this machine")


def join_restarted_group(environ: Mapping[str, str] = os.environ) -> None:
    """On a restarted attempt of `accelerate launch --max_restarts N` (torchrun's elastic agent), forms the process
    group under a key prefix of its own in the rendezvous store, before accelerate would form it.

    The agent keeps one store across attempts, and a restarted attempt's workers read the addresses that the dead
    attempt's ranks published there: gloo's connectFullMesh then fails with "Connection refused" (torch 2.13 here;
    pytorch/pytorch#167288 reports the same with NCCL). Nothing changes on a first attempt or outside torchrun.
    """
    attempt = int(environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or launched_world_size() <= 1 or environ.get("PJRT_DEVICE") or dist.is_initialized():
        return
    rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
    # The agent hosts the store under the static rendezvous; otherwise rank 0 does.
    agent_hosts = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_hosts, timeout=timedelta(minutes=10))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world,
                            store=dist.PrefixStore(f"/swa_accel/attempt_{attempt}", store))


#: Warnings that say nothing a user can act on: DDP on gradients of channels-last-free convolutions on the CPU.
HARMLESS_WARNINGS = (r"Grad strides do not match bucket view strides",)


def quiet_libraries(verbose: bool, environ: Mapping[str, str] = os.environ) -> None:
    """Quiets what the libraries print that tells the user nothing: one-off preprocessing and shard-writing progress
    bars, load reports, known-harmless warnings. `verbose`, or the libraries' own variables when set, keep them."""
    if verbose:
        return
    import datasets
    import transformers

    if "TRANSFORMERS_VERBOSITY" not in environ:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    if "DATASETS_VERBOSITY" not in environ:
        datasets.utils.logging.set_verbosity_error()
    if "HF_DATASETS_DISABLE_PROGRESS_BARS" not in environ:
        datasets.disable_progress_bars()
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def make_accelerator(training: RunArguments) -> Accelerator:
    """An Accelerator for the run: gradient accumulation, seedable shuffling, trackers, CPU fallback.

    Without `cpu=True`, processes started by a multi-process launch on a machine with no
    accelerator each run alone as rank 0 on all the data; with it they form one gloo group.

    Raises:
        ConfigError: the launcher started N > 1 processes but accelerate sees a different number.
    """
    cache_accelerate_package_probes()
    quiet_libraries(training.verbose)
    join_restarted_group()
    report_to = None if training.report_to == "none" else training.report_to.split(",")
    if report_to == ["all"]:
        report_to = "all"
    accelerator = Accelerator(
        cpu=not has_accelerator_device(),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=training.gradient_accumulation_steps, sync_with_dataloader=True
        ),
        # A seeded sampler reshuffles per epoch from (seed, epoch): resumable and equal across process counts.
        # Non-blocking copies of batches from pinned memory: the host never waits for a transfer.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=training.seed,
                                                  non_blocking=True),
        project_config=ProjectConfiguration(
            project_dir=training.output_dir, logging_dir=str(Path(training.output_dir) / "logs")
        ),
        log_with=report_to,
    )
    refuse_silent_downgrade(accelerator.distributed_type)
    expected = launched_world_size()
    if expected != accelerator.num_processes:
        raise ConfigError(
            f"launch: the launcher started {expected} processes but accelerate sees {accelerator.num_processes}; "
            "they would each train alone on all the data (on a machine without GPUs, build Accelerator(cpu=True) "
            "or set ACCELERATE_USE_CPU=1)"
        )
    warning = process_count_warning(accelerator.num_processes)
    if warning and accelerator.is_main_process:
        print(warning, flush=True)
    return accelerator


def end_process(code: int = 0, done: bool = False) -> None:
    """Ends this process: `sys.exit(code)` for a failure; for success a plain return, except in a multi-process
    CPU (gloo) run, which flushes its output and leaves at once, past the interpreter's teardown.

    With torch 2.13, tearing down a gloo process group at exit can deadlock (the main thread, holding the GIL,
    joins a gloo worker thread that needs the GIL to free the last collective's tensors; seen with py-spy) or
    abort ("terminate called without an active exception"), after all the work is done. Call it only once every
    rank is past its last collective and has printed what it prints. A failure keeps the normal exit: the rank
    that prints the error line may be slower than the others, and the launcher stops the rest once one fails.
    """
    import logging
    import sys

    if code and not done:  # (`done`: every rank finished its work, as after a stop signal's checkpoint)
        sys.exit(code)
    if launched_world_size() > 1 and not has_accelerator_device():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    if code:
        sys.exit(code)
