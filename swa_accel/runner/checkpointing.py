"""Checkpoints: `accelerator.save_state` into a temporary folder, renamed into place, then pruning.

Saving into `step_XXXXXXXX.tmp` and renaming only once the save is complete means a crash mid-save
never leaves a half-written folder that `--resume_from_checkpoint latest` would pick, and old
checkpoints are deleted only after the new one exists (accelerate's own `total_limit` deletes first).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from .config import ConfigError, first_line
from .xla import is_xla

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


class TrainState:
    """Loop position saved with every checkpoint (registered with `register_for_checkpointing`)."""

    def __init__(self) -> None:
        self.global_step = 0  # optimizer steps taken
        self.epoch = 0  # epochs completed
        self.batches_in_epoch = 0  # micro-batches of the current epoch already consumed

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])


def checkpoint_name(global_step: int) -> str:
    return f"step_{global_step:08d}"


def list_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoint_root.is_dir():
        return []
    found = [p for p in checkpoint_root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def resolve_resume_path(resume_from_checkpoint: Optional[str], checkpoint_root: Path) -> Optional[Path]:
    """Turns `latest`, `auto` or a path into a checkpoint folder; None when not resuming (`auto` without a
    checkpoint: a fresh start, so one job script serves the first start and every requeue).

    Raises:
        ConfigError: the named checkpoint does not exist, or `latest` finds none.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "auto":
        found = list_checkpoints(checkpoint_root)
        return found[-1] if found else None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(checkpoint_root)
        if not found:
            raise ConfigError(f"resume_from_checkpoint: no checkpoint found in {checkpoint_root}")
        return found[-1]
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise ConfigError(f"resume_from_checkpoint: '{path}' is not a checkpoint folder")
    return path


def save_checkpoint(accelerator, checkpoint_root: Path, global_step: int, keep: int,
                    extra_writer: Optional[Callable[[Path], None]] = None) -> Path:
    """Saves the full training state for `global_step`, keeping the newest `keep` checkpoints.

    Args:
        extra_writer: called on the main process with the temporary folder, before it is renamed
            into place (used to add the BN-recomputed averaged model).
    """
    final = checkpoint_root / checkpoint_name(global_step)
    tmp = checkpoint_root / f"{checkpoint_name(global_step)}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # Under XLA the training state goes in torch's format: safetensors' loader reads the memory address of each
    # tensor of the model it loads into, which an XLA tensor does not have.
    accelerator.save_state(str(tmp), safe_serialization=not is_xla(accelerator))
    # Every rank writes its own RNG file into `tmp`; rename only once all of them are done.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra_writer is not None:
            extra_writer(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(checkpoint_root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def check_output_dir(path: Path) -> None:
    """Refuses, before anything is built, an output_dir that cannot be a folder; creates it."""
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


def clear_previous_run(accelerator, output_dir: Path, resuming: bool, overwrite: bool, auto: bool = False) -> None:
    """A fresh start in a folder that holds a run: refused, or (with `overwrite`) its checkpoints and final
    models deleted. Starting afresh would otherwise prune or overwrite another run's averaged weights.

    `auto` found no checkpoint: what a run killed before its first checkpoint left (an incomplete save) is cleared;
    a finished run's final models are not.
    """
    previous = [p for p in (output_dir / "checkpoints", output_dir / "final", output_dir / "snapshots") if p.exists()]
    if resuming or not previous:
        return
    if auto and not overwrite:
        if (output_dir / "final").exists():
            raise ConfigError(f"resume_from_checkpoint: auto found no checkpoint in '{output_dir}', but final/ holds a "
                              "finished run's models; choose another output_dir, or pass --overwrite_output_dir true")
        overwrite = True
    if not overwrite:
        raise ConfigError(f"output_dir: '{output_dir}' already holds a run; resume it with --resume_from_checkpoint "
                          "latest, choose another output_dir, or pass --overwrite_output_dir true")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for path in previous:
            shutil.rmtree(path)


def restore(accelerator, path: Path) -> None:
    """`accelerator.load_state`, with one line naming the checkpoint when it does not fit this run."""
    try:
        accelerator.load_state(str(path))
    except ConfigError:
        raise  # (a state that names its own option, such as the snapshot store's settings)
    except Exception as error:  # noqa: BLE001 - torch, safetensors and pickle each raise their own types
        raise ConfigError(f"resume_from_checkpoint: cannot restore '{path}' into this run ({first_line(error)}); "
                          "it holds another model or optimizer, or a damaged file") from error
