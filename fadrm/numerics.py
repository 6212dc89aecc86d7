"""Non-finite values and collapse, caught in the stage that makes them.

A diverging run must stop where it diverges, with a message that names the stage, the step
and the parameter most likely to blame — not publish broken weights, images or soft labels
for a later stage to trip over and blame itself. Used by squeeze and evaluate (training),
recover (images) and relabel (soft labels).

Order matters with fp16 loss scaling: the loss is checked before backward; gradients only
after ``scaler.unscale_``. An overflow of the *scaled* gradients is expected under fp16 — the
scaler skips that step and halves the scale — and is not divergence; it is when the gradients
overflow with the scale already at 1 or below, or when they are non-finite without loss
scaling at all (fp32, bf16).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from fadrm.errors import DivergenceError

# A training loss this many times that of a uniform guess (ln C) is an explosion, whatever the epoch.
EXPLODED = 100.0
# A final training loss above twice a uniform guess's means the model ended worse than guessing.
WORSE_THAN_GUESSING = 2.0
# Recovery collapse: more than this share of pixels pinned at 0 or 255 ...
SATURATED = 0.5
# ... and that many more than the initial images had (a dataset of line drawings starts pinned).
SATURATED_RISE = 0.25


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


def gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


class StepGuard:
    """Optimiser steps through a GradScaler that stop at the first non-finite value.

    ``where`` names the run (``"squeeze 0-convnet"``), ``hint`` the likely parameter
    (``"lower squeeze.lr (now 50)"``).
    """

    def __init__(self, where: str, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, hint: str):
        self.where, self.optimizer, self.scaler, self.hint = where, optimizer, scaler, hint
        self.skipped = 0

    def check_loss(self, loss: torch.Tensor, at: str) -> None:
        if not torch.isfinite(loss):
            raise DivergenceError(f"{self.where}: loss became {loss.item()} at {at}; {self.hint}")

    def step(self, at: str) -> bool:
        """Unscale, check the gradients, step and update the scale; False when the scaler skipped."""
        self.scaler.unscale_(self.optimizer)
        if all_finite(gradients(self.optimizer)):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return True
        if not self.scaler.is_enabled() or self.scaler.get_scale() <= 1.0:
            raise DivergenceError(f"{self.where}: gradients became non-finite at {at}; {self.hint}")
        self.skipped += 1
        self.scaler.step(self.optimizer)  # skips the update: the scaler saw the overflow
        self.scaler.update()
        return False


class FiniteWatch:
    """The first step whose loss or gradients were non-finite, remembered on the device.

    ``if not torch.isfinite(loss)`` makes the host wait for the device at every step. A watch
    records the first bad step with device-side ops only, and :meth:`first` reads it back — one
    sync, done where the loop syncs anyway (its ``log_every`` rows, the end of a stage). The
    error still names the exact step; the steps in between ran on NaNs that are thrown away.
    Under fp16 loss scaling use :class:`StepGuard`: the scaler syncs every step by itself.
    """

    LOSS, GRADIENTS = 0, 1

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.kind = torch.zeros((), dtype=torch.long, device=device)
        self.value = torch.zeros((), device=device)

    def _mark(self, step: int, bad: torch.Tensor, kind: int, value: torch.Tensor) -> None:
        first = bad & (self.step < 0)
        self.value = torch.where(first, value, self.value)
        self.kind.masked_fill_(first, kind)
        self.step.masked_fill_(first, step)

    def loss(self, step: int, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self._mark(step, ~torch.isfinite(loss), self.LOSS, loss)

    def gradients(self, step: int, tensors: Iterable[torch.Tensor]) -> None:
        flags = [torch.isfinite(t).all() for t in tensors if t is not None]
        if flags:
            self._mark(step, ~torch.stack(flags).all(), self.GRADIENTS, self.value)

    def first(self) -> tuple[str, int, float] | None:
        """``("loss" | "gradients", step, loss value)`` of the first bad step, or None (syncs once)."""
        step, kind, value = torch.stack([self.step.double(), self.kind.double(), self.value.double()]).tolist()
        if step < 0:
            return None
        return ("loss" if kind == self.LOSS else "gradients"), int(step), value


def check_model(model: nn.Module, where: str, at: str, hint: str) -> None:
    """Weights and buffers (BatchNorm statistics) must be finite."""
    if not all_finite([*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]):
        raise DivergenceError(f"{where}: weights or BatchNorm statistics became non-finite by {at}; {hint}")


def check_epoch_loss(loss: float, num_classes: int, where: str, at: str, hint: str, final: bool = False) -> None:
    """An epoch's mean training loss against a uniform guess's (ln C): exploded, or (at the end) worse."""
    guess = math.log(max(num_classes, 2))
    if not math.isfinite(loss):
        raise DivergenceError(f"{where}: training loss became {loss} by {at}; {hint}")
    if loss > EXPLODED * guess:
        raise DivergenceError(
            f"{where}: training loss exploded to {loss:.4g} by {at} (a uniform guess scores ln {num_classes} = {guess:.2f}); {hint}"
        )
    if final and loss > WORSE_THAN_GUESSING * guess:
        raise DivergenceError(
            f"{where}: training ended with loss {loss:.4g}, worse than a uniform guess (ln {num_classes} = {guess:.2f}); {hint}"
        )


def saturated_share(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> float:
    """Share of values of ``x`` pinned at their lower or upper bound (0 or 255 after denormalising)."""
    tol = 1e-4 * (high - low)
    return float(((x <= low + tol) | (x >= high - tol)).float().mean())
