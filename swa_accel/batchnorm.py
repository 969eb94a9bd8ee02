"""BatchNorm statistics of an averaged model, recomputed exactly across sharded data loaders.

Every rank runs forward passes over its own round-robin share of the training batches (as
accelerate deals batches, but with no padded duplicates), then one all-reduce combines the
per-rank cumulative averages. Every rank ends with exactly what `torch.optim.swa_utils.update_bn`
computes in one process over the same batches: per BN layer, the mean over batches of the batch
mean and of the batch (unbiased) variance.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from .batches import forward_logits, to_device
from .seeding import loader_generator
from .xla_sync import mark_step


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BN layers that keep running statistics (the only ones a recompute can change)."""
    return [
        m for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def bn_order(num_samples: int, seed: int, pass_id: int) -> list[int]:
    """A seeded permutation of the training set for one BN pass, the same on every rank.

    A capped pass then reads a random subset, not the first rows of a dataset that may be sorted.
    """
    generator = torch.Generator().manual_seed((seed * 1_000_003 + pass_id) % (2**63))
    return torch.randperm(num_samples, generator=generator).tolist()


def shard_batches(order: Sequence[int], batch_size: int, num_processes: int, process_index: int,
                  max_samples: Optional[int] = None) -> list[list[int]]:
    """This rank's round-robin share of the batches of `order`, capped to the first `max_samples` (all ranks).

    The cap keeps whole batches, ceil(max_samples / batch_size) of them, so the result is exactly
    `update_bn` in one process over those batches. Uneven shards are not padded.
    """
    batches = [list(order[start:start + batch_size]) for start in range(0, len(order), batch_size)]
    if max_samples is not None:
        batches = batches[:math.ceil(max_samples / batch_size)]
    return batches[process_index::num_processes]


def shard_loader(
    dataset, batch_size: int, collate_fn: Optional[Callable], num_processes: int, process_index: int,
    num_workers: int = 0, order: Optional[Sequence[int]] = None, max_samples: Optional[int] = None,
) -> DataLoader:
    """This rank's loader over `shard_batches` of `order` (default: the dataset in order)."""
    order = range(len(dataset)) if order is None else order
    batches = shard_batches(order, batch_size, num_processes, process_index, max_samples)
    # A private generator: iterating this loader must not draw from the global RNG (see seeding.py).
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn, num_workers=num_workers,
                      generator=loader_generator(0))


@torch.no_grad()
def recompute_bn(
    module: nn.Module,
    loader_factory: Callable[[], Any],
    device: torch.device,
    num_processes: int = 1,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> int:
    """Resets and recomputes BN running statistics of `module` over sharded training batches.

    Args:
        module: a plain (unwrapped) module, identical on every rank.
        loader_factory: returns this rank's loader (e.g. `shard_loader`, which also caps the pass);
            called only when `module` has BN layers, so a model without BN reads no data at all.
        device: where the forward passes run.
        num_processes: size of the process group; the combine is one all-reduce.
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
        # Momentum 1: each forward leaves exactly its batch's statistics, which are summed here. (Momentum None,
        # torch's cumulative average, reads the batch count from the device at every layer and batch, and a
        # momentum of 1/k would be a new constant, so a new XLA graph, at every batch.)
        layer.momentum = 1.0
    statistics = [s for m in layers for s in (m.running_mean, m.running_var)]
    sums = [torch.zeros(s.shape, dtype=torch.float32, device=s.device) for s in statistics]
    module.train()
    seen = 0
    for batch in loader_factory():
        with autocast():
            forward_logits(module, to_device(batch, device))
        torch._foreach_add_(sums, statistics)
        if device.type == "xla":
            mark_step()  # one graph per batch shape, the same at every batch and pass
        seen += 1
    # Each rank holds sums over its own `seen` batches; one all-reduce adds them up with the batch counts.
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


def per_process_batch_size(loader) -> Optional[int]:
    """A (prepared) loader's batch size on one process: accelerate moves it into the batch sampler."""
    return getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)


def bn_pass_loader(dataset, batch_size: int, collate_fn: Optional[Callable], num_processes: int, process_index: int,
                   seed: int, pass_id: int, max_samples: Optional[int], num_workers: int = 0) -> Callable[[], Any]:
    """A factory of this rank's share of BN pass `pass_id` over `dataset`: a seeded random order (new for each pass,
    the same on every rank), capped to `max_samples` (all ranks together; None: everything), no padded duplicates.
    The order is drawn only when the factory is called, so a model without BN costs nothing."""
    def loader() -> DataLoader:
        order = bn_order(len(dataset), seed, pass_id)
        return shard_loader(dataset, batch_size, collate_fn, num_processes, process_index, num_workers, order=order,
                            max_samples=max_samples)

    return loader


def bn_loader_from(train_loader, num_processes: int, process_index: int, max_samples: Optional[int], seed: int,
                   pass_id: int, batch_size: Optional[int] = None) -> Callable[[], Any]:
    """`bn_pass_loader` over a training loader's own dataset and collate function (`batch_size` None: the loader's).

    A dataset without a length or indexing (an iterable) is read through the loader itself, as accelerate
    shards it.
    """
    dataset = getattr(train_loader, "dataset", None)
    batch_size = batch_size or per_process_batch_size(train_loader)
    if batch_size is None or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        return lambda: train_loader
    return bn_pass_loader(dataset, batch_size, train_loader.collate_fn, num_processes, process_index, seed, pass_id,
                          max_samples)
