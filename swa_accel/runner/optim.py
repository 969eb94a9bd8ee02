"""The optimizer, built from the config (SGD with momentum, or AdamW with the usual no-decay groups)."""

from __future__ import annotations

import torch
from torch import nn

from .config import RunArguments


def decay_groups(model: nn.Module, weight_decay: float, exclude_bias_and_norm: bool) -> list[dict]:
    """Parameter groups; with `exclude_bias_and_norm`, biases and 1-D norm weights get no weight decay."""
    if not exclude_bias_and_norm:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Biases and LayerNorm/BatchNorm scales are 1-D; decaying them only hurts.
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, training: RunArguments) -> torch.optim.Optimizer:
    groups = decay_groups(model, training.weight_decay, training.no_decay_on_bias_and_norm)
    if training.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=training.learning_rate, momentum=training.momentum)
    return torch.optim.AdamW(
        groups, lr=training.learning_rate, betas=(training.adam_beta1, training.adam_beta2), eps=training.adam_epsilon
    )
