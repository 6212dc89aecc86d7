"""Losses: BatchNorm-statistics matching (a hook written once) and soft-label KL."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BN layers whose running statistics recovery matches, in module order."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, x.ndim)]
    return x.mean(dims), x.var(dims, unbiased=False)


class BNStatsLoss:
    """Match the batch statistics at every BN layer's input to that layer's running statistics.

    Registers one forward hook per BN layer. After a forward pass, :meth:`pop` returns
    ``sum_l w_l * (||mu_l - mu^_l||_2 + ||var_l - var^_l||_2)`` with ``w_1 = first_weight``
    for the first BN layer reached and 1 for the others, and resets for the next pass.
    Statistics are computed in fp32 even under autocast. A model without BN gives 0.

    Difficulty groups (PSM): after :meth:`use_groups` (each layer's per-group mean and variance
    of real images, from :func:`grouped_bn_statistics`) and :meth:`set_groups` (each image's
    group in the batch), each group of the batch is matched to its own real statistics and the
    terms are weighted by the group's share of the batch.
    """

    def __init__(self, model: nn.Module, first_weight: float = 10.0):
        self.first_weight = first_weight
        self.layers = bn_layers(model)
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}
        self._terms: list[torch.Tensor] = []
        self._targets: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._groups: list[tuple[int, torch.Tensor, float]] | None = None
        self._handles = [layer.register_forward_hook(self._hook) for layer in self.layers]

    def use_groups(self, targets: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Per layer, (mean, var) of shape groups x channels: the targets of :meth:`set_groups`."""
        if len(targets) != len(self.layers):
            raise ValueError(f"{len(targets)} group statistics for {len(self.layers)} BN layers")
        self._targets = targets

    def set_groups(self, ids: torch.Tensor | None) -> None:
        """Each image's difficulty group for the coming passes (None: the running statistics)."""
        if ids is None:
            self._groups = None
            return
        if self._targets is None:
            raise ValueError("set_groups needs the groups' statistics first (use_groups)")
        present = torch.unique(ids).tolist()  # once per batch of images, not per step
        self._groups = [(g, torch.nonzero(ids == g).flatten(), float((ids == g).sum()) / len(ids)) for g in present]

    def _hook(self, module: _BatchNorm, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].float()
        if self._groups is None:
            mean, var = _moments(x)
            self._terms.append(
                torch.linalg.vector_norm(mean - module.running_mean, 2) + torch.linalg.vector_norm(var - module.running_var, 2)
            )
            return
        target_mean, target_var = self._targets[self._index[id(module)]]
        term = torch.zeros((), device=x.device)
        for g, rows, share in self._groups:
            mean, var = _moments(x.index_select(0, rows))
            term = term + share * (
                torch.linalg.vector_norm(mean - target_mean[g], 2) + torch.linalg.vector_norm(var - target_var[g], 2)
            )
        self._terms.append(term)

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


@torch.no_grad()
def grouped_bn_statistics(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], groups: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer, the mean and variance of its input over the images of each group.

    ``batches`` yields (images, group id per image). Returns, per layer in :func:`bn_layers`
    order, (mean, var) of shape groups x channels (fp32, on the layer's device). A group with no
    image gets the layer's running statistics.
    """
    layers = bn_layers(model)
    sums: list[torch.Tensor | None] = [None] * len(layers)
    squares: list[torch.Tensor | None] = [None] * len(layers)
    counts: list[torch.Tensor | None] = [None] * len(layers)
    current: dict[str, torch.Tensor] = {}

    def hook(i: int):
        def collect(module, inputs, output):
            x = inputs[0].double()
            one_hot = F.one_hot(current["ids"], groups).double()  # B x G
            per_image = x.flatten(2)  # B x C x HW
            s, q = one_hot.T @ per_image.sum(2), one_hot.T @ per_image.pow(2).sum(2)
            n = one_hot.sum(0) * per_image.shape[2]
            sums[i] = s if sums[i] is None else sums[i] + s
            squares[i] = q if squares[i] is None else squares[i] + q
            counts[i] = n if counts[i] is None else counts[i] + n

        return collect

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for images, ids in batches:
            current["ids"] = ids.long()
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for i, layer in enumerate(layers):
        if counts[i] is None:
            raise ValueError("grouped_bn_statistics: no images")
        n = counts[i].clamp_min(1)[:, None]
        mean = sums[i] / n
        var = (squares[i] / n - mean.pow(2)).clamp_min(0)
        empty = counts[i] == 0
        mean[empty] = layer.running_mean.double()
        var[empty] = layer.running_var.double()
        out.append((mean.float(), var.float()))
    return out


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)), averaged over the batch."""
    s = F.log_softmax(student_logits.float() / temperature, dim=1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True)
