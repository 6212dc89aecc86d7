"""Losses: BatchNorm-statistics matching (a hook written once) and soft-label KL."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class BNStatsLoss:
    """Match the batch statistics at every BN layer's input to that layer's running statistics.

    Registers one forward hook per BN layer. After a forward pass, :meth:`pop` returns
    ``sum_l w_l * (||mu_l - mu^_l||_2 + ||var_l - var^_l||_2)`` with ``w_1 = first_weight``
    for the first BN layer reached and 1 for the others, and resets for the next pass.
    Statistics are computed in fp32 even under autocast. A model without BN gives 0.
    """

    def __init__(self, model: nn.Module, first_weight: float = 10.0):
        self.first_weight = first_weight
        self.layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        self._terms: list[torch.Tensor] = []
        self._handles = [layer.register_forward_hook(self._hook) for layer in self.layers]

    def _hook(self, module: _BatchNorm, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].float()
        dims = [0, *range(2, x.ndim)]
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        self._terms.append(
            torch.linalg.vector_norm(mean - module.running_mean, 2) + torch.linalg.vector_norm(var - module.running_var, 2)
        )

    def pop(self) -> torch.Tensor | None:
        """The weighted loss of the last forward pass (None without BN layers)."""
        terms, self._terms = self._terms, []
        if not terms:
            return None
        return self.first_weight * terms[0] + sum(terms[1:], torch.zeros_like(terms[0]))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)), averaged over the batch."""
    s = F.log_softmax(student_logits.float() / temperature, dim=1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True)
