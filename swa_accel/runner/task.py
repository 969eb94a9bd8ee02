"""What a recipe hands the loop (`Task`), and that task's data on one launch: where decoded image tensors live,
the seeded training and BN views, and the loaders built from them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from accelerate.logging import get_logger
from torch import nn
from torch.utils.data import DataLoader

from ..batches import SelfBatchingDataset
from ..batchnorm import bn_pass_loader
from ..seeding import BN_STREAM, TRAIN_STREAM, SeededView, loader_generator

logger = get_logger(__name__)


@dataclass
class Task:
    """What a recipe hands the loop.

    Attributes:
        build_model: returns a fresh model of the task's architecture; called once (after
            `set_seed`) for training, and again whenever the averaged weights need a module.
        train_dataset: indexable dataset yielding what `collate_fn` batches into model inputs plus
            `labels` (dict batches) or `(inputs, labels)` tuples.
        eval_datasets: split name -> dataset.
        save_model: writes a `from_pretrained`-loadable folder for a module.
        collate_fn: batches samples; None uses torch's default collate.
        metric_names: evaluate modules to report (local ones ship in swa_accel/metrics).
        primary_metric: the metric plotted in curves.png.
        validation_split: the eval split that model selection reads (the choice among SWA candidates);
            never a split that results are reported on. None: the data has none.
        drop_last: drop the last incomplete training batch (static shapes); always on under XLA, where a
            new batch shape compiles a new graph.
        random_transforms: the training dataset draws from the torch RNG per sample (random
            augmentation); the loop then seeds each sample from (seed, epoch, index) with
            `SeededView`. A `SelfBatchingDataset` seeds its own augmentation and ignores this.
    """

    build_model: Callable[[], nn.Module]
    train_dataset: Any
    eval_datasets: dict[str, Any]
    save_model: Callable[[nn.Module, Path], None]
    collate_fn: Optional[Callable] = None
    metric_names: tuple[str, ...] = ("accuracy", "nll", "ece")
    primary_metric: str = "accuracy"
    validation_split: Optional[str] = None
    drop_last: bool = False
    random_transforms: bool = True


def seeded_dataset(task: Task, seed: int, stream: int):
    """The training data under a per-sample augmentation seed: (seed, stream, epoch, index) fixes every draw."""
    dataset = task.train_dataset
    if isinstance(dataset, SelfBatchingDataset):
        return dataset.view(seed, stream)
    return SeededView(dataset, seed, stream) if task.random_transforms else dataset


def set_epoch(dataset, epoch: int) -> None:
    """Tells a seeded dataset which epoch it serves (a dataset without random transforms has nothing to set)."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def keep_on_device(nbytes: int, device: torch.device, placement: str) -> bool:
    """Whether decoded tensors of `nbytes` live on the training device ('auto': when they take a quarter of it)."""
    if placement != "auto" or device.type != "cuda":
        return placement != "host"
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= free // 4


class TaskData:
    """A task's datasets on one launch, and the (unprepared) loaders over them.

    Args:
        task: the recipe's task.
        training: the run's `RunArguments` (seed, batch sizes, workers, data placement).
        device: the training device.
        xla: the launch runs on XLA (host-built batches, static shapes).
    """

    def __init__(self, task: Task, training, device: torch.device, xla: bool) -> None:
        self.task, self.training, self.device, self.xla = task, training, device, xla
        self.place_tensor_datasets()
        self.train_view = seeded_dataset(task, training.seed, TRAIN_STREAM)
        self.bn_view = seeded_dataset(task, training.seed, BN_STREAM)

    def place_tensor_datasets(self) -> None:
        """Moves self-batching datasets (decoded image tensors) to the training device, or keeps them in host
        memory, once."""
        datasets = [self.task.train_dataset, *self.task.eval_datasets.values()]
        tensors = [ds for ds in datasets if isinstance(ds, SelfBatchingDataset)]
        if not tensors:
            return
        # XLA: batches are built on the host and accelerate's loader wrapper copies them in, in a background
        # thread; a batch already on the XLA device makes that copy fail.
        device = torch.device("cpu") if self.xla else self.device
        on_device = keep_on_device(sum(ds.nbytes for ds in tensors), device, self.training.data_placement)
        for ds in tensors:
            ds.place(device, on_device)
        logger.info(f"image tensors ({sum(ds.nbytes for ds in tensors) / 2**20:.1f} MiB) kept in "
                    f"{'the memory of ' + str(device) if on_device else 'host memory'}", main_process_only=True)

    def num_workers(self, dataset) -> int:
        # A self-batching dataset's batch is a few tensor ops on the device: worker processes would only copy.
        return 0 if isinstance(dataset, SelfBatchingDataset) else self.training.dataloader_num_workers

    def pin_memory(self, dataset) -> bool:
        # Host-collated batches (text) go to a GPU through pinned memory, so the copy does not block.
        return self.device.type == "cuda" and not isinstance(dataset, SelfBatchingDataset)

    def train_loader(self) -> DataLoader:
        training, dataset = self.training, self.task.train_dataset
        return DataLoader(self.train_view, batch_size=training.per_device_train_batch_size, shuffle=True,
                          collate_fn=self.task.collate_fn, num_workers=self.num_workers(dataset),
                          generator=loader_generator(training.seed), drop_last=self.task.drop_last or self.xla,
                          pin_memory=self.pin_memory(dataset))

    def eval_loaders(self) -> dict[str, DataLoader]:
        return {name: DataLoader(ds, batch_size=self.training.per_device_eval_batch_size,
                                 collate_fn=self.task.collate_fn, num_workers=self.num_workers(ds),
                                 generator=loader_generator(self.training.seed), pin_memory=self.pin_memory(ds))
                for name, ds in self.task.eval_datasets.items()}

    def bn_loader(self, pass_id: int, batch_size: int, max_samples: Optional[int], num_processes: int,
                  process_index: int) -> Callable[[], DataLoader]:
        """This rank's share of BN pass `pass_id`: a seeded permutation (new for every pass), capped to
        `max_samples` over all ranks (None: the whole training set)."""
        set_epoch(self.bn_view, pass_id)
        return bn_pass_loader(self.bn_view, batch_size, self.task.collate_fn, num_processes, process_index,
                              self.training.seed, pass_id, max_samples, self.num_workers(self.bn_view))
