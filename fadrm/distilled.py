"""A set of images per class on disk (select's init, recover's synthetic set): PNGs + manifest.

``manifest.json`` lists every image in a fixed order (class-major) with its label and its
lineage; ``images/<class index>/<k>.png`` hold the pixels, losslessly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fadrm.errors import MissingInputError
from fadrm.io import load_rgb, read_json, save_png, write_json
from fadrm.visualize import class_grid

MANIFEST = "manifest.json"
ANCHORS = "anchors.safetensors"  # select's classes x pool x 3 x H x W uint8 real patches a merge may pull towards


def image_file(label: int, k: int) -> str:
    return f"images/{label:04d}/{k:03d}.png"


def save_set(folder: Path, images: torch.Tensor, entries: list[dict[str, Any]], header: dict[str, Any]) -> None:
    """Write uint8 NCHW ``images`` with one manifest entry each (entries need 'label')."""
    counts: dict[int, int] = {}
    for image, entry in zip(images, entries):
        label = int(entry["label"])
        k = counts.get(label, 0)
        counts[label] = k + 1
        entry["file"] = image_file(label, k)
        save_png(image.permute(1, 2, 0).cpu().numpy(), folder / entry["file"])
    write_json(folder / MANIFEST, {**header, "images": entries})


def load_set(folder: Path) -> tuple[torch.Tensor, np.ndarray, dict[str, Any]]:
    """uint8 NCHW images, labels and the manifest of a saved set."""
    if not (folder / MANIFEST).is_file():
        raise MissingInputError(f"no image set in {folder} (missing {MANIFEST})")
    manifest = read_json(folder / MANIFEST)
    arrays = [load_rgb(folder / e["file"]) for e in manifest["images"]]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = np.asarray([e["label"] for e in manifest["images"]], dtype=np.int64)
    return images, labels, manifest


def to_uint8(x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 with rounding (what the PNG will hold)."""
    return (x01.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def grid_by_class(path: Path, classes: list[str], groups: list[tuple[str, torch.Tensor, np.ndarray]], max_classes: int = 20) -> Path:
    """A per-class grid with one column group per (title, uint8 images, labels)."""
    rows = []
    for label, name in enumerate(classes[:max_classes]):
        rows.append((name, [[img.permute(1, 2, 0).numpy() for img in imgs[lbls == label]] for _, imgs, lbls in groups]))
    return class_grid(rows, path, [title for title, _, _ in groups])
