"""Raw dataset sources: the built-in subset, ImageFolder trees, tar archives, torchvision CIFAR.

Everything but torchvision ends up as an ImageFolder root::

    root/train/<class>/<image>
    root/val/<class>/<image>     (or root/test/...)

and :func:`scan` turns such a root into validated file lists, with an error that names the
offending folder, class or file for every problem a user can cause.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fadrm.data.archives import (  # noqa: F401 - re-exported: the raw-data API in one place
    EXTRACTED,
    builtin_archive,
    check_member,
    keep_extracted,
    restore_extracted,
    safe_extract,
)
from fadrm.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


@dataclass
class SplitFiles:
    """One split of an ImageFolder tree: relative paths and class indices, in a stable order."""

    name: str
    paths: list[str] = field(default_factory=list)  # relative to the root, POSIX separators
    labels: list[int] = field(default_factory=list)

    def subset(self, per_class: int | None) -> SplitFiles:
        """The first ``per_class`` files of every class (all when None)."""
        keep = _first_per_class(np.asarray(self.labels), per_class)
        return SplitFiles(self.name, [self.paths[i] for i in keep], [self.labels[i] for i in keep])


@dataclass
class ArraySplit:
    """One split held as arrays (torchvision CIFAR): uint8 NHWC images and labels."""

    name: str
    images: np.ndarray
    labels: np.ndarray

    def subset(self, per_class: int | None) -> ArraySplit:
        keep = _first_per_class(self.labels, per_class)
        return ArraySplit(self.name, self.images[keep], self.labels[keep])


def _first_per_class(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    if per_class is None:
        return np.arange(len(labels))
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))


def find_root(base: Path) -> Path:
    """The folder holding ``train/``: ``base`` itself or a folder up to two levels below."""
    candidates = [base] + sorted(p for p in base.iterdir() if p.is_dir())
    candidates += [q for p in candidates[1:] for q in sorted(p.iterdir()) if q.is_dir()]
    for folder in candidates:
        if (folder / "train").is_dir():
            return folder
    raise DataError(f"no 'train/' folder in {base} (expected train/<class>/<images> with val/ or test/ beside it)")


# ----------------------------------------------------------------------------- ImageFolder


def pick_test_split(root: Path, choice: str) -> str:
    options = ("val", "test") if choice == "auto" else (choice,)
    for name in options:
        if (root / name).is_dir():
            return name
    wanted = " or ".join(f"'{o}/'" for o in options)
    raise DataError(f"no {wanted} folder beside 'train/' in {root}")


def _class_files(folder: Path) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                files.append(os.path.join(dirpath, name))
    return files


def _class_names(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan(root: Path, test_choice: str = "auto") -> tuple[list[str], dict[str, SplitFiles]]:
    """Validate an ImageFolder root; return the class list and the train/test file lists."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    if not (root / "train").is_dir():
        raise DataError(f"no 'train/' folder in {root} (expected train/<class>/<images>)")
    test_name = pick_test_split(root, test_choice)
    classes = _class_names(root / "train")
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders")
    test_classes = _class_names(root / test_name)
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise DataError(
            f"class sets differ between train/ and {test_name}/ in {root}: "
            f"only in train: {only_train or 'none'}; only in {test_name}: {only_test or 'none'}"
        )
    splits: dict[str, SplitFiles] = {}
    for split, folder in (("train", "train"), ("test", test_name)):
        files = SplitFiles(split)
        for index, name in enumerate(classes):
            found = _class_files(root / folder / name)
            if not found:
                raise DataError(f"class '{name}' has no images in {root / folder / name}")
            files.paths += [Path(p).relative_to(root).as_posix() for p in found]
            files.labels += [index] * len(found)
        splits[split] = files
    return classes, splits


# ----------------------------------------------------------------------------- torchvision


TORCHVISION_SETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def torchvision_files(name: str, root: Path) -> dict[str, Path]:
    """The files of a local torchvision copy (what prepare reads), by path relative to ``root``."""
    folder = Path(root) / TORCHVISION_FOLDERS.get(name, name)
    if not folder.is_dir():
        raise DataError(f"{name} not found under {root}")
    return {p.relative_to(root).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def torchvision_arrays(name: str, root: Path, download: bool) -> tuple[list[str], dict[str, ArraySplit]]:
    """CIFAR-10/100 through torchvision: a local copy under ``root``, or a download if allowed."""
    import torchvision.datasets as tvd

    if name not in TORCHVISION_SETS:
        raise DataError(f"torchvision source supports {sorted(TORCHVISION_SETS)}, not '{name}'")
    cls = getattr(tvd, TORCHVISION_SETS[name])
    splits = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(root=str(root), train=train, download=download)
        except RuntimeError as exc:
            hint = "" if download else " (set data.download: true to fetch it, network permitting)"
            raise DataError(f"{name} not found under {root}: {exc}{hint}") from None
        except OSError as exc:
            raise DataError(f"could not download {name} into {root}: {exc}") from None
        splits[split] = ArraySplit(split, np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets))
    return list(ds.classes), splits
