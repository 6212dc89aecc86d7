"""The prepared dataset that every later stage reads (output of ``fadrm prepare``).

Small images (<= 64 px) live in a uint8 cache (``<split>_images.npy``, NHWC) decoded once;
augmentation then runs on whole batches of tensors, which is what makes teacher training
on 2 CPU cores feasible. Large images stay files and go through a DataLoader.
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from fadrm.data.archives import builtin_archive, restore_extracted
from fadrm.data.images import to_rgb
from fadrm.device import to_device
from fadrm.errors import DataError
from fadrm.io import read_json

MANIFEST = "manifest.json"
FILES = "files.tsv"
DECODERS = 8  # threads decoding the files of a batch that is not cached (e.g. select at 224 px)


def fit_image(img: Image.Image, resolution: int) -> Image.Image:
    """8-bit RGB by the rules of :mod:`fadrm.data.images`, the shorter side resized to
    ``resolution`` and a centred square cropped (no-op when it fits)."""
    img, _ = to_rgb(img)
    if img.size == (resolution, resolution):
        return img
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


@dataclass
class Split:
    """One split: labels, source files (lineage) and, when cached, the uint8 images."""

    name: str
    labels: np.ndarray
    sources: list[str]
    images: np.ndarray | None  # NHWC uint8 when cached
    root: Path | None  # where ``sources`` live when not cached

    def __len__(self) -> int:
        return len(self.labels)

    def class_indices(self, label: int) -> np.ndarray:
        return np.flatnonzero(self.labels == label)

    def load(self, indices: np.ndarray | list[int], resolution: int) -> torch.Tensor:
        """uint8 NCHW tensor of the given samples at ``resolution``."""
        if self.images is not None:
            batch = torch.from_numpy(np.ascontiguousarray(self.images[np.asarray(indices)]))
        else:  # decoding releases the GIL: a few threads decode a batch in parallel, in order
            paths = [self.root / self.sources[i] for i in indices]
            batch = torch.from_numpy(np.stack(list(_decoders().map(functools.partial(_decode, resolution=resolution), paths))))
        return batch.permute(0, 3, 1, 2).contiguous()


@functools.cache
def _decoders() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, min(DECODERS, os.cpu_count() or 1)), thread_name_prefix="fadrm-decode")


def _decode(path: Path, resolution: int) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(fit_image(img, resolution))


class Prepared:
    """A prepared dataset folder: manifest, classes, normalisation and its splits."""

    def __init__(self, folder: Path):
        self.dir = Path(folder)
        if not (self.dir / MANIFEST).is_file():
            raise DataError(f"{self.dir} is not a prepared dataset (no {MANIFEST}); run `fadrm prepare`")
        self.manifest = read_json(self.dir / MANIFEST)
        self.classes: list[str] = self.manifest["classes"]
        self.num_classes = len(self.classes)
        self.resolution: int = self.manifest["resolution"]
        self.cached: bool = self.manifest["cached"]
        self.mean = torch.tensor(self.manifest["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(self.manifest["std"]).view(1, 3, 1, 1)
        self.digest: str = self.manifest["dataset_hash"]
        self._splits: dict[str, Split] = {}

    def split(self, name: str) -> Split:
        if name not in self._splits:
            sources: dict[str, list[str]] = {"train": [], "test": []}
            with open(self.dir / FILES, newline="") as fh:
                for row in csv.DictReader(fh, delimiter="\t"):
                    sources[row["split"]].append(row["path"])
            labels = np.load(self.dir / f"{name}_labels.npy")
            # memory-mapped: a batch reads its own rows, the split never sits in memory whole
            images = np.load(self.dir / f"{name}_images.npy", mmap_mode="r") if self.cached else None
            root = None if self.cached else Path(self.manifest["root"])
            if root is not None and not root.is_absolute():
                root = self.dir / root
            kept = self.manifest.get("extracted_from")
            if root is not None and kept and not root.is_dir():  # e.g. `dvc pull` on another machine
                archive = builtin_archive() if kept["archive"] == "builtin" else Path(kept["archive"])
                restore_extracted(archive, kept["sha256"], self.dir / kept["into"])
            self._splits[name] = Split(name, labels, sources[name], images, root)
        return self._splits[name]

    # -- normalisation: images in [0, 1] <-> the teachers' input space

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x.device) + self.mean.to(x.device)

    def to_input(self, uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.normalize(to_device(uint8, device).float().div_(255))

    # -- iteration

    def train_batches(
        self, batch_size: int, generator: torch.Generator, device: torch.device, padding: int, workers: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of augmented, normalised training batches (crop + flip)."""
        split = self.split("train")
        if self.cached:
            yield from _tensor_epoch(self, split, batch_size, generator, device, padding)
            return
        transform = v2.Compose([v2.RandomResizedCrop(self.resolution, antialias=True), v2.RandomHorizontalFlip()])
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        loader = _file_loader(split, self.resolution, transform, batch_size, workers, shuffle_seed=seed)
        for images, labels in loader:
            yield self.to_input(images, device), to_device(labels, device)

    def test_batches(self, batch_size: int, device: torch.device, workers: int = 0):
        """The test split in order, normalised (32-64 px as is; larger: resize 256/224, centre crop)."""
        split = self.split("test")
        if self.cached:
            for start in range(0, len(split), batch_size):
                idx = np.arange(start, min(start + batch_size, len(split)))
                yield self.to_input(split.load(idx, self.resolution), device), to_device(split.labels[idx], device)
            return
        resize = round(self.resolution * 256 / 224)
        transform = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(self.resolution)])
        for images, labels in _file_loader(split, self.resolution, transform, batch_size, workers, None):
            yield self.to_input(images, device), to_device(labels, device)


def _tensor_epoch(data: Prepared, split: Split, batch_size: int, generator, device, padding: int):
    n = len(split)
    order = torch.randperm(n, generator=generator).numpy()
    labels_all = torch.from_numpy(split.labels)
    for start in range(0, n, batch_size):
        idx = np.sort(order[start : start + batch_size])  # sorted: faster gather from the cache
        x = data.to_input(split.load(idx, data.resolution), device)
        x = random_crop_flip(x, padding, generator)
        yield x, to_device(labels_all[idx], device)


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (zero padding) and horizontal flip of a batch, on its device."""
    n, _, h, w = x.shape
    flips = torch.rand(n, generator=generator) < 0.5
    if padding:
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        x = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
    flips = flips.to(x.device).view(n, 1, 1, 1)
    return torch.where(flips, x.flip(3), x)


class _FileDataset(Dataset):
    def __init__(self, split: Split, resolution: int, transform):
        self.split, self.resolution, self.transform = split, resolution, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        path = self.split.root / self.split.sources[i]
        try:
            with Image.open(path) as img:
                tensor = v2.functional.pil_to_tensor(to_rgb(img)[0])
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        return self.transform(tensor), int(self.split.labels[i])


def _file_loader(split: Split, resolution: int, transform, batch_size: int, workers: int, shuffle_seed):
    generator = None
    if shuffle_seed is not None:
        generator = torch.Generator().manual_seed(shuffle_seed)
    return DataLoader(
        _FileDataset(split, resolution, transform),
        batch_size=batch_size,
        shuffle=shuffle_seed is not None,
        generator=generator,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
