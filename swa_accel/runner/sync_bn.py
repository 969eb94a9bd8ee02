"""BatchNorm statistics over the whole global batch (`sync_batchnorm`), as timm's `--sync-bn` does.

Under DDP every process normalises with the statistics of its own micro-batch: 2 processes x 16 samples train with
BN statistics over 16 samples, not over the 32 of the global batch, and end elsewhere than 1 process x 32. With
`sync_batchnorm` the runner converts the model's BatchNorm layers to `SyncedBatchNorm` before `accelerator.prepare`,
and every training forward normalises with the mean and variance of the global batch.

On CUDA (and XPU, HPU) the synchronised layer is torch's `nn.SyncBatchNorm` (`TorchSyncedBatchNorm`). torch's
layer refuses CPU tensors, and DDP refuses it in a CPU module, so on the CPU (gloo) `SyncedBatchNorm`, a plain
BatchNorm subclass, computes the same thing itself: one all-reduce of the per-channel sums and sample counts gives
the global mean, a second one of the squared deviations from that mean gives the global (biased) variance, both
through an all-reduce whose backward all-reduces the gradients, so that the gradient is the global batch's. The two
passes are nn.BatchNorm's own (no E[x^2] - E[x]^2 cancellation). The running statistics move as nn.BatchNorm's do
(momentum, or the cumulative average when momentum is None; the unbiased global variance), identically on every
rank.

A forward synchronises only when it trains and records gradients: evaluation (eval mode) reads the running
statistics, and a train-mode forward under `torch.no_grad()` uses this process's batch alone, as nn.BatchNorm
does. The latter is what the average's BN recompute (`swa_accel/batchnorm.py`) runs: it combines the ranks
itself, exactly, whatever the layers are, and ranks may hold different numbers of its batches.

The converted layers keep the BN parameter and buffer names, so checkpoints, `save_pretrained` exports and the
averaged module (a fresh `build_model()` with ordinary BatchNorm, which the average's weights are loaded into) read
and write the same state dicts as without the option.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from .console import say

#: Devices where torch's own `nn.SyncBatchNorm` synchronises; everywhere else (the CPU) this module's code does.
TORCH_SYNC_DEVICES = ("cuda", "xpu", "hpu")


class _AllReduceSum(torch.autograd.Function):
    """A differentiable all-reduce (sum): every rank gets the sum, and the backward sums the ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of `tensor` over the ranks of `group` (None: the world), with gradients flowing back to every rank."""
    return _AllReduceSum.apply(tensor, group if group is not None else dist.group.WORLD)


def synchronizes(layer: nn.Module) -> bool:
    """Whether a forward of `layer` now normalises with the statistics of every rank's batch: in training, with
    gradients recorded, in a process group of more than one rank."""
    return (layer.training and torch.is_grad_enabled() and dist.is_available() and dist.is_initialized()
            and dist.get_world_size(layer.process_group or dist.group.WORLD) > 1)


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch on any device, through two all-reduces (the CPU's, over gloo); a plain
    BatchNorm (not torch's `nn.SyncBatchNorm`, which DDP refuses in a CPU module).

    Args:
        process_group: the ranks whose batches make the global batch; None: all of them.
        (the others): as `nn.BatchNorm2d`'s; any input of at least 2 dimensions, (N, C, ...).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not synchronizes(self):
            return super().forward(input)  # this process's batch (train mode) or the running statistics (eval)
        return self.forward_all_reduced(input)

    def forward_all_reduced(self, input: torch.Tensor) -> torch.Tensor:
        """The synchronised forward: two all-reduces, and autograd does the rest."""
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # the cumulative average
                factor = 1.0 / float(self.num_batches_tracked)
        group = self.process_group
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        values = input.float()  # the statistics in fp32, whatever the input's dtype
        count = torch.tensor([values.numel() // max(values.shape[1], 1)], dtype=values.dtype, device=values.device)
        sums = all_reduce_sum(torch.cat([values.sum(dims), count]), group)
        total = sums[-1].detach()
        if float(total) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()} "
                             "on this process and one value in all")
        mean = sums[:-1] / total
        centered = values - mean.view(shape)
        var = all_reduce_sum((centered * centered).sum(dims), group) / total  # biased, as BN normalises
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.float().view(shape)
        if self.bias is not None:
            out = out + self.bias.float().view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * (total / (total - 1))
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out.to(input.dtype)


class TorchSyncedBatchNorm(nn.SyncBatchNorm):
    """torch's `nn.SyncBatchNorm` (CUDA, XPU, HPU), which synchronises only when `synchronizes` says so."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not synchronizes(self):
            return nn.modules.batchnorm._BatchNorm.forward(self, input)
        return super().forward(input)


#: The layers `convert_sync_batchnorm` makes (and leaves alone when they are there already).
SYNCED = (SyncedBatchNorm, TorchSyncedBatchNorm, nn.SyncBatchNorm)


def convert_sync_batchnorm(module: nn.Module, device_type: str = "cpu", process_group=None) -> nn.Module:
    """Replaces every BatchNorm layer of `module` by a synchronised one sharing its parameters and buffers:
    `TorchSyncedBatchNorm` where `device_type` (the training device's) is one of `TORCH_SYNC_DEVICES`, else
    `SyncedBatchNorm`.

    As `nn.SyncBatchNorm.convert_sync_batchnorm`: the parameters are the same objects (an optimizer built before
    still holds them), the state dict keeps its names. Returns `module` (or the new layer when `module` is one).
    """
    kind = TorchSyncedBatchNorm if device_type in TORCH_SYNC_DEVICES else SyncedBatchNorm
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SYNCED):
        converted = kind(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                         process_group)
        converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, device_type, process_group))
    return converted


def synced_batchnorm(model: nn.Module, enabled: bool, accelerator) -> nn.Module:
    """The runner's hook (`--sync_batchnorm`): the model with synchronised BatchNorm on a multi-process launch.

    Call it before `accelerator.prepare`. With one process, or a model without BatchNorm, nothing changes and one
    line says so; otherwise one line says how many layers now synchronise.

    Raises:
        ConfigError: under XLA (TPU), which neither torch's layer nor this module's all-reduce serves.
    """
    if not enabled:
        return model
    if accelerator.num_processes == 1:
        say(accelerator, "sync_batchnorm: one process, whose batch statistics are already the whole batch's; "
                         "BatchNorm layers left as they are")
        return model
    if accelerator.distributed_type.value == "XLA":
        raise ConfigError("sync_batchnorm: not available under XLA (TPU); run without it")
    model = convert_sync_batchnorm(model, accelerator.device.type)
    count = sum(isinstance(m, SYNCED) for m in model.modules())
    if count == 0:
        say(accelerator, "sync_batchnorm: the model has no BatchNorm layer; nothing to synchronise")
    else:
        say(accelerator, f"sync_batchnorm: {count} BatchNorm layers normalise with the statistics of the global "
                         f"batch ({accelerator.num_processes} processes)")
    return model


__all__ = ["SYNCED", "SyncedBatchNorm", "TORCH_SYNC_DEVICES", "TorchSyncedBatchNorm", "all_reduce_sum",
           "convert_sync_batchnorm", "synced_batchnorm"]
