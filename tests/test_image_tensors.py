"""The device-side image batches: the hash, crops and flips against a per-sample reference, purity, layout."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from recipes.vision.image_tensors import MASK32, ImageTensorDataset, crop_draws, identity_collate, mix32, sample_hash


def lowbias32_reference(x: int) -> int:
    """Wellons' lowbias32 written out on plain Python integers with the published constants."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2**32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2**32
    return x ^ (x >> 16)


def test_mix32_on_arrays_equals_the_reference_and_stays_32_bit():
    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    ours = mix32(np.asarray(values, dtype=np.uint64)).tolist()
    assert ours == [lowbias32_reference(v) for v in values]
    assert all(0 <= v <= MASK32 for v in ours)
    assert [mix32(v) for v in values] == ours  # the same function on Python ints (used for the key)


def test_draws_are_uniform_enough_and_depend_on_every_coordinate():
    index = np.arange(20000)
    h = sample_hash(0, 0, 0, index)
    top, left, flip = crop_draws(h, pad=4)
    for offsets in (top, left):
        counts = np.bincount(offsets, minlength=9)
        assert len(counts) == 9 and np.abs(counts / counts.mean() - 1).max() < 0.06  # 9 offsets, each ~1/9
    assert abs(flip.mean() - 0.5) < 0.02
    assert abs(np.corrcoef(top, left)[0, 1]) < 0.03  # disjoint bits: the two offsets are independent
    for other in (sample_hash(1, 0, 0, index), sample_hash(0, 1, 0, index), sample_hash(0, 0, 1, index),
                  sample_hash(2**40, 0, 0, index)):
        assert (other != h).mean() > 0.99


def make_dataset(n=40, size=6, channels=3, pad=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size, channels), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 5, (n,), generator=generator)
    mean, std = (0.5, 0.4, 0.3)[:channels], (0.2, 0.25, 0.3)[:channels]
    return ImageTensorDataset(images, labels, mean, std, 255.0, pad=pad), images, labels, mean, std


def reference_sample(images, mean, std, pad, seed, stream, epoch, i):
    """One augmented sample built the slow way: numpy zero-pad, slice, flip, normalise."""
    image = images[i].numpy().astype(np.float64) / 255.0  # (H, W, C)
    size = image.shape[0]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    h = int(sample_hash(seed, stream, epoch, [i])[0])
    top, left, flip = (h & 0xFFFF) % (2 * pad + 1), ((h >> 16) & 0x7FFF) % (2 * pad + 1), h >> 31
    crop = padded[top:top + size, left:left + size]
    if flip:
        crop = crop[:, ::-1]
    crop = (crop - np.asarray(mean)) / np.asarray(std)
    return torch.from_numpy(crop.transpose(2, 0, 1).copy()).float()


def test_an_augmented_batch_equals_per_sample_crops_and_flips():
    dataset, images, labels, mean, std = make_dataset()
    view = dataset.view(seed=7, stream=1)
    view.set_epoch(3)
    indices = [5, 0, 39, 17, 17, 22]
    batch = view.__getitems__(indices)
    assert batch["pixel_values"].shape == (6, 3, 6, 6) and batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["labels"], labels[indices])
    for row, i in enumerate(indices):
        expected = reference_sample(images, mean, std, 2, 7, 1, 3, i)
        torch.testing.assert_close(batch["pixel_values"][row], expected, atol=1e-5, rtol=0)
    top, left, flip = crop_draws(sample_hash(7, 1, 3, indices), pad=2)
    assert 0 < flip.sum() < 6 and len(set(top.tolist())) > 1 and len(set(left.tolist())) > 1  # the check above covered flipped, unflipped and shifted crops


def test_a_sample_is_a_pure_function_of_seed_stream_epoch_and_index():
    dataset, *_ = make_dataset()
    view = dataset.view(seed=3, stream=0)
    view.set_epoch(2)
    a = view.__getitems__([4, 9, 11])["pixel_values"]
    b = view.__getitems__([11, 30, 4])["pixel_values"]
    assert torch.equal(a[0], b[2]) and torch.equal(a[2], b[0])  # batch company and position do not matter
    again = dataset.view(seed=3, stream=0)
    again.set_epoch(2)
    assert torch.equal(again.__getitems__([4, 9, 11])["pixel_values"], a)  # a fresh view (a resume) replays it
    again.set_epoch(3)
    assert not torch.equal(again.__getitems__([4, 9, 11])["pixel_values"], a)
    assert not torch.equal(dataset.view(seed=3, stream=1).__getitems__([4, 9, 11])["pixel_values"], a)


def test_without_augmentation_a_batch_is_the_normalised_image():
    dataset, images, labels, mean, std = make_dataset(pad=0)
    batch = dataset[:]
    expected = (images.permute(0, 3, 1, 2).double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(batch["pixel_values"], expected.float(), atol=1e-5, rtol=0)
    assert batch["pixel_values"].is_contiguous()
    # An augmenting split viewed without augmentation gives the centre crop: the same images.
    padded, *_ = make_dataset(pad=2)
    torch.testing.assert_close(padded.view(augment=False)[:]["pixel_values"], batch["pixel_values"])


def test_a_dataloader_with_identity_collate_yields_the_batches():
    dataset, _, labels, *_ = make_dataset()
    loader = DataLoader(dataset, batch_size=16, collate_fn=identity_collate)
    batches = list(loader)
    assert [len(b["labels"]) for b in batches] == [16, 16, 8]
    assert torch.equal(torch.cat([b["labels"] for b in batches]), labels)
    assert batches[0]["pixel_values"].is_contiguous() and batches[0]["pixel_values"].shape == (16, 3, 6, 6)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="images must be"):
        ImageTensorDataset(torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.int64), (0.5,), (0.2,), 255.0)
    with pytest.raises(ValueError, match="one label each"):
        ImageTensorDataset(torch.zeros(4, 8, 8, 1), torch.zeros(3, dtype=torch.int64), (0.5,), (0.2,), 255.0)
