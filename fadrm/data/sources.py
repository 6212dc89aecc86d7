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


# ----------------------------------------------------------------------------- ImageFolder


class FolderTree:
    """A folder tree on disk, seen through the few questions :func:`scan` asks of one."""

    def __init__(self, base: Path):
        self.base = Path(base)

    def is_dir(self, rel: str) -> bool:
        return (self.base / rel).is_dir()

    def children(self, rel: str) -> tuple[list[str], list[str]]:
        """The names of the sub-folders and of the files in ``rel``."""
        with os.scandir(self.base / rel) as entries:
            found = [(e.name, e.is_dir()) for e in entries]
        return [n for n, d in found if d], [n for n, d in found if not d]

    def files_under(self, rel: str) -> list[str]:
        """Every file below ``rel`` in ``os.walk`` order (hidden folders skipped, links not followed)."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.base / rel):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [Path(dirpath, name).relative_to(self.base).as_posix() for name in sorted(filenames)]
        return found

    def where(self, rel: str) -> str:
        return str(self.base / rel) if rel else str(self.base)


class ArchiveTree:
    """The tree a tar archive would extract to, known from its members' names alone, so that a
    subset of it can be chosen before anything is written."""

    def __init__(self, names: list[str], archive: Path):
        self.archive = archive
        self.folders: dict[str, tuple[set[str], set[str]]] = {"": (set(), set())}
        for name in names:
            *parents, leaf = name.split("/")
            rel = ""
            for part in parents:
                self.folders[rel][0].add(part)
                rel = _join(rel, part)
                self.folders.setdefault(rel, (set(), set()))
            self.folders[rel][1].add(leaf)

    def is_dir(self, rel: str) -> bool:
        return rel in self.folders

    def children(self, rel: str) -> tuple[list[str], list[str]]:
        dirs, files = self.folders[rel]
        return list(dirs), list(files)

    def files_under(self, rel: str) -> list[str]:
        """:meth:`FolderTree.files_under` for the archive's names."""
        dirs, files = self.folders[rel]
        found = [_join(rel, name) for name in sorted(files)]
        for name in sorted(d for d in dirs if not d.startswith(".")):
            found += self.files_under(_join(rel, name))
        return found

    def where(self, rel: str) -> str:
        return f"{self.archive} ({rel}/)" if rel else str(self.archive)


Tree = FolderTree | ArchiveTree


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def find_root(base: Path) -> Path:
    """The folder holding ``train/``: ``base`` itself or a folder up to two levels below."""
    return Path(base) / tree_root(FolderTree(base))


def tree_root(tree: Tree) -> str:
    """:func:`find_root` for any tree: the relative path of the folder holding ``train/``."""
    candidates = [""] + sorted(tree.children("")[0])
    candidates += [_join(p, q) for p in candidates[1:] for q in sorted(tree.children(p)[0])]
    for folder in candidates:
        if tree.is_dir(_join(folder, "train")):
            return folder
    raise DataError(f"no 'train/' folder in {tree.where('')} (expected train/<class>/<images> with val/ or test/ beside it)")


def pick_test_split(tree: Tree, root: str, choice: str) -> str:
    options = ("val", "test") if choice == "auto" else (choice,)
    for name in options:
        if tree.is_dir(_join(root, name)):
            return name
    wanted = " or ".join(f"'{o}/'" for o in options)
    raise DataError(f"no {wanted} folder beside 'train/' in {tree.where(root)}")


def _class_files(tree: Tree, folder: str) -> list[str]:
    """The images under ``folder``: hidden names and other suffixes left out."""
    return [
        rel
        for rel in tree.files_under(folder)
        if not (name := rel.rsplit("/", 1)[-1]).startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
    ]


def _class_names(tree: Tree, folder: str) -> list[str]:
    return sorted(d for d in tree.children(folder)[0] if not d.startswith("."))


def scan(root: Path, test_choice: str = "auto") -> tuple[list[str], dict[str, SplitFiles]]:
    """Validate an ImageFolder root; return the class list and the train/test file lists."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    return scan_tree(FolderTree(root), "", test_choice)


def scan_tree(tree: Tree, root: str, test_choice: str = "auto") -> tuple[list[str], dict[str, SplitFiles]]:
    """:func:`scan` for any tree, ``root`` the relative path of the folder holding ``train/``; the
    file paths it returns are relative to ``root``."""
    if not tree.is_dir(_join(root, "train")):
        raise DataError(f"no 'train/' folder in {tree.where(root)} (expected train/<class>/<images>)")
    test_name = pick_test_split(tree, root, test_choice)
    classes = _class_names(tree, _join(root, "train"))
    if not classes:
        raise DataError(f"{tree.where(_join(root, 'train'))} has no class folders")
    test_classes = _class_names(tree, _join(root, test_name))
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise DataError(
            f"class sets differ between train/ and {test_name}/ in {tree.where(root)}: "
            f"only in train: {only_train or 'none'}; only in {test_name}: {only_test or 'none'}"
        )
    skip = len(root) + 1 if root else 0
    splits: dict[str, SplitFiles] = {}
    for split, folder in (("train", "train"), ("test", test_name)):
        files = SplitFiles(split)
        for index, name in enumerate(classes):
            found = _class_files(tree, _join(root, f"{folder}/{name}"))
            if not found:
                raise DataError(f"class '{name}' has no images in {tree.where(_join(root, f'{folder}/{name}'))}")
            files.paths += [rel[skip:] for rel in found]
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
