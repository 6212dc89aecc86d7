"""Losses: BatchNorm-statistics matching (a hook written once), the feature set's topology
(H0 persistence, after RETA's topology alignment) and soft-label KL."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
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


def classifier_head(model: nn.Module) -> nn.Module:
    """The layer that maps a model's features to its logits: timm's ``get_classifier()``, else the
    last ``nn.Linear`` in module order (ConvNet's ``classifier``, the CIFAR ResNets' ``head``)."""
    getter = getattr(model, "get_classifier", None)
    head = getter() if callable(getter) else None
    if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear classifier head to read features from")
    return linears[-1]


class FeatureTap:
    """Keeps the input of a model's classifier head (its features, flattened) from the last forward."""

    def __init__(self, model: nn.Module):
        self.last: torch.Tensor | None = None
        self._handle = classifier_head(model).register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.last = inputs[0].flatten(1)

    def pop(self) -> torch.Tensor:
        features, self.last = self.last, None
        if features is None:
            raise RuntimeError("FeatureTap: no forward pass since the last pop")
        return features

    def remove(self) -> None:
        self._handle.remove()


def mst_lengths(points: torch.Tensor) -> torch.Tensor:
    """H0 persistence of a point cloud (n x d) under the Rips filtration: the n - 1 death times,
    which are the edge lengths of its Euclidean minimum spanning tree, sorted ascending.

    Prim's algorithm picks the edges on a detached host copy of the distances (one transfer, no
    per-edge device sync); the lengths are read from the differentiable distance matrix, so
    gradients flow to the points (as in topological autoencoders). Distances are in fp32.
    """
    n = points.shape[0]
    if n < 2:
        return points.new_zeros(0, dtype=torch.float32)
    dist = torch.cdist(points.float()[None], points.float()[None])[0]
    d = dist.detach().cpu().double().numpy()
    inside = np.zeros(n, dtype=bool)
    inside[0] = True
    best, parent = d[0].copy(), np.zeros(n, dtype=np.int64)
    rows, cols = np.empty(n - 1, dtype=np.int64), np.empty(n - 1, dtype=np.int64)
    for e in range(n - 1):
        j = int(np.argmin(np.where(inside, np.inf, best)))
        rows[e], cols[e] = parent[j], j
        inside[j] = True
        closer = d[j] < best
        best[closer], parent[closer] = d[j][closer], j
    index = torch.from_numpy(rows).to(points.device), torch.from_numpy(cols).to(points.device)
    return torch.sort(dist[index]).values


class TopologyLoss:
    """Match each class's H0 persistence in feature space to that of real images (RETA's topology
    alignment, components only: no loops, no persistence images).

    ``real`` holds, per class, the features of real images (under the views recovery uses). For
    the ``n`` images of a class in a batch, the target is the mean sorted death-time vector of
    ``draws`` random ``n``-subsets of that class's real features, so a set whose images collapse
    onto their anchors (short deaths) or scatter (long ones) is pulled towards real spacing. The
    loss is the squared difference of the two vectors relative to the target's mean length,
    averaged over deaths and over the classes with at least two images in the batch.
    """

    def __init__(self, real: dict[int, torch.Tensor], draws: int = 32, seed: tuple[int, ...] = (0,)):
        self.real, self.draws, self.seed = real, draws, seed
        self._targets: dict[tuple[int, int], torch.Tensor] = {}

    def target(self, label: int, n: int) -> torch.Tensor:
        """The mean sorted H0 death times of ``draws`` random ``n``-subsets of class ``label``
        (seeded by ``label`` and ``n``, so it does not depend on which batches came first)."""
        key = (label, n)
        if key not in self._targets:
            pool = self.real[label]
            if len(pool) < n:
                raise ValueError(f"class {label}: {len(pool)} real feature vectors for a set of {n} images")
            rng = np.random.default_rng([*self.seed, label, n])
            picks = [torch.from_numpy(rng.permutation(len(pool))[:n]) for _ in range(self.draws)]
            self._targets[key] = torch.stack([mst_lengths(pool[p.to(pool.device)]) for p in picks]).mean(0)
        return self._targets[key]

    def bind(self, labels: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per class of a batch (``labels`` on the host) with at least two images: its rows and target."""
        out = []
        for label in np.unique(labels):
            rows = np.flatnonzero(labels == label)
            if len(rows) >= 2:
                out.append((torch.from_numpy(rows), self.target(int(label), len(rows))))
        return out

    @staticmethod
    def loss(features: torch.Tensor, bound: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The loss of a batch's features against what :meth:`bind` gave for its labels."""
        if not bound:
            return features.new_zeros((), dtype=torch.float32)
        terms = []
        for rows, target in bound:
            target = target.to(features.device)
            deaths = mst_lengths(features[rows.to(features.device)])
            terms.append(((deaths - target) / target.mean()).pow(2).mean())
        return torch.stack(terms).mean()


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)), averaged over the batch."""
    s = F.log_softmax(student_logits.float() / temperature, dim=1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True)
