"""Tiny on-disk datasets that mimic hub image datasets, for offline tests."""

import pathlib

import datasets
import numpy as np
from PIL import Image

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar_like(
    root: pathlib.Path,
    num_classes: int = 10,
    n_train: int = 64,
    n_test: int = 32,
    cifar100: bool = False,
    image_size: int = 32,
    seed: int = 0,
) -> pathlib.Path:
    """Write a tiny dataset with the uoft-cs/cifar10 (or cifar100) schema as parquet.

    Files go to ``root/data/{train,test}-00000-of-00001.parquet`` so that
    ``datasets.load_dataset(str(root))`` loads it exactly like the hub dataset.
    Each class has its own mean colour; pixels add Gaussian noise, so a tiny model
    can learn the classes.

    Args:
        root: Output directory (created if missing).
        num_classes: Number of (fine) classes.
        n_train: Number of train rows (labels cycle through the classes).
        n_test: Number of test rows.
        cifar100: Use the CIFAR-100 schema (``img``, ``fine_label``,
            ``coarse_label``) instead of CIFAR-10's (``img``, ``label``).
        image_size: Height and width of the RGB images.
        seed: Seed for colours, noise and label order.

    Returns:
        ``root``.
    """
    root = pathlib.Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, size=(num_classes, 3))

    if not cifar100 and num_classes == len(CIFAR10_NAMES):
        names = list(CIFAR10_NAMES)
    else:
        names = [f"class_{i}" for i in range(num_classes)]
    if cifar100:
        num_coarse = max(1, min(20, num_classes))
        features = datasets.Features(
            {
                "img": datasets.Image(),
                "fine_label": datasets.ClassLabel(names=names),
                "coarse_label": datasets.ClassLabel(names=[f"superclass_{i}" for i in range(num_coarse)]),
            }
        )
    else:
        features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})

    for split, n in (("train", n_train), ("test", n_test)):
        # Every class appears (when n >= num_classes), in a shuffled order.
        labels = rng.permutation(np.arange(n) % num_classes)
        images = []
        for label in labels:
            pixels = colours[label] + rng.normal(0.0, 25.0, size=(image_size, image_size, 3))
            images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB"))
        columns = {"img": images}
        if cifar100:
            columns["fine_label"] = labels.tolist()
            columns["coarse_label"] = (labels % num_coarse).tolist()
        else:
            columns["label"] = labels.tolist()
        ds = datasets.Dataset.from_dict(columns, features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root
