"""Batched, differentiable augmentation, and the recorded views of the relabel stage.

A *view* of a synthetic image is a random-resized crop (integer box in the source image),
a horizontal flip, and a CutMix box into which a partner view of the same batch is pasted.
:func:`sample_views` draws one epoch of views from ``(seed, epoch)`` alone, and
:func:`render_views` turns recorded views into pixels. Relabel and evaluate both call
``render_views`` — the student sees exactly the pixels the teacher labelled, and nothing in
PyTorch's DataLoader has to be patched to replay them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fadrm.device import to_device

FULL_RATIO = (3 / 4, 4 / 3)


def crop_boxes(
    n: int, size: int, scale: tuple[float, float], rng: np.random.Generator, ratio: tuple[float, float] = FULL_RATIO
) -> np.ndarray:
    """``n`` random-resized-crop boxes ``(top, left, height, width)`` in a ``size``-px square.

    Same distribution as torchvision's RandomResizedCrop (10 tries, then the centre crop).
    """
    boxes = np.empty((n, 4), dtype=np.int64)
    area = size * size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(n):
        for _ in range(10):
            target = area * rng.uniform(scale[0], scale[1])
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= size and 0 < h <= size:
                boxes[i] = (rng.integers(0, size - h + 1), rng.integers(0, size - w + 1), h, w)
                break
        else:
            boxes[i] = (0, 0, size, size)
    return boxes


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, out: int, flips: torch.Tensor | None = None) -> torch.Tensor:
    """Crop ``boxes`` (top, left, h, w; pixels) out of each image and resize to ``out`` (bilinear).

    One ``grid_sample`` for the whole batch, differentiable with respect to ``x``.
    """
    n, _, height, width = x.shape
    b = to_device(boxes, x.device).to(torch.float32)
    top, left, h, w = b.unbind(1)
    theta = torch.zeros(n, 2, 3, device=x.device)
    sign = 1.0 if flips is None else 1.0 - 2.0 * to_device(flips, x.device).to(torch.float32)
    theta[:, 0, 0] = sign * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, x.shape[1], out, out], align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def jitter(x: torch.Tensor, limit: int, rng: np.random.Generator) -> torch.Tensor:
    """Circular shift of the whole batch by up to ``limit`` pixels in each direction."""
    if limit <= 0:
        return x
    dy, dx = (int(v) for v in rng.integers(-limit, limit + 1, size=2))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def recovery_view(x: torch.Tensor, out: int, scale, jitter_limit: int, rng: np.random.Generator) -> torch.Tensor:
    """The augmentation of one recovery step: random-resized crop to ``out``, flip, jitter."""
    n, size = x.shape[0], x.shape[-1]
    boxes = torch.from_numpy(crop_boxes(n, size, scale, rng))
    flips = torch.from_numpy(rng.random(n) < 0.5)
    return jitter(resized_crop(x, boxes, out, flips), jitter_limit, rng)


# ----------------------------------------------------------------------------- relabel views


@dataclass
class Views:
    """One epoch of views: record ``i`` renders image ``index[i]`` with CutMix from ``partner[i]``."""

    index: np.ndarray  # (N,) source image of each view
    box: np.ndarray  # (N, 4) crop (top, left, h, w) in source pixels
    flip: np.ndarray  # (N,) bool
    partner: np.ndarray  # (N,) record whose view is pasted into this one (itself: no CutMix)
    mix: np.ndarray  # (N, 4) CutMix box (top, left, h, w) in output pixels; h = w = 0: none

    def __len__(self) -> int:
        return len(self.index)

    def mix_fraction(self, positions: np.ndarray, out: int) -> np.ndarray:
        """Share of each view's pixels that come from its partner (for hard-label training)."""
        return (self.mix[positions, 2] * self.mix[positions, 3]) / float(out * out)


def sample_views(num_images: int, size: int, out: int, seed: int, epoch: int, batch_size: int, scale, cutmix: bool) -> Views:
    """Epoch ``epoch``'s views of ``num_images`` images, a pure function of its arguments."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    index = rng.permutation(num_images)
    box = crop_boxes(num_images, size, scale, rng)
    flip = rng.random(num_images) < 0.5
    partner = np.arange(num_images)
    mix = np.zeros((num_images, 4), dtype=np.int64)
    if cutmix:
        for start in range(0, num_images, batch_size):
            stop = min(start + batch_size, num_images)
            partner[start:stop] = start + rng.permutation(stop - start)
            lam = rng.beta(1.0, 1.0)
            cut = int(out * math.sqrt(1.0 - lam))
            cy, cx = rng.integers(0, out), rng.integers(0, out)
            top, bottom = np.clip([cy - cut // 2, cy + cut // 2], 0, out)
            left, right = np.clip([cx - cut // 2, cx + cut // 2], 0, out)
            mix[start:stop] = (top, left, bottom - top, right - left)
    return Views(index, box, flip, partner, mix)


def render_views(images: torch.Tensor, views: Views, positions: np.ndarray, out: int) -> torch.Tensor:
    """Pixels in [0, 1] of the views at ``positions`` (images: N x 3 x H x W, uint8 or floats in [0, 1])."""
    positions = np.asarray(positions)

    def crop(pos: np.ndarray) -> torch.Tensor:
        src = images[to_device(views.index[pos], images.device)]
        if not src.is_floating_point():  # the set stays uint8 on the device; only a batch becomes float
            src = src.float().div_(255)
        return resized_crop(src, torch.from_numpy(views.box[pos]), out, torch.from_numpy(views.flip[pos]))

    base = crop(positions)
    mix = views.mix[positions]
    if not mix[:, 2:].any():
        return base
    pasted = crop(views.partner[positions])
    rows = torch.arange(out, device=images.device)
    m = to_device(mix, images.device)
    inside_y = (rows[None, :] >= m[:, 0:1]) & (rows[None, :] < m[:, 0:1] + m[:, 2:3])
    inside_x = (rows[None, :] >= m[:, 1:2]) & (rows[None, :] < m[:, 1:2] + m[:, 3:4])
    mask = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]
    return torch.where(mask, pasted, base)
