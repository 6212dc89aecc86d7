"""Stage 1 — prepare: validate a raw dataset and write its versioned, hashed form.

Output (``<out>/prepare``): ``manifest.json`` (name, classes, counts, resolution and where
each came from, normalisation, pixel-format conversions, one dataset hash), ``files.tsv``
(split, class, path, sha256 of every source file), labels, and for small images the decoded
uint8 cache. Later stages and the tracker take lineage from here.

The dataset's name and resolution come from the data unless set: the built-in subset and
torchvision's CIFAR are cifar10/cifar100 at 32 px (``fadrm.data.facts``); a folder or an
archive is named after itself, and its resolution is the images' own size when they all
share one (a mix of sizes is refused until ``data.resolution`` says what to resize them to).
Pixel formats are converted by the rules of :mod:`fadrm.data.images` and counted.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fadrm.config import Config
from fadrm.data.facts import FACTS, IMAGENET_MEAN, IMAGENET_STD, resolve_name, use_cache
from fadrm.data.images import RULES, conversion, to_rgb
from fadrm.data.prepared import FILES, MANIFEST, fit_image
from fadrm.data.sources import (
    EXTRACTED,
    ArchiveTree,
    builtin_archive,
    find_root,
    keep_extracted,
    safe_extract,
    scan,
    scan_tree,
    torchvision_arrays,
    torchvision_files,
    tree_root,
)
from fadrm.errors import ConfigError, DataError
from fadrm.io import sha256_bytes, sha256_file, write_json
from fadrm.progress import bar
from fadrm.stage import stage_run
from fadrm.tracker import NULL_TRACKER, Tracker

THREADS = 4  # decoding releases the GIL; a few threads keep 2+ cores busy
NORM_CHUNK = 1024  # images per step of the mean/std of an unknown dataset


def preflight(cfg: Config, facts) -> None:
    """The dataset's path exists (checked before anything else runs)."""
    data = cfg.data
    if data.source == "imagefolder" and not Path(data.path).is_dir():
        raise DataError(f"data.path does not exist or is not a folder: {data.path}")
    if data.source == "tar" and not Path(data.path).is_file():
        raise DataError(f"archive not found: {data.path} (data.path, with data.source: tar)")


def input_files(cfg: Config) -> dict[str, Path]:
    """The raw files prepare reads (for lineage): the archive, or every image it keeps."""
    data = cfg.data
    if data.source == "builtin":
        return {f"builtin/{builtin_archive().name}": builtin_archive()}
    if data.source == "tar":
        return {str(data.path): Path(data.path)}
    if data.source == "torchvision":
        return torchvision_files(data.name, Path(data.path or "data/torchvision"))
    root = find_root(Path(data.path))
    _, files = scan(root, data.test_split)
    kept = [rel for split, listing in files.items() for rel in listing.subset(_limit(data, split)).paths]
    return {rel: root / rel for rel in kept}


def prepare(cfg: Config, tracker: Tracker = NULL_TRACKER) -> dict:
    """Validate ``cfg.data`` and write the prepared dataset. Returns the stage metrics."""
    data = cfg.data
    name = resolve_name(data)
    preflight(cfg, None)
    with stage_run("prepare", cfg, tracker) as run:
        out = run.dir
        if data.source == "torchvision":
            resolution, resolution_from = _known_resolution(cfg, name)
            if not use_cache(data.cache, resolution):
                raise ConfigError("the torchvision source holds 32 px arrays; use data.cache: auto or on")
            cached = True
            root = Path(data.path or "data/torchvision")
            classes, arrays = torchvision_arrays(name, root, data.download)
            arrays = {split: arr.subset(_limit(data, split)) for split, arr in arrays.items()}
            rows, images, labels = _from_arrays(arrays, resolution)
            conversions: Counter = Counter()
            origin = {"root": None, "test_folder": "test", "source_path": str(root)}
        else:
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=".prepare-scratch-") as scratch:
                tree = Path(scratch) / "tree"
                known = bool(data.resolution) or data.source == "builtin"
                resolution, resolution_from = _known_resolution(cfg, name) if known else (None, None)
                # file-backed (not cached): the whole archive is kept, once, outside the outputs
                whole = known and not use_cache(data.cache, resolution)
                root, classes, files = _raw_files(cfg, tree, whole)
                if not known:
                    resolution, resolution_from = _measured_resolution(root, files)
                cached = use_cache(data.cache, resolution)
                extracted = None
                if not cached and root.is_relative_to(tree):  # file-backed: keep the tree, once, outside the outputs
                    archive = builtin_archive() if data.source == "builtin" else Path(data.path)
                    if not whole:  # the rest of it: the kept copy serves every later subset
                        safe_extract(archive, tree, lambda names: [n for n in names if not (tree / n).is_file()])
                    sha = sha256_file(archive)
                    kept = keep_extracted(tree, sha, out.parent / EXTRACTED)
                    root = kept / root.relative_to(tree)
                    where = "builtin" if data.source == "builtin" else _project_path(archive)
                    extracted = {"archive": where, "sha256": sha, "into": os.path.relpath(kept, out)}
                if cached:
                    _check_cache_fits(out, sum(len(listing.paths) for listing in files.values()), resolution)
                rows, images, labels, conversions = _from_files(root, files, resolution, out if cached else None)
                stored_root = None if cached else os.path.relpath(root, out) if extracted else _project_path(root, out)
                test_folder = "val" if (root / "val").is_dir() and data.test_split != "test" else "test"
            origin = {
                "root": stored_root,
                "extracted_from": extracted,
                "test_folder": test_folder,
                "source_path": data.path or "builtin",
            }
        mean, std = _normalisation(name, len(classes), images.get("train"))
        for split in ("train", "test"):
            np.save(out / f"{split}_labels.npy", labels[split])
            if cached and not (out / f"{split}_images.npy").is_file():  # files: already streamed there
                np.save(out / f"{split}_images.npy", images[split])
        with open(out / FILES, "w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
            writer.writerow(["split", "class", "path", "sha256"])
            writer.writerows(rows)
        digest = hashlib.sha256("".join("\t".join(r) + "\n" for r in rows).encode()).hexdigest()
        counts = {split: {c: int((labels[split] == i).sum()) for i, c in enumerate(classes)} for split in ("train", "test")}
        manifest = {
            "name": name,
            "name_from": "data.name" if data.name else ("built-in subset" if data.source == "builtin" else "folder/archive name"),
            "source": data.source,
            **origin,
            "resolution": resolution,
            "resolution_from": resolution_from,
            "cached": cached,
            "classes": classes,
            "mean": mean,
            "std": std,
            "counts": counts,
            "conversions": {RULES[rule]: n for rule, n in sorted(conversions.items())},
            "dataset_hash": digest,
        }
        write_json(out / MANIFEST, manifest)
        run.metrics.update(
            name=name,
            classes=len(classes),
            train_images=len(labels["train"]),
            test_images=len(labels["test"]),
            resolution=resolution,
            converted_images=sum(conversions.values()),
            dataset_hash=digest,
        )
        run.artifacts += [MANIFEST]
        profile = {"classes": len(classes), "train": len(labels["train"]), "test": len(labels["test"])}
        tracker.log_dataset(name, digest, origin["source_path"], "prepare", profile)
    return run.metrics


def _limit(data, split: str) -> int | None:
    return data.train_per_class if split == "train" else data.test_per_class


def _known_resolution(cfg: Config, name: str) -> tuple[int, str]:
    if cfg.data.resolution:
        return cfg.data.resolution, "data.resolution"
    facts = FACTS.get(name)
    if facts is None:
        raise ConfigError(f"data.resolution is required for dataset '{name}' (not in the facts table)")
    return facts.resolution, f"facts table ({name})"


def _measured_resolution(root: Path, files) -> tuple[int, str]:
    """The images' own size when they all share one (the shorter side); refused otherwise."""
    paths = [p for listing in files.values() for p in listing.paths]

    def size(rel: str) -> tuple[int, int]:
        try:
            with Image.open(root / rel) as img:
                return img.size
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            raise DataError(f"unreadable image {root / rel}: {exc}") from None

    with ThreadPoolExecutor(THREADS) as pool:
        measured = list(zip(paths, pool.map(size, paths)))
    distinct = Counter(s for _, s in measured)
    if len(distinct) > 1:
        (common, n), (other, _) = distinct.most_common(2)
        example = next(rel for rel, s in measured if s == other)
        raise DataError(
            f"the images of {root} differ in size ({len(distinct)} sizes: {n} are {common[0]}x{common[1]}, "
            f"{example} is {other[0]}x{other[1]}); set data.resolution (e.g. 32, 64 or 224): every image is then "
            "resized to it on its shorter side and centre-cropped"
        )
    ((width, height),) = distinct
    return min(width, height), f"image size ({width}x{height})"


def _project_path(path: Path, start: Path | None = None) -> str:
    """``path`` relative to ``start`` (default: the project, i.e. the working directory) when it lies
    inside the project -- a clone or `dvc pull` elsewhere then finds it -- else absolute."""
    path = Path(path).resolve()
    if not path.is_relative_to(Path.cwd().resolve()):
        return str(path)
    return Path(os.path.relpath(path, Path(start).resolve() if start else Path.cwd())).as_posix()


def _raw_files(cfg: Config, extract_to: Path, whole: bool) -> tuple[Path, list[str], dict]:
    """The folder holding ``train/``, the classes and the files of each split (the first
    ``train_per_class``/``test_per_class`` of every class). An archive is listed from its members'
    names and only the files kept are extracted, into ``extract_to`` (all of them when ``whole``)."""
    data = cfg.data
    if data.source == "imagefolder":
        path = Path(data.path)
        if not path.is_dir():
            raise DataError(f"data.path does not exist or is not a folder: {path}")
        root = find_root(path)
        classes, files = scan(root, data.test_split)
        return root, classes, {split: listing.subset(_limit(data, split)) for split, listing in files.items()}
    archive = builtin_archive() if data.source == "builtin" else Path(data.path)
    found: dict = {}

    def keep(names: list[str]) -> list[str]:
        tree = ArchiveTree(names, archive)
        found["root"] = tree_root(tree)
        found["classes"], listed = scan_tree(tree, found["root"], data.test_split)
        found["files"] = {split: listing.subset(_limit(data, split)) for split, listing in listed.items()}
        if whole:
            return names
        prefix = f"{found['root']}/" if found["root"] else ""
        return [prefix + rel for listing in found["files"].values() for rel in listing.paths]

    extract_to.mkdir(parents=True, exist_ok=True)
    safe_extract(archive, extract_to, keep)
    return extract_to / found["root"], found["classes"], found["files"]


def _read_image(path: Path, resolution: int, decode: bool) -> tuple[str, np.ndarray | None, list[str]]:
    """The file's sha256, its pixels (when decoding for the cache) and the conversion rules it needs."""
    blob = path.read_bytes()
    try:
        with Image.open(io.BytesIO(blob)) as img:
            if decode:
                rgb, rules = to_rgb(img)
                return sha256_bytes(blob), np.asarray(fit_image(rgb, resolution), dtype=np.uint8), rules
            rule = conversion(img)
            img.verify()
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"unreadable image {path}: {exc}") from None
    return sha256_bytes(blob), None, [rule] if rule else []


def _check_cache_fits(out: Path, images: int, resolution: int) -> None:
    """A uint8 cache needs images x res^2 x 3 bytes on disk (ImageNet-1K at 224 px: ~193 GB)."""
    need, free = images * resolution * resolution * 3, shutil.disk_usage(out).free
    if need > free:
        raise DataError(
            f"data.cache would write {need / 1e9:.1f} GB of decoded {resolution} px images but {out} has "
            f"{free / 1e9:.1f} GB free; use data.cache: off (images are then read from their files per batch)"
        )


def _from_files(root: Path, files, resolution: int, cache_dir: Path | None):
    """Hash (and, with a ``cache_dir``, decode) every file. Decoded pixels go straight into
    ``<cache_dir>/<split>_images.npy`` as they come (a memory-mapped .npy): memory stays at a few
    images whatever the split's size; the returned arrays are read-only maps of those files."""
    rows: list[list[str]] = []
    images: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    conversions: Counter = Counter()
    for split, listing in files.items():
        n = len(listing.paths)
        target = None
        if cache_dir is not None:
            target = np.lib.format.open_memmap(
                cache_dir / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(n, resolution, resolution, 3)
            )
        progress = bar(n, f"prepare {split}", unit="img")
        hashes = []
        paths = [root / rel for rel in listing.paths]
        with ThreadPoolExecutor(THREADS) as pool:
            for i, (sha, pixels, rules) in enumerate(pool.map(_read_image, paths, repeat(resolution), repeat(target is not None))):
                hashes.append(sha)
                if target is not None:
                    target[i] = pixels
                conversions.update(rules)
                progress.update()
        progress.close()
        rows += [[split, rel.split("/")[1], rel, sha] for rel, sha in zip(listing.paths, hashes)]
        labels[split] = np.asarray(listing.labels, dtype=np.int64)
        if target is not None:
            target.flush()
            del target
            images[split] = np.load(cache_dir / f"{split}_images.npy", mmap_mode="r")
    return rows, images, labels, conversions


def _from_arrays(arrays, resolution: int):
    rows, images, labels = [], {}, {}
    for split, arr in arrays.items():
        if arr.images.shape[1:3] != (resolution, resolution):
            raise ConfigError(f"torchvision images are {arr.images.shape[1]} px; set data.resolution to match")
        images[split] = arr.images
        labels[split] = arr.labels.astype(np.int64)
        rows += [
            [split, str(int(y)), f"{split}/{i:06d}", sha256_bytes(img.tobytes())]
            for i, (img, y) in enumerate(zip(arr.images, arr.labels))
        ]
    return rows, images, labels


def _normalisation(name: str, num_classes: int, train: np.ndarray | None) -> tuple[list[float], list[float]]:
    """Known datasets use their published statistics; others are measured on the train split."""
    facts = FACTS.get(name)
    if facts is not None and facts.num_classes == num_classes:
        return list(facts.mean), list(facts.std)
    if train is None:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    total, squares, count = np.zeros(3), np.zeros(3), 0
    for start in range(0, len(train), NORM_CHUNK):  # chunks: a float copy of the split would not fit
        pixels = np.asarray(train[start : start + NORM_CHUNK]).reshape(-1, 3).astype(np.float64) / 255
        total += pixels.sum(0)
        squares += (pixels**2).sum(0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]
