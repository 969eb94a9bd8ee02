"""A sharded placement for FSDP2 (`fully_shard`): every rank averages only its own shard of the weights.

Under FSDP2 a parameter is a DTensor and each rank stores one dim-0 chunk of it (`torch.chunk`, so
shards may be uneven, even empty). `ShardedPlacement` hands the averager those local shards, so each
rank keeps fp32 copies of 1/N of the model and the update is the same few `_foreach` kernels with no
communication. Nothing here ever holds a full copy of the average on every rank:

- `swapped_in(averager, model)` puts the average into the sharded model's own storage for a BN
  recompute and an evaluation, and puts the training weights and BN buffers back, bit for bit.
- `recompute_bn_sharded` runs `recompute_bn` on the sharded model; FSDP all-gathers in every forward,
  so ranks with fewer BN batches run a few extra (discarded) forwards to stay in lockstep.
- `gather_full_state` gathers the fp32 average once, one tensor at a time, and keeps it on rank 0
  (for the same `from_pretrained` export as the main placement).
- `sharded_checkpoints.py` keeps one file of shards per rank in accelerate's checkpoints.
- `averaged_bytes` reports what a rank holds: 4 bytes per local shard element (plus averaged buffers).

A training loop uses it like this (see tests/workers/fsdp2_averaging.py):

    placement = ShardedPlacement(accelerator.device)
    averager = WeightAverager(model, "swa", placement, accelerator.process_index)
    register_shard_checkpointing(accelerator, averager)  # instead of register_for_checkpointing(averager)
    ...  # after each real optimizer step:
    averager.update(model)
    ...  # to evaluate or export, on every rank:
    with swapped_in(averager, model):
        recompute_bn_sharded(model, loader_factory, device, num_processes)
        evaluate(model)
        state = gather_full_state(averager, model, accelerator.process_index)  # rank 0: {name: cpu tensor}
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .averaging import WeightAverager, clean_name
from .batches import forward_logits, to_device
from .batchnorm import batchnorm_layers, recompute_bn
from .sharded_checkpoints import register_shard_checkpointing


# torch's FSDP and DTensor modules take about a second to import (and load tqdm); a model can hold a DTensor or an
# FSDPModule only once they are loaded, so they are looked up, never imported, here.
def _is_dtensor(tensor) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _is_fsdp_module(module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's storage of a (possibly DTensor) parameter or buffer; in-place writes reach the model."""
    with torch.no_grad():  # without grad, `to_local` aliases the DTensor's local storage (no autograd node)
        return tensor.to_local() if _is_dtensor(tensor) else tensor


def reshard_all(model: nn.Module) -> None:
    """Frees every FSDP unsharded parameter, so the module's parameters are the sharded DTensors again.

    FSDP2 keeps the root module's parameters unsharded after a forward (its `reshard_after_forward` is
    off by default), as plain full tensors; after a swap those would hold stale weights, and before
    reading shards they would hide the DTensors. No collective: resharding only drops memory.
    """
    for module in model.modules():
        if _is_fsdp_module(module):
            module.reshard()


class ShardedPlacement:
    """Every rank keeps fp32 copies of its own shards (FSDP2); tensors that are not DTensors, such as BN
    running statistics, are replicas, identical on every rank, and each rank averages its replica.

    Args:
        device: where the fp32 copies live (the training device).
        offload_to_cpu: keep them in host memory instead.
    """

    name = "sharded"
    #: `holding_average` yields the training model, which holds the average only inside the block.
    separate_module = False

    def __init__(self, device: torch.device, offload_to_cpu: bool = False, trainable_only: bool = False) -> None:
        self.device = torch.device("cpu") if offload_to_cpu else torch.device(device)
        self.trainable_only = trainable_only
        self.active_swap: Optional[_Swap] = None  # set while `swapped_in` holds the average in the model

    def holds_copy(self, process_index: int) -> bool:
        return True

    def local_tensors(self, model: nn.Module, buffers: bool) -> dict[str, torch.Tensor]:
        """The tensors this rank averages, by wrapper-free name: local shards of DTensors, replicas otherwise."""
        reshard_all(model)
        tensors = {clean_name(n): local_shard(p) for n, p in model.named_parameters()
                   if p.requires_grad or not self.trainable_only}
        if buffers and not self.trainable_only:
            tensors.update({clean_name(n): local_shard(b) for n, b in model.named_buffers() if b.is_floating_point()})
        return tensors

    def holding_average(self, averager: WeightAverager, model: nn.Module, base_model: nn.Module,
                        build_model: Callable[[], nn.Module], num_processes: int, candidate: Optional[str] = None,
                        in_model: bool = True) -> contextlib.AbstractContextManager[nn.Module]:
        """The training model with the average swapped in (`swapped_in`): never a full copy on every rank."""
        return swapped_in(averager, model, candidate, yields=base_model)

    def recompute_bn(self, module: nn.Module, loader_factory, device: torch.device, num_processes: int,
                     autocast) -> int:
        return recompute_bn_sharded(module, loader_factory, device, num_processes, autocast)

    def full_state(self, averager: WeightAverager, module: nn.Module,
                   process_index: int) -> Optional[dict[str, torch.Tensor]]:
        """The average gathered once, on the main process (None elsewhere); call inside `holding_average`."""
        return gather_full_state(averager, self.active_swap.model if self.active_swap else module, process_index)

    def register_checkpointing(self, accelerator, owner) -> None:
        """One file per rank, holding that rank's `owner.state_dict()` (its shards)."""
        register_shard_checkpointing(accelerator, owner.averager, owner=owner)


def averaged_bytes(averager: WeightAverager) -> int:
    """Bytes of this rank's averaged copy (4 x its local shard elements under the sharded placement)."""
    if averager.averaged is None:
        return 0
    return sum(t.numel() * t.element_size() for t in averager.averaged.values())


class _Swap:
    """Where the fp32 average and the training values of each tensor are while the average is swapped in."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.exchanged: list[tuple[torch.Tensor, torch.Tensor]] = []  # (model storage, averaged storage)
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (model storage, training value)
        self.fp32_average: dict[str, torch.Tensor] = {}  # parameter name -> the tensor holding its fp32 average

    def undo(self) -> None:
        for live, average in self.exchanged:
            _exchange(live, average)
        for live, training in self.saved:
            live.copy_(training)
        self.exchanged, self.saved = [], []


def _exchange(a: torch.Tensor, b: torch.Tensor) -> None:
    """Swaps the contents of two same-shape tensors through one temporary (exact when both are fp32)."""
    temporary = a.clone()
    a.copy_(b)
    b.copy_(temporary)


def _check_binding(averager: WeightAverager, model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Refuses a model whose shard storage changed since the averager bound it: its average froze silently.

    FSDP2 re-creates a parameter's local storage when it is replaced (e.g. `load_state_dict(assign=True)`);
    in-place optimizer steps and plain `load_state_dict` keep it.
    """
    if averager.bound_model is not model:
        return
    for name, bound in zip(averager.averaged, averager.bound_sources):
        live = params.get(name)
        if live is not None and (live.data_ptr() != bound.data_ptr() or live.shape != bound.shape):
            raise RuntimeError(f"sharded average: the storage of {name!r} changed after the averager bound the "
                               "model (parameters replaced?), so later updates did not reach the average; "
                               "build the averager after such changes")


@contextlib.contextmanager
def swapped_in(averager: WeightAverager, model: nn.Module, candidate: Optional[str] = None,
               yields: Optional[nn.Module] = None) -> Iterator[nn.Module]:
    """Holds the average (or the averager's `candidate`) in the sharded model, cast to each parameter's dtype.

    Call it on every rank. Inside, run forwards only (BN recompute, evaluation, `gather_full_state`);
    do not step the optimizer, update the averager or save a checkpoint. On exit the training weights
    and every buffer (BN running_mean, running_var, num_batches_tracked) are restored bit-identically,
    also when the body raises. No collective and no full gather: fp32 shards are exchanged with the
    model's shards through one temporary tensor at a time, so the averaged copy itself holds the
    training weights meanwhile; a low-precision parameter cannot hold the fp32 average, so its
    training value is saved aside instead (in its own, smaller, dtype). Buffers are saved aside (small).
    A candidate that starts later is computed into a temporary fp32 copy of the local shards first.
    The block receives `yields` (the model by default; the SWA controller passes it unwrapped).
    """
    placement = averager.placement
    if not isinstance(placement, ShardedPlacement):
        raise TypeError(f"swapped_in needs a ShardedPlacement, got {type(placement).__name__}")
    if placement.active_swap is not None:
        raise RuntimeError("the average is already swapped into a model")
    if averager.n_averaged == 0:
        raise ValueError("the average holds no update yet")
    averaged = averager.averaged if candidate is None else averager.candidate_tensors(candidate)
    reshard_all(model)
    params = {clean_name(n): local_shard(p) for n, p in model.named_parameters()}
    _check_binding(averager, model, params)
    buffers = {clean_name(n): b for n, b in model.named_buffers()}
    saved_buffers = [(b, b.clone()) for b in buffers.values()]
    swap = _Swap(model)
    try:
        with torch.no_grad():
            for name, average in averaged.items():
                if name in buffers:  # an EMA-averaged buffer; its training value is in saved_buffers
                    buffers[name].copy_(average)
                    continue
                live = params[name]
                if live.dtype == average.dtype:
                    _exchange(live, average)
                    swap.exchanged.append((live, average))
                    swap.fp32_average[name] = live
                else:
                    swap.saved.append((live, live.clone()))
                    live.copy_(average)
                    swap.fp32_average[name] = average
        placement.active_swap = swap
        yield model if yields is None else yields
    finally:
        with torch.no_grad():
            reshard_all(model)  # drops unsharded copies that hold the average
            swap.undo()
            for live, training in saved_buffers:
                live.copy_(training)
        placement.active_swap = None


@torch.no_grad()
def recompute_bn_sharded(
    model: nn.Module,
    loader_factory: Callable[[], Any],
    device: torch.device,
    num_processes: int = 1,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> int:
    """`recompute_bn` on an FSDP2 model whose ranks may hold different numbers of BN batches.

    Each FSDP forward all-gathers, so every rank must run the same number of forwards. Ranks with
    fewer batches first run the missing forwards on their first batch in eval mode; `recompute_bn`
    resets the statistics afterwards, so these forwards change nothing. Arguments and result are
    `recompute_bn`'s (call it inside `swapped_in`).

    Raises:
        ValueError: some rank has no BN batch while others have some (fewer batches than ranks).
    """
    if not batchnorm_layers(model):
        return 0
    reshard_all(model)  # the same FSDP state on every rank, so the forwards issue the same collectives
    if num_processes > 1:
        own = _count_batches(loader_factory())
        counts = torch.tensor([own, -own], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
        most, fewest = int(counts[0].item()), -int(counts[1].item())
        if fewest == 0 and most > 0:
            raise ValueError("bn_recompute: a rank has no BatchNorm batch (fewer batches than processes); "
                             "lower the batch size or read more samples")
        if own < most:
            spare = to_device(next(iter(loader_factory())), device)
            was_training = model.training
            model.eval()
            for _ in range(most - own):
                with autocast():
                    forward_logits(model, spare)
            model.train(was_training)
    return recompute_bn(model, loader_factory, device, num_processes, autocast)


def _count_batches(loader) -> int:
    try:
        return len(loader)
    except TypeError:  # an iterable without a length: count by reading it
        return sum(1 for _ in loader)


@torch.no_grad()
def gather_full_state(averager: WeightAverager, model: nn.Module,
                      process_index: int) -> Optional[dict[str, torch.Tensor]]:
    """The averaged model's full state dict on rank 0 (clean names -> CPU tensors); None on other ranks.

    Call it on every rank inside `swapped_in`, after the BN recompute: parameters come from the fp32
    average (even when the model trains in bf16), buffers from the model (the recomputed statistics).
    Each DTensor is gathered on its own (`full_tensor`), so a rank holds one full tensor at a time.
    """
    swap = averager.placement.active_swap
    if swap is None or swap.model is not model:
        raise RuntimeError("gather_full_state: call it inside swapped_in(averager, model), after the BN recompute, "
                           "so the exported buffers are the averaged model's")
    reshard_all(model)  # after a forward the root's parameters are full plain tensors, not DTensors
    state: Optional[dict[str, torch.Tensor]] = {} if process_index == 0 else None
    for key, value in model.state_dict().items():
        name = clean_name(key)
        average = swap.fp32_average.get(name)
        if _is_dtensor(value):
            local = value.to_local() if average is None else average.to(value.device)
            full = type(value).from_local(local, value.device_mesh, value.placements, run_check=False,
                                      shape=value.shape, stride=value.stride()).full_tensor()
        else:
            full = value if average is None else average
        if state is not None:
            state[name] = full.detach().to("cpu", copy=True)
    return state
