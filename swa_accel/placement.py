"""Where the average lives, and the one interface both placements answer: `MainProcessPlacement` keeps it on the
main process (one device, DDP, ZeRO-1/2); `sharded.ShardedPlacement` keeps each rank's FSDP2 shards.
`choose_placement` picks one for a launch."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from .averaging import WeightAverager, clean_name, named_tensors
from .batchnorm import recompute_bn


@runtime_checkable
class Placement(Protocol):
    """What the averager and the SWA controller ask of a placement; `MainProcessPlacement` and
    `sharded.ShardedPlacement` are the two that answer it."""

    name: str
    #: Whether `holding_average` yields a module of its own (which may outlive the block), not the training model.
    separate_module: bool
    #: Where this rank's averaged tensors live.
    device: torch.device
    #: The sharded placement's live swap of the average into the training model (None when none, or never).
    active_swap: Optional[Any]

    def holds_copy(self, process_index: int) -> bool: ...

    def local_tensors(self, model: nn.Module, buffers: bool) -> dict[str, torch.Tensor]: ...

    def holding_average(self, averager: WeightAverager, model: nn.Module, base_model: nn.Module,
                        build_model: Callable[[], nn.Module], num_processes: int, candidate: Optional[str] = None,
                        in_model: bool = False) -> ContextManager[nn.Module]: ...

    def recompute_bn(self, module: nn.Module, loader_factory, device: torch.device, num_processes: int,
                     autocast) -> int: ...

    def full_state(self, averager: WeightAverager, module: nn.Module,
                   process_index: int) -> Optional[dict[str, torch.Tensor]]: ...

    def register_checkpointing(self, accelerator, owner) -> None:
        """Makes accelerate's `save_state`/`load_state` hold `owner.state_dict()` (the SWA object's, which
        includes its averager's) the way this placement needs."""


class MainProcessPlacement:
    """Only the main process keeps the averaged copy; other ranks hold none.

    Under DDP every rank has identical weights, so the main process can average its own replica
    with no communication. Ranks receive the averaged weights only transiently, by broadcast, when
    an evaluation or the BN recompute needs them: in a separate fp32 module, or swapped into the
    training model (what `transformers.Trainer`'s evaluation needs). `sharded.ShardedPlacement` is the
    other placement; both answer the same calls (`holding_average`, `recompute_bn`, `full_state`,
    `register_checkpointing`), so the SWA controller never asks which it has.
    """

    name = "main"
    #: `holding_average` yields a module of its own, which may outlive the block (by default).
    separate_module = True
    #: (The average is never swapped into the model behind the loop's back here.)
    active_swap = None

    def __init__(self, device: torch.device, offload_to_cpu: bool = False, trainable_only: bool = False) -> None:
        self.device = torch.device("cpu") if offload_to_cpu else device
        self.trainable_only = trainable_only

    def holds_copy(self, process_index: int) -> bool:
        return process_index == 0

    def local_tensors(self, model: nn.Module, buffers: bool) -> dict[str, torch.Tensor]:
        """The tensors this rank averages, by wrapper-free name: here the whole replica (with `trainable_only`, the
        parameters that require grad)."""
        return named_tensors(model, buffers, self.trainable_only)

    def fill_module(self, averaged: Optional[dict[str, torch.Tensor]], module: nn.Module, num_processes: int) -> None:
        """Writes the averaged tensors into `module` on every rank (main's copy, broadcast to the others)."""
        targets = named_tensors(module, buffers=True)
        names = sorted(averaged) if averaged is not None else None
        if num_processes > 1:
            names = _broadcast_object(names)
        with torch.no_grad():
            for name in names:
                target = targets[name]
                if averaged is not None:
                    target.copy_(averaged[name])
                if num_processes > 1:
                    torch.distributed.broadcast(target.data, src=0)

    def materialize(self, averager: WeightAverager, build_model: Callable[[], nn.Module], base_model: nn.Module,
                    num_processes: int, candidate: Optional[str] = None) -> nn.Module:
        """An fp32 module holding the average (or a candidate), on every rank (collective when distributed).

        Buffers that are not averaged (BN statistics for SWA, everything for EMA with "copy") come
        from the base model; BN statistics must then be recomputed (see `batchnorm.py`).
        """
        module = build_model()
        module.load_state_dict({clean_name(k): v for k, v in base_model.state_dict().items()})
        module.to(device=self._compute_device(base_model), dtype=torch.float32)
        self.fill_module(averager.tensors_of(candidate), module, num_processes)
        return module

    @staticmethod
    def _compute_device(model: nn.Module) -> torch.device:
        return next(model.parameters()).device

    @contextlib.contextmanager
    def holding_average(self, averager: WeightAverager, model: nn.Module, base_model: nn.Module,
                        build_model: Callable[[], nn.Module], num_processes: int, candidate: Optional[str] = None,
                        in_model: bool = False) -> Iterator[nn.Module]:
        """Yields a module holding the average on every rank: a new fp32 module, or with `in_model` the training
        model itself (`base_model`, unwrapped), whose weights and buffers come back bit for bit on exit."""
        if not in_model:
            yield self.materialize(averager, build_model, base_model, num_processes, candidate)
            return
        saved = [(t, t.detach().clone()) for t in (*base_model.parameters(), *base_model.buffers())]
        try:
            self.fill_module(averager.tensors_of(candidate), base_model, num_processes)
            yield base_model
        finally:
            with torch.no_grad():
                for live, value in saved:
                    live.copy_(value)

    def recompute_bn(self, module: nn.Module, loader_factory, device: torch.device, num_processes: int,
                     autocast) -> int:
        return recompute_bn(module, loader_factory, device, num_processes, autocast)

    def full_state(self, averager: WeightAverager, module: nn.Module,
                   process_index: int) -> Optional[dict[str, torch.Tensor]]:
        """`holding_average`'s module as a state dict on the main process (None elsewhere)."""
        if process_index != 0:
            return None
        return {clean_name(k): v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def register_checkpointing(self, accelerator, owner) -> None:
        """accelerate's checkpoints save the main process's state (its copy) and give it back to every rank on load."""
        accelerator.register_for_checkpointing(owner)


def choose_placement(requested: str, distributed_type: str, zero_stage: Optional[int] = None,
                     fsdp_version: Optional[int] = None) -> str:
    """The placement a launch gets: `sharded` under FSDP2, `main` elsewhere (or what was asked, where it works).

    Under FSDP or DeepSpeed ZeRO-3 a rank's parameters are its shard, so `main` would average a shard: no
    half-working path, a one-line error instead. FSDP2's parameters are DTensors whose local shards `sharded`
    averages; FSDP1's flat parameters and ZeRO-3's partitions are refused.

    Args:
        requested: `swa_placement`: auto, main or sharded.
    """
    supported = "the supported placements are 'main' (one device, DDP, ZeRO-1/2) and 'sharded' (FSDP2)"
    if distributed_type == "DEEPSPEED" and zero_stage == 3:
        raise ValueError(f"swa_placement: DeepSpeed ZeRO-3 partitions the weights across ranks, which no placement "
                         f"averages; {supported}: use ZeRO-2, FSDP2, or --swa_method none")
    if distributed_type == "FSDP":
        if fsdp_version != 2:
            raise ValueError(f"swa_placement: FSDP version {fsdp_version} shards flat parameters, which no placement "
                             f"averages; {supported}: set fsdp_version: 2 (accelerate_configs/fsdp2.yaml)")
        if requested == "main":
            raise ValueError("swa_placement: FSDP2 shards the weights across ranks, so 'main' would average rank "
                             "0's shard; use 'sharded' (what 'auto' picks under FSDP2)")
        return "sharded"
    return "main" if requested == "auto" else requested


def _broadcast_object(obj):
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]
