"""A sharded average in accelerate's checkpoints: one file per rank.

accelerate's `register_for_checkpointing` cannot hold it: in accelerate 1.15 `save_custom_state` writes
`custom_checkpoint_<object index>.pkl` from the main process only and every rank loads that same file, so rank 1
would get rank 0's shards (a shape error when shards are uneven, silently wrong weights when they are even).
`register_shard_checkpointing` adds save and load hooks that call `save_shards` / `load_shards` on every rank.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .averaging import WeightAverager

SHARD_FILE = "swa_average_rank{rank:05d}_of_{world:05d}.pt"
SHARD_FILE_PATTERN = re.compile(r"^swa_average_rank(\d+)_of_(\d+)\.pt$")


def shard_file(folder: str | Path, process_index: int, num_processes: int) -> Path:
    return Path(folder) / SHARD_FILE.format(rank=process_index, world=num_processes)


def save_shards(averager: WeightAverager, folder: str | Path, process_index: int, num_processes: int,
                owner=None) -> Path:
    """Writes this rank's averager state (its shards, `n_averaged`, ...) to its own file in `folder`; with an
    `owner` (the SWA object holding the averager), the owner's whole `state_dict`."""
    if averager.placement.active_swap is not None:
        raise RuntimeError("save_shards: the average is swapped into the model; save after swapped_in exits")
    shapes = {name: list(t.shape) for name, t in (averager.averaged or {}).items()}
    path = shard_file(folder, process_index, num_processes)
    state = {"averager": averager.state_dict()} if owner is None else {"owner": owner.state_dict()}
    torch.save({"process_index": process_index, "num_processes": num_processes, "shapes": shapes, **state}, path)
    return path


def load_shards(averager: WeightAverager, folder: str | Path, process_index: int, num_processes: int,
                owner=None) -> None:
    """Restores this rank's averager state from `save_shards`, on the same number of ranks.

    Raises:
        ValueError: the checkpoint was written by a different number of ranks, or holds other shapes.
    """
    path = shard_file(folder, process_index, num_processes)
    if not path.is_file():
        worlds = sorted({int(m.group(2)) for p in Path(folder).iterdir() if (m := SHARD_FILE_PATTERN.match(p.name))})
        found = f"shards of {worlds[0]} processes" if len(worlds) == 1 else "no sharded average"
        raise ValueError(f"resume: {folder} holds {found}, this run has {num_processes}; a sharded average resumes "
                         "only on the number of processes that saved it")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    shapes = {name: list(t.shape) for name, t in (averager.averaged or {}).items()}
    if saved["shapes"] != shapes:
        differ = sorted(n for n in set(shapes) | set(saved["shapes"]) if shapes.get(n) != saved["shapes"].get(n))
        raise ValueError(f"resume: the saved average's shards differ from this model's on rank {process_index} "
                         f"(e.g. {differ[:3]})")
    if owner is None:
        averager.load_state_dict(saved["averager"])
    else:
        owner.load_state_dict(saved["owner"])


def register_shard_checkpointing(accelerator, averager: WeightAverager, owner=None) -> tuple:
    """Makes `accelerator.save_state` / `load_state` also save / restore each rank's shards.

    Use it instead of `accelerator.register_for_checkpointing(averager)`, which saves rank 0's state
    only and loads it on every rank (see the module docstring).

    Returns:
        The two hook handles (save, load); `.remove()` them to detach this averager.
    """
    rank, world = accelerator.process_index, accelerator.num_processes

    def refuse_double_registration() -> None:
        if any(obj is averager or (owner is not None and obj is owner)
               for obj in getattr(accelerator, "_custom_objects", [])):
            raise RuntimeError("the sharded averager is also registered with register_for_checkpointing, which "
                               "would load rank 0's shards on every rank; register it only here")

    def save_hook(models, weights, output_dir) -> None:
        refuse_double_registration()
        save_shards(averager, output_dir, rank, world, owner)

    def load_hook(models, input_dir) -> None:
        refuse_double_registration()
        load_shards(averager, input_dir, rank, world, owner)

    refuse_double_registration()
    return accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)
