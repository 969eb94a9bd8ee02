"""Which seeding a training dataset gets, and the per-sample seeding of datasets with random transforms."""

import torch
from torch import nn

from recipes.vision.image_tensors import ImageTensorDataset
from swa_accel.runner.task import Task, seeded_dataset
from swa_accel.seeding import SeededView


class RandomTransform(torch.utils.data.Dataset):
    """A user dataset whose transform draws from the global torch RNG, as torchvision transforms do."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.rand(3) + index


def task_with(dataset, random_transforms=True):
    return Task(build_model=lambda: nn.Linear(1, 1), train_dataset=dataset, eval_datasets={},
                save_model=lambda module, folder: None, random_transforms=random_transforms)


def test_seeded_view_replays_a_sample_by_seed_epoch_and_index_and_leaves_the_global_rng_alone():
    view = SeededView(RandomTransform(), seed=5, stream=0)
    view.set_epoch(2)
    state = torch.random.get_rng_state()
    first = [view[i] for i in (3, 1)]
    assert torch.equal(torch.random.get_rng_state(), state)
    again = SeededView(RandomTransform(), seed=5, stream=0)
    again.set_epoch(2)
    assert torch.equal(again[1], first[1]) and torch.equal(again[3], first[0])  # order does not matter
    again.set_epoch(3)
    assert not torch.equal(again[1], first[1])


def test_each_kind_of_dataset_gets_its_own_seeding():
    images = ImageTensorDataset(torch.zeros(4, 6, 6, 1, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64),
                                (0.5,), (0.2,), 255.0, pad=1)
    view = seeded_dataset(task_with(images), seed=3, stream=1)
    assert isinstance(view, ImageTensorDataset) and (view.seed, view.stream) == (3, 1) and view.images is images.images
    assert isinstance(seeded_dataset(task_with(RandomTransform()), 3, 1), SeededView)
    plain = RandomTransform()
    assert seeded_dataset(task_with(plain, random_transforms=False), 3, 1) is plain  # e.g. tokenized text
