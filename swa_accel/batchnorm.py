"""BatchNorm statistics of an averaged model, recomputed exactly across sharded data loaders.

Every rank runs forward passes over its own round-robin share of the training batches (the same
share accelerate would deal it, but with no padded duplicates), then one all-reduce combines the
per-rank cumulative averages. Every rank ends with exactly what `torch.optim.swa_utils.update_bn`
computes in one process over the same batches: per BN layer, the mean over batches of the batch
mean and of the batch (unbiased) variance.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
from accelerate.data_loader import BatchSamplerShard
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from .batches import forward_logits
from .seeding import loader_generator


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BN layers that keep running statistics (the only ones a recompute can change)."""
    return [
        m for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def shard_loader(
    dataset, batch_size: int, collate_fn: Optional[Callable], num_processes: int, process_index: int,
    num_workers: int = 0,
) -> DataLoader:
    """This rank's round-robin share of the in-order batches, without padding uneven shards."""
    batches = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
    sharded = BatchSamplerShard(batches, num_processes, process_index, split_batches=False, even_batches=False)
    # A private generator: iterating this loader must not draw from the global RNG (see seeding.py).
    return DataLoader(dataset, batch_sampler=sharded, collate_fn=collate_fn, num_workers=num_workers,
                      generator=loader_generator(0))


@torch.no_grad()
def recompute_bn(
    module: nn.Module,
    loader_factory: Callable[[], Any],
    device: torch.device,
    num_processes: int = 1,
    process_index: int = 0,
    max_batches: Optional[int] = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> int:
    """Resets and recomputes BN running statistics of `module` over sharded training batches.

    Args:
        module: a plain (unwrapped) module, identical on every rank.
        loader_factory: returns this rank's loader; called only when `module` has BN layers, so a
            model without BN reads no data at all.
        device: where the forward passes run.
        num_processes, process_index: the process group; the combine is one all-reduce.
        max_batches: cap on the global number of batches (the first `max_batches` of the in-order
            sequence, dealt round-robin), like a capped one-process pass.
        autocast: a context-manager factory, e.g. `accelerator.autocast`.

    Returns:
        The number of batches that contributed, summed over ranks (0 when there is no BN).
    """
    layers = batchnorm_layers(module)
    if not layers:
        return 0
    was_training = module.training
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # None turns the running stats into a cumulative average over batches
    module.train()
    seen = 0
    for batch in loader_factory():
        if max_batches is not None and seen * num_processes + process_index >= max_batches:
            break
        with autocast():
            forward_logits(module, send_to_device(batch, device))
        seen += 1
    # Each rank holds averages over its own `seen` batches; weight them by batch count and sum.
    sums = [torch.cat([m.running_mean.float() * seen, m.running_var.float() * seen]) for m in layers]
    flat = torch.cat(sums + [torch.tensor([float(seen)], device=sums[0].device)])
    if num_processes > 1:
        torch.distributed.all_reduce(flat)
    total = int(flat[-1].item())
    if total == 0:
        raise ValueError("bn_recompute: the training loader gave no batch for the BatchNorm recompute")
    offset = 0
    for layer, momentum in zip(layers, momenta):
        size = layer.running_mean.numel()
        layer.running_mean.copy_(flat[offset:offset + size] / total)
        layer.running_var.copy_(flat[offset + size:offset + 2 * size] / total)
        layer.num_batches_tracked.fill_(total)
        layer.momentum = momentum
        offset += 2 * size
    module.train(was_training)
    return total
