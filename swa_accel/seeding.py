"""Random augmentation that is a pure function of (seed, stream, epoch, sample index).

Data loaders prefetch, and a resumed run rebuilds its loader at a different point of the global RNG
stream than the uninterrupted run did, so augmentation drawn from the global torch RNG cannot be
replayed exactly. Seeding each sample's draw from its own coordinates makes a resumed run see the
very same augmented batches, and leaves the global stream (dropout) untouched by data loading.
"""

from __future__ import annotations

import hashlib

import torch
from torch.utils.data import Dataset

TRAIN_STREAM, BN_STREAM, XLA_STEP_STREAM = 0, 1, 2


def sample_seed(seed: int, stream: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{stream}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds must fit a signed 64-bit int


class SeededView(Dataset):
    """Wraps a dataset so that item `i` of epoch `e` is produced under its own torch seed."""

    def __init__(self, dataset, seed: int, stream: int) -> None:
        self.dataset, self.seed, self.stream = dataset, seed, stream
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.stream, self.epoch, int(index)))
            return self.dataset[index]


def loader_generator(seed: int) -> torch.Generator:
    """A private generator for a DataLoader, so creating its iterator never draws from the global RNG."""
    return torch.Generator().manual_seed(seed)
