"""Image classification data for the vision SWA recipes, through ``datasets``.

Two sources go through the same code:

* ``dataset_name="digits"`` (default): scikit-learn's bundled 8x8 digits, fully
  offline, split 70/30 with stratification.
* anything else: ``datasets.load_dataset(dataset_name)``, i.e. a hub id such as
  ``"uoft-cs/cifar10"`` / ``"uoft-cs/cifar100"`` or a local directory laid out like
  a hub dataset (``data/train-*.parquet``, ``data/test-*.parquet``).

``load_vision_data`` validates splits/columns/label counts up front, optionally
injects symmetric label noise into the train split, then decodes every split once
into an ``recipes.vision.image_tensors.ImageTensorDataset``: one uint8 tensor that
batches by indexing, with crop, flip and normalisation as tensor ops on the
training device. A batch is ``{"pixel_values": float32 (B, C, H, W), "labels": int64 (B,)}``.
"""

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import datasets
import numpy as np
import torch

from recipes.vision.image_tensors import ImageTensorDataset
from swa_accel.field_types import check_field_types

__all__ = [
    "VisionDataArguments",
    "VisionData",
    "load_digits_dataset",
    "load_vision_data",
    "CIFAR_STATS",
]

DIGITS_NAME = "digits"

# Well-known per-channel statistics of the CIFAR training sets (pixel values in [0, 1]).
CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

_IMAGE_COLUMN_CANDIDATES = ("img", "image")
_LABEL_COLUMN_CANDIDATES = ("label", "fine_label")
# Cap on rows decoded to estimate normalisation statistics on large datasets.
_MAX_STATS_ROWS = 10_000


@dataclass
class VisionDataArguments:
    """Which image dataset to load and how to prepare it."""

    dataset_name: str = field(
        default=DIGITS_NAME,
        metadata={
            "help": "'digits' (offline scikit-learn 8x8 digits) or anything datasets.load_dataset accepts: "
            "a hub id such as 'uoft-cs/cifar10' or a local dataset directory."
        },
    )
    image_column: Optional[str] = field(
        default=None, metadata={"help": "Image column; default: auto-detect 'img' or 'image'."}
    )
    label_column: Optional[str] = field(
        default=None, metadata={"help": "Label column; default: 'label', else 'fine_label' (CIFAR-100)."}
    )
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    eval_split: str = field(
        default="test", metadata={"help": "Split(s) used for evaluation; comma-separated for several."}
    )
    label_noise: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of TRAIN labels replaced by a uniformly random different class (symmetric noise). "
            "Eval splits stay clean."
        },
    )
    label_noise_seed: int = field(
        default=0, metadata={"help": "Seed of the label noise and of the validation carve (validation_fraction)."}
    )
    validation_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this fraction of the train split, stratified by (noisy) label, as the 'validation' "
            "split that model selection reads. It keeps the train split's label noise, as a practitioner's "
            "validation labels would. 0: none."
        },
    )
    validation_split: Optional[str] = field(
        default=None,
        metadata={"help": "An existing dataset split to use as the validation split instead of carving one."},
    )
    augment: bool = field(
        default=False,
        metadata={"help": "Standard CIFAR augmentation on the train split: zero-padded random crop + horizontal flip."},
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N train rows (for quick runs)."}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N rows of each eval split."}
    )
    image_size: Optional[int] = field(
        default=None,
        metadata={"help": "Resize every image to this many pixels square when decoding (PIL bilinear, as the "
                          "export's image processor resizes new images), e.g. 224 for a checkpoint made for that "
                          "size; also makes images of mixed sizes one size. Default: the dataset's own size."},
    )
    num_labels: Optional[int] = field(
        default=None, metadata={"help": "Expected number of classes; loading fails if the dataset disagrees."}
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        if not isinstance(self.dataset_name, str) or not self.dataset_name.strip():
            raise ValueError(f"dataset_name: must be a non-empty string, got {self.dataset_name!r}")
        for name in ("image_column", "label_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name}: must be a non-empty string or None, got {value!r}")
        if not isinstance(self.train_split, str) or not self.train_split.strip():
            raise ValueError(f"train_split: must be a non-empty string, got {self.train_split!r}")
        if not isinstance(self.eval_split, str) or not self.eval_splits:
            raise ValueError(f"eval_split: must name at least one split, got {self.eval_split!r}")
        if isinstance(self.label_noise, bool) or not isinstance(self.label_noise, (int, float)):
            raise ValueError(f"label_noise: must be a number in [0, 1), got {self.label_noise!r}")
        if not (0.0 <= float(self.label_noise) < 1.0) or math.isnan(float(self.label_noise)):
            raise ValueError(f"label_noise: must be in [0, 1), got {self.label_noise}")
        if isinstance(self.label_noise_seed, bool) or not isinstance(self.label_noise_seed, int):
            raise ValueError(f"label_noise_seed: must be an integer, got {self.label_noise_seed!r}")
        if isinstance(self.validation_fraction, bool) or not isinstance(self.validation_fraction, (int, float)) \
                or not 0.0 <= float(self.validation_fraction) < 1.0:
            raise ValueError(f"validation_fraction: must be in [0, 1), got {self.validation_fraction!r}")
        if self.validation_split is not None:
            if self.validation_fraction:
                raise ValueError("validation_split: set either validation_split or validation_fraction, not both")
            if self.validation_split in self.eval_splits and self.validation_split != "validation":
                raise ValueError(f"validation_split: {self.validation_split!r} is an eval split that results are "
                                 "reported on; model selection needs a split of its own")
            if self.validation_split == self.train_split:
                raise ValueError(f"validation_split: {self.validation_split!r} is the train split")
        if "validation" in self.eval_splits and (self.validation_fraction or self.validation_split):
            raise ValueError("eval_split: 'validation' is added by validation_fraction / validation_split; "
                             "list only the reporting splits")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: must be a positive integer or None, got {value!r}")
        if self.image_size is not None and self.image_size < 2:
            raise ValueError(f"image_size: must be at least 2 pixels, got {self.image_size}")
        if self.num_labels is not None and (
            isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or self.num_labels < 2
        ):
            raise ValueError(f"num_labels: must be an integer >= 2 or None, got {self.num_labels!r}")

    @property
    def eval_splits(self) -> list[str]:
        """The eval split names, parsed from the comma-separated ``eval_split``."""
        return [s.strip() for s in str(self.eval_split).split(",") if s.strip()]


@dataclass
class VisionData:
    """Prepared datasets plus the metadata a model needs.

    Attributes:
        train: Train split, decoded; augmented (when asked) by ``train.view(seed, stream)``.
        evals: Eval splits keyed by split name (e.g. ``"validation"``, ``"test"``), decoded, never augmented.
            ``"validation"`` (when configured) comes first; model selection reads it and nothing else.
        label_names: Class names, index = label id.
        in_channels: Number of image channels (1 for digits, 3 for CIFAR).
        image_size: Image height (= width) in pixels.
        noisy_indices: Train row indices whose label was corrupted (sorted).
        mean: Per-channel normalisation mean (in [0, 1] pixel units).
        std: Per-channel normalisation std.
    """

    train: ImageTensorDataset
    evals: dict[str, ImageTensorDataset]
    label_names: list[str]
    in_channels: int
    image_size: int
    noisy_indices: list[int] = field(default_factory=list)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def validation_split(self) -> Optional[str]:
        """The split model selection reads, if the data has one."""
        return "validation" if "validation" in self.evals else None

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)


# --------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------


def load_digits_dataset(seed: int = 0) -> datasets.DatasetDict:
    """Scikit-learn's bundled 8x8 digits as a ``DatasetDict``.

    The 1,797 images are split 70/30 (stratified by class, fixed ``seed``) into
    ``"train"`` and ``"test"``.

    Args:
        seed: Random state of the stratified split.

    Returns:
        A ``DatasetDict`` with columns ``image`` (8x8 float32 array, values 0..16)
        and ``label`` (``ClassLabel`` with names ``"0"``..``"9"``).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32)
    labels = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=0.3, random_state=seed, stratify=labels
    )
    features = datasets.Features(
        {
            "image": datasets.Array2D(shape=(8, 8), dtype="float32"),
            "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
        }
    )

    def build(idx: np.ndarray) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"image": [images[i] for i in idx], "label": [int(labels[i]) for i in idx]}, features=features
        )

    return datasets.DatasetDict({"train": build(idx_train), "test": build(idx_test)})


# --------------------------------------------------------------------------------------
# Image conversion and transforms
# --------------------------------------------------------------------------------------


def _to_hwc_array(image: Any, keep_dtype: bool = False) -> np.ndarray:
    """Convert one stored image (PIL, array, or nested list) to an (H, W, C) array of raw values (float32
    unless ``keep_dtype``)."""
    if hasattr(image, "mode") and hasattr(image, "convert"):  # PIL image, no hard PIL import needed
        if image.mode not in ("L", "RGB"):
            # Palette/alpha/16-bit images are normalised to the two layouts we handle.
            image = image.convert("L" if image.mode in ("1", "I", "I;16", "F") else "RGB")
        arr = np.asarray(image, dtype=None if keep_dtype else np.float32)
    else:
        arr = np.asarray(image, dtype=None if keep_dtype else np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif arr.ndim != 3:
        raise ValueError(f"image_column: expected 2D or 3D images, got an array of shape {arr.shape}")
    return arr


def resized(array: np.ndarray, size: int) -> np.ndarray:
    """One (H, W, C) image at ``size`` x ``size``, resized exactly as the export's image processor resizes a new
    image (transformers' PIL resize, bilinear, on 8-bit values), so that both see the same pixels."""
    from transformers.image_transforms import resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    if array.dtype != np.uint8:
        if not (np.all(array == np.round(array)) and array.min() >= 0 and array.max() <= 255):
            raise ValueError("image_size: resizing needs 8-bit images, and this dataset's are not")
        array = array.astype(np.uint8)
    if array.shape[:2] == (size, size):
        return array
    out = resize(array, (size, size), resample=PILImageResampling.BILINEAR, data_format=ChannelDimension.LAST,
                 input_data_format=ChannelDimension.LAST)
    return out.reshape(size, size, array.shape[2])


def decode_images(ds: datasets.Dataset, image_column: str, size: Optional[int] = None) -> np.ndarray:
    """Every image of ``ds`` as one (N, H, W, C) array: uint8 when the values are 8-bit, else float32; with
    ``size``, each image resized to ``size`` x ``size`` first (see ``resized``).

    Raises:
        ValueError: If the images are not all of the same size and channel count.
    """
    arrays = []
    plain = ds.with_format(None)
    for start in range(0, len(plain), 1000):
        batch = (_to_hwc_array(image, keep_dtype=True) for image in plain[start : start + 1000][image_column])
        arrays.extend(batch if size is None else (resized(array, size) for array in batch))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"image_column: images must all have one size, found {sorted(shapes)[:3]}")
    images = np.stack(arrays)
    if images.dtype != np.uint8 and np.all(images == np.round(images)) and images.min() >= 0 and images.max() <= 255:
        images = images.astype(np.uint8)  # e.g. digits: integer counts 0..16 stored as float
    elif images.dtype != np.uint8:
        images = images.astype(np.float32)
    return images


# --------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------


def _available(names) -> str:
    return ", ".join(sorted(names)) or "(none)"


def _resolve_column(
    arg_name: str, requested: Optional[str], candidates: tuple[str, ...], columns: list[str], dataset_name: str
) -> str:
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"{arg_name}: column {requested!r} not in dataset; available: {_available(columns)}")
        return requested
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"{arg_name}: could not auto-detect a column (tried {', '.join(map(repr, candidates))}) in dataset "
        f"{dataset_name!r}; available: {_available(columns)}"
    )


def _label_names(splits: dict[str, datasets.Dataset], label_column: str) -> list[str]:
    feature = splits[next(iter(splits))].features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    # Plain integer labels: assume ids 0..max over all splits.
    max_label = -1
    for ds in splits.values():
        values = np.asarray(ds.data.column(label_column).to_numpy(zero_copy_only=False))
        if values.size:
            if not np.issubdtype(values.dtype, np.integer) or values.min() < 0:
                raise ValueError(
                    f"label_column: column {label_column!r} must hold non-negative integer class ids "
                    f"(or be a ClassLabel), got dtype {values.dtype}"
                )
            max_label = max(max_label, int(values.max()))
    return [str(i) for i in range(max_label + 1)]


def _known_cifar_stats(dataset_name: str, in_channels: int, image_size: int):
    key = os.path.basename(dataset_name.rstrip("/")).lower().replace("-", "")
    if key in CIFAR_STATS and in_channels == 3 and image_size == 32:
        return CIFAR_STATS[key]
    return None


def _compute_stats(images: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of decoded (N, H, W, C) ``images`` (after dividing by ``scale``)."""
    n = len(images)
    if n > _MAX_STATS_ROWS:
        # Evenly spaced rows: deterministic and representative for large datasets.
        images = images[np.linspace(0, n - 1, _MAX_STATS_ROWS).round().astype(np.int64)]
    total = np.zeros(images.shape[-1], dtype=np.float64)
    total_sq = np.zeros(images.shape[-1], dtype=np.float64)
    for start in range(0, len(images), 1000):  # chunks bound the float64 copy
        arr = images[start : start + 1000].astype(np.float64) / scale
        total += arr.sum(axis=(0, 1, 2))
        total_sq += (arr**2).sum(axis=(0, 1, 2))
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)  # constant channels: avoid dividing by ~0
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _apply_label_noise(
    train: datasets.Dataset, label_column: str, num_classes: int, noise: float, seed: int
) -> tuple[datasets.Dataset, list[int]]:
    """Replace exactly ``round(noise * len(train))`` labels by a different uniformly random class."""
    n_noisy = int(round(noise * len(train)))
    if n_noisy == 0:
        return train, []
    if num_classes < 2:
        raise ValueError("label_noise: needs at least 2 classes to flip labels")
    labels = np.asarray(train[label_column], dtype=np.int64)
    rng = np.random.default_rng(seed)
    noisy = np.sort(rng.choice(len(labels), size=n_noisy, replace=False))
    # An offset in [1, K-1] mod K is uniform over the K-1 *other* classes.
    offsets = rng.integers(1, num_classes, size=n_noisy)
    new_labels = labels.copy()
    new_labels[noisy] = (labels[noisy] + offsets) % num_classes
    feature = train.features[label_column]
    train = train.remove_columns([label_column]).add_column(label_column, new_labels.tolist(), feature=feature)
    return train, noisy.tolist()


def _carve_validation(
    train: datasets.Dataset, label_column: str, fraction: float, seed: int, noisy_indices: list[int]
) -> tuple[datasets.Dataset, datasets.Dataset, list[int]]:
    """Splits ``fraction`` of the (already noisy) train rows off as validation, stratified by label.

    Returns the new train split, the validation split and the noisy row indices renumbered into the new train split.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(train[label_column], dtype=np.int64)
    try:
        keep, held = train_test_split(np.arange(len(labels)), test_size=fraction, random_state=seed, stratify=labels)
    except ValueError as error:  # a class with one row, or a fraction that leaves a split empty
        raise ValueError(f"validation_fraction: cannot hold out {fraction} of {len(labels)} train rows "
                         f"stratified by label ({str(error).splitlines()[0]})") from None
    keep, held = np.sort(keep), np.sort(held)
    new_index = {int(old): new for new, old in enumerate(keep)}
    noisy = [new_index[i] for i in noisy_indices if i in new_index]
    return train.select(keep), train.select(held), noisy


def load_vision_data(args: VisionDataArguments) -> VisionData:
    """Load, validate and prepare an image classification dataset.

    Args:
        args: The data configuration.

    Returns:
        A ``VisionData`` whose datasets yield ``{"pixel_values": float32 (C, H, W),
        "labels": int64}`` rows by index, and whole batches through ``__getitems__``
        (collate with ``recipes.vision.image_tensors.identity_collate``).

    Raises:
        ValueError: If a split or column is missing, labels are unusable, or
            ``num_labels`` disagrees with the data. Raised before any training.
    """
    is_digits = args.dataset_name == DIGITS_NAME
    if is_digits:
        raw = load_digits_dataset()
    else:
        try:
            raw = datasets.load_dataset(args.dataset_name)
        except (OSError, ValueError) as error:  # FileNotFoundError, DatasetNotFoundError, offline ConnectionError
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"dataset_name: cannot load {args.dataset_name!r}: {message}") from error
        if not isinstance(raw, datasets.DatasetDict):
            raise ValueError(f"dataset_name: {args.dataset_name!r} did not load as a dataset with named splits")

    named_splits = [("train_split", args.train_split)] + [("eval_split", s) for s in args.eval_splits]
    if args.validation_split is not None:
        named_splits.append(("validation_split", args.validation_split))
    for arg_name, split in named_splits:
        if split not in raw:
            raise ValueError(f"{arg_name}: split {split!r} not in dataset; available: {_available(raw.keys())}")

    splits = {args.train_split: raw[args.train_split], **{s: raw[s] for s in args.eval_splits}}
    if args.validation_split is not None:
        splits[args.validation_split] = raw[args.validation_split]
    train_columns = list(raw[args.train_split].column_names)
    image_column = _resolve_column(
        "image_column", args.image_column, _IMAGE_COLUMN_CANDIDATES, train_columns, args.dataset_name
    )
    label_column = _resolve_column(
        "label_column", args.label_column, _LABEL_COLUMN_CANDIDATES, train_columns, args.dataset_name
    )
    for split, ds in splits.items():
        for arg_name, column in (("image_column", image_column), ("label_column", label_column)):
            if column not in ds.column_names:
                raise ValueError(
                    f"{arg_name}: column {column!r} not in split {split!r}; available: {_available(ds.column_names)}"
                )
    if len(raw[args.train_split]) == 0:
        raise ValueError(f"train_split: split {args.train_split!r} is empty")

    label_names = _label_names(splits, label_column)
    if args.num_labels is not None and args.num_labels != len(label_names):
        raise ValueError(
            f"num_labels: config says {args.num_labels} but dataset {args.dataset_name!r} has {len(label_names)} labels"
        )

    train = raw[args.train_split]
    if args.max_train_samples is not None and args.max_train_samples < len(train):
        train = train.select(range(args.max_train_samples))
    evals = {}
    for split in args.eval_splits:
        ds = raw[split]
        if args.max_eval_samples is not None and args.max_eval_samples < len(ds):
            ds = ds.select(range(args.max_eval_samples))
        evals[split] = ds

    train, noisy_indices = _apply_label_noise(
        train, label_column, len(label_names), float(args.label_noise), args.label_noise_seed
    )
    if args.validation_fraction:
        train, validation, noisy_indices = _carve_validation(
            train, label_column, float(args.validation_fraction), args.label_noise_seed, noisy_indices
        )
        evals = {"validation": validation, **evals}
    elif args.validation_split is not None:
        validation = raw[args.validation_split]
        if args.max_eval_samples is not None and args.max_eval_samples < len(validation):
            validation = validation.select(range(args.max_eval_samples))
        evals = {"validation": validation, **evals}

    # Decode every split once; from here on a batch is a gather from one tensor.
    train_images = decode_images(train, image_column, args.image_size)
    _, height, width, in_channels = train_images.shape
    if height != width:
        raise ValueError(f"image_column: expected square images, got {height}x{width}")
    eval_images = {name: decode_images(ds, image_column, args.image_size) for name, ds in evals.items()}
    for name, images in eval_images.items():
        if images.shape[1:] != train_images.shape[1:]:
            raise ValueError(f"image_column: split {name!r} has images of shape {images.shape[1:]}, "
                             f"train has {train_images.shape[1:]}")
    # Digits store raw counts 0..16; decoded images are 8-bit.
    scale = 16.0 if is_digits else 255.0
    stats = None if is_digits else _known_cifar_stats(args.dataset_name, in_channels, height)
    mean, std = stats if stats is not None else _compute_stats(train_images, scale)

    def tensors(images: np.ndarray, ds: datasets.Dataset, pad: int) -> ImageTensorDataset:
        labels = torch.as_tensor(np.asarray(ds.with_format("numpy")[label_column]), dtype=torch.int64)
        return ImageTensorDataset(torch.from_numpy(images), labels, mean, std, scale, pad=pad)

    pad = max(1, height // 8) if args.augment else 0  # 4 px for 32x32 CIFAR images, as in the standard recipe
    train_tensors = tensors(train_images, train, pad)
    eval_tensors = {name: tensors(eval_images[name], ds, 0) for name, ds in evals.items()}

    return VisionData(
        train=train_tensors,
        evals=eval_tensors,
        label_names=label_names,
        in_channels=int(in_channels),
        image_size=int(height),
        noisy_indices=noisy_indices,
        mean=tuple(mean),
        std=tuple(std),
    )
