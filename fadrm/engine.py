"""Training pieces shared by teacher training (squeeze) and student training (evaluate)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from fadrm.device import autocast
from fadrm.errors import DivergenceError


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
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    precision: str = "fp32",
    who: str | None = None,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (fractions) of ``model`` over ``batches``.

    With ``who`` (e.g. ``"squeeze 0-convnet"``), outputs that are not finite raise a
    :class:`DivergenceError` naming it instead of counting as predictions of class 0.
    """
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    for x, y in batches:
        with autocast(x.device, precision):
            logits = model(x)
        if who is not None and not torch.isfinite(logits).all():
            raise DivergenceError(f"{who}: the trained model's outputs on the test split are not finite; its training diverged")
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(y.view(-1, 1))
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += len(y)
    model.train(was_training)
    return correct1 / max(total, 1), correct5 / max(total, 1)


def accumulation_weights(sizes: list[int], accumulate: int) -> list[float]:
    """Loss weight of each micro-batch (of ``sizes`` samples) when ``accumulate`` micro-batches make
    one optimiser step: its share of the samples of its step. Each step's gradient is then the
    mean over the samples it saw — also for the last, partial group (a group of 1 micro-batch
    weighs 1, not 1/accumulate) and for a smaller last micro-batch."""
    weights = []
    for start in range(0, len(sizes), accumulate):
        group = sizes[start : start + accumulate]
        weights += [size / sum(group) for size in group]
    return weights


def to_channels_last(model: nn.Module, enabled: bool) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if enabled else model
