"""Training pieces shared by teacher training (squeeze) and student training (evaluate)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from fadrm.device import autocast


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (stages also use explicit generators for their sampling)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights of rank >= 2 only; never on biases and norm parameters."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total: int, warmup: int = 0, final_fraction: float = 0.0) -> float:
    """Learning-rate factor: linear warmup over ``warmup`` steps, then cosine to ``final_fraction``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def accuracy(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], precision: str = "fp32"
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (fractions) of ``model`` over ``batches``."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    for x, y in batches:
        with autocast(x.device, precision):
            logits = model(x)
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(y.view(-1, 1))
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += len(y)
    model.train(was_training)
    return correct1 / max(total, 1), correct5 / max(total, 1)


def to_channels_last(model: nn.Module, enabled: bool) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if enabled else model
