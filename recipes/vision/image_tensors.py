"""Image splits held as one uint8 tensor on the training device, batched by indexing.

A split is decoded once into `images` (N, H, W, C) and `labels` (N,). A batch is built from the
sampler's indices in a few tensor ops: gather, zero-padded random crop and horizontal flip in one
`index_select`, then normalisation. No per-sample Python, no worker processes, no host copy of
pixels when the split lives on the device.

Augmentation stays a pure function of (seed, stream, epoch, sample index), now through a
counter-based integer hash (`sample_hash`), so a resumed run replays the very same batches and the
result does not depend on how many processes share the sampler's order.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

MASK32 = 0xFFFFFFFF


def mix32(x):
    """Wellons' `lowbias32` integer hash: a bijection on 32-bit values with strong avalanche.

    Works on Python ints and on numpy uint64 arrays, whose products wrap modulo 2**64 by definition,
    so masking to 32 bits gives the exact 32-bit result.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def sample_hash(seed: int, stream: int, epoch: int, indices) -> np.ndarray:
    """A 32-bit hash of (seed, stream, epoch, index) for every index, as a uint64 array.

    The crop row, crop column and flip of a sample come from disjoint bits of this one value.
    """
    key = mix32((seed & MASK32) ^ mix32((seed >> 32) & MASK32))
    key = mix32(key ^ (stream & MASK32))
    key = mix32(key ^ (epoch & MASK32))
    return mix32(mix32(np.asarray(indices, dtype=np.uint64) ^ np.uint64(key)))


def crop_draws(hashes: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top, left, flip) of each sample: offsets in [0, 2 * pad] and a coin, from bits 0-15, 16-30 and 31."""
    span = np.uint64(2 * pad + 1)
    top = (hashes & np.uint64(0xFFFF)) % span
    left = ((hashes >> np.uint64(16)) & np.uint64(0x7FFF)) % span
    flip = (hashes >> np.uint64(31)).astype(bool)
    return top.astype(np.int64), left.astype(np.int64), flip


def identity_collate(batch):
    """Batches come ready from `ImageTensorDataset.__getitems__`; the DataLoader passes them on."""
    return batch


class ImageTensorDataset(Dataset):
    """A decoded image split that yields whole normalised (optionally augmented) batches.

    Args:
        images: (N, H, W, C) uint8 (or float32) raw pixel values.
        labels: (N,) int64 class ids.
        mean, std: per-channel normalisation in [0, 1] pixel units.
        scale: raw value of a full-intensity pixel (255 for 8-bit images, 16 for digits).
        pad: zero padding of the random crop; 0 turns augmentation (crop and flip) off.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 scale: float, pad: int = 0) -> None:
        if images.ndim != 4 or labels.shape != images.shape[:1]:
            raise ValueError(f"images must be (N, H, W, C) with one label each, got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        self.height, self.width = int(images.shape[1]), int(images.shape[2])
        self.pad = int(pad)
        # The zero border of the crop is stored once, so a crop is a plain gather.
        self.images = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad)) if pad else images
        self.labels = labels.to(torch.int64)
        self._labels = self.labels.numpy()  # host copy for the per-batch arithmetic
        self.mean, self.std, self.scale = tuple(mean), tuple(std), float(scale)
        self.seed, self.stream, self.epoch = 0, 0, 0
        self.augment = self.pad > 0
        self.device = torch.device("cpu")
        self.pixels_on_device = True  # with the CPU as the training device, host memory is the device
        self._set_normalisation()

    # ----- placement and views --------------------------------------------------------------

    def _set_normalisation(self) -> None:
        channels = self.images.shape[-1]
        shape = (1, channels, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape) * self.scale
        inv = 1.0 / (torch.tensor(self.std, dtype=torch.float32).view(shape) * self.scale)
        self._shift, self._inv = mean.to(self.device), inv.to(self.device)

    def place(self, device: torch.device, keep_on_device: bool) -> "ImageTensorDataset":
        """Batches go to `device`; the pixels live there too, or in host memory when `keep_on_device` is False."""
        self.device = torch.device(device)
        self.pixels_on_device = keep_on_device
        if keep_on_device:
            self.images = self.images.to(self.device)
        self._set_normalisation()
        return self

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def view(self, seed: int = 0, stream: int = 0, augment: Optional[bool] = None) -> "ImageTensorDataset":
        """The same pixels (no copy) under another augmentation seed and stream, with its own epoch."""
        other = object.__new__(ImageTensorDataset)
        other.__dict__.update(self.__dict__)
        other.seed, other.stream, other.epoch = seed, stream, 0
        other.augment = self.pad > 0 if augment is None else (augment and self.pad > 0)
        return other

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # ----- batches --------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _crop_indices(self, indices: np.ndarray) -> np.ndarray:
        """(B, H + W) row then column indices into the padded images: a random crop, mirrored when flipped."""
        top, left, flip = crop_draws(sample_hash(self.seed, self.stream, self.epoch, indices), self.pad)
        cols = np.arange(self.width)
        cols = np.where(flip[:, None], cols[::-1], cols)
        return np.concatenate([top[:, None] + np.arange(self.height), left[:, None] + cols], axis=1)

    def _gather(self, index: torch.Tensor, crop: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, H, W, C) raw pixels of `index`, cropped by `crop` (or the centre when not augmenting)."""
        if crop is None:
            pixels = self.images.index_select(0, index)
            if self.pad:
                pixels = pixels[:, self.pad:self.pad + self.height, self.pad:self.pad + self.width]
            return pixels
        # One index_select of whole pixels (C values each) at flat positions: several times faster than
        # a three-tensor advanced index on the CPU, and a single gather kernel on a GPU.
        _, padded_height, padded_width, channels = self.images.shape
        rows, cols = crop[:, :self.height], crop[:, self.height:]
        flat = (index[:, None, None] * padded_height + rows[:, :, None]) * padded_width + cols[:, None, :]
        pixels = self.images.view(-1, channels).index_select(0, flat.reshape(-1))
        return pixels.view(len(index), self.height, self.width, channels)

    def __getitems__(self, indices: Union[Sequence[int], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch of `indices`: {"pixel_values": float32 (B, C, H, W) on the device, "labels": (B,)}."""
        # The per-sample arithmetic runs on the host in numpy (a few microseconds for a batch);
        # the device sees one small copy and the gather.
        index = np.asarray(indices, dtype=np.int64)
        parts = [index[:, None], self._labels[index][:, None]]
        if self.augment:
            parts.append(self._crop_indices(index))
        packed = torch.from_numpy(np.concatenate(parts, axis=1))
        if self.pixels_on_device:
            # Indices, labels and crops travel as one small int64 tensor; the pixels never leave the device.
            packed = _to_device(packed, self.device)
            pixels = self._gather(packed[:, 0], packed[:, 2:] if self.augment else None)
        else:
            # Pixels in host memory: gather there, then one asynchronous copy of the uint8 batch.
            pixels = _to_device(self._gather(packed[:, 0], packed[:, 2:] if self.augment else None), self.device)
            packed = _to_device(packed, self.device)
        labels = packed[:, 1]
        # Transpose to (B, C, H, W) while the pixels are still bytes, then normalise in place (the
        # gather made a fresh tensor): a quarter of the memory traffic of doing it in float.
        pixels = pixels.permute(0, 3, 1, 2).contiguous().float()
        return {"pixel_values": pixels.sub_(self._shift).mul_(self._inv), "labels": labels}

    def __getitem__(self, key: Union[int, slice]) -> dict[str, torch.Tensor]:
        """One sample (int) or a stacked range (slice), as `__getitems__` would batch them."""
        if isinstance(key, slice):
            return self.__getitems__(range(len(self))[key])
        row = self.__getitems__([int(key)])
        return {name: value[0] for name, value in row.items()}


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copy that never blocks the host: through pinned memory on CUDA."""
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
