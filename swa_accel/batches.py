"""One place that knows the batch layouts recipes produce (HF-style dicts and (inputs, labels) tuples), and the
kind of dataset that builds whole batches itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class SelfBatchingDataset(Protocol):
    """A dataset that builds whole batches itself (`__getitems__`) and seeds its own augmentation.

    Such a dataset (the vision recipe's decoded image tensors, `recipes/vision/image_tensors.py`) can keep its
    data on the training device. The loop places it once (`place`), gets per-stream views of it (`view`), and
    gives its loaders no worker processes and no pinned memory: a batch is a few tensor ops, workers would only
    copy.
    """

    nbytes: int  # the size of its data, for deciding where the data lives

    def place(self, device: torch.device, keep_on_device: bool) -> Any: ...

    def view(self, seed: int, stream: int) -> Any: ...

    def set_epoch(self, epoch: int) -> None: ...


def split_batch(batch: Any) -> tuple[tuple, dict, Optional[torch.Tensor]]:
    """Splits a batch into positional inputs, keyword inputs and labels (None when absent)."""
    # Mapping, not dict: HF collators return BatchEncoding, a UserDict.
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return (), inputs, batch.get("labels")
    if isinstance(batch, (tuple, list)):
        return (batch[0],), {}, (batch[1] if len(batch) > 1 else None)
    return (batch,), {}, None


def cast_floating(obj: Any, dtype: Optional[torch.dtype]) -> Any:
    """Casts floating tensors (images) to the model's weight dtype, leaving token ids alone."""
    if dtype is None or dtype == torch.float32:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        return {k: cast_floating(v, dtype) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(cast_floating(v, dtype) for v in obj)
    return obj


def forward_logits(model: nn.Module, batch: Any, input_dtype: Optional[torch.dtype] = None):
    """Runs the model on a batch and returns (logits, labels); handles `.logits` model outputs."""
    args, kwargs, labels = split_batch(batch)
    output = model(*cast_floating(args, input_dtype), **cast_floating(kwargs, input_dtype))
    logits = output.logits if hasattr(output, "logits") else output
    return logits, labels


def to_device(batch: Any, device) -> Any:
    """accelerate's `send_to_device` (nested batches of any layout), imported when first called: a loop that calls
    this has built an Accelerator already, and `import swa_accel` stays at torch's cost (accelerate loads yaml and
    tqdm)."""
    from accelerate.utils import send_to_device

    return send_to_device(batch, device)
