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
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fadrm.config import Config
from fadrm.data.facts import FACTS, IMAGENET_MEAN, IMAGENET_STD, resolve_name, use_cache
from fadrm.data.images import RULES, conversion, to_rgb
from fadrm.data.prepared import FILES, MANIFEST, fit_image
from fadrm.data.sources import builtin_archive, find_root, safe_extract, scan, torchvision_arrays, torchvision_files
from fadrm.errors import ConfigError, DataError
from fadrm.io import sha256_bytes, write_json
from fadrm.progress import bar
from fadrm.stage import stage_run
from fadrm.tracker import NULL_TRACKER, Tracker

THREADS = 4  # decoding releases the GIL; a few threads keep 2+ cores busy


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
                root = find_root(_raw_root(cfg, Path(scratch)))
                classes, files = scan(root, data.test_split)
                files = {split: listing.subset(_limit(data, split)) for split, listing in files.items()}
                if data.resolution or data.source == "builtin":
                    resolution, resolution_from = _known_resolution(cfg, name)
                else:
                    resolution, resolution_from = _measured_resolution(root, files)
                cached = use_cache(data.cache, resolution)
                if not cached and root.is_relative_to(Path(scratch)):
                    root = Path(shutil.move(str(root), str(out / "files")))  # file-backed: keep the extracted tree
                rows, images, labels, conversions = _from_files(root, files, resolution, cached)
                stored_root = None if cached else root.relative_to(out).as_posix() if root.is_relative_to(out) else str(root.resolve())
                test_folder = "val" if (root / "val").is_dir() and data.test_split != "test" else "test"
            origin = {"root": stored_root, "test_folder": test_folder, "source_path": data.path or "builtin"}
        mean, std = _normalisation(name, len(classes), images.get("train"))
        for split in ("train", "test"):
            np.save(out / f"{split}_labels.npy", labels[split])
            if cached:
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


def _raw_root(cfg: Config, extract_to: Path) -> Path:
    """The folder holding the raw ImageFolder tree (extracting archives first)."""
    data = cfg.data
    if data.source == "imagefolder":
        path = Path(data.path)
        if not path.is_dir():
            raise DataError(f"data.path does not exist or is not a folder: {path}")
        return path
    archive = builtin_archive() if data.source == "builtin" else Path(data.path)
    extract_to.mkdir(parents=True, exist_ok=True)
    safe_extract(archive, extract_to)
    return extract_to


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


def _from_files(root: Path, files, resolution: int, cached: bool):
    rows: list[list[str]] = []
    images: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    conversions: Counter = Counter()
    for split, listing in files.items():
        progress = bar(len(listing.paths), f"prepare {split}", unit="img")
        with ThreadPoolExecutor(THREADS) as pool:
            results = []
            for result in pool.map(lambda p: _read_image(root / p, resolution, cached), listing.paths):
                results.append(result)
                conversions.update(result[2])
                progress.update()
        progress.close()
        classes_of = {rel: rel.split("/")[1] for rel in listing.paths}
        rows += [[split, classes_of[rel], rel, sha] for rel, (sha, _, _) in zip(listing.paths, results)]
        labels[split] = np.asarray(listing.labels, dtype=np.int64)
        if cached:
            images[split] = np.stack([arr for _, arr, _ in results])
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
    pixels = train.reshape(-1, 3).astype(np.float64) / 255
    return [round(float(v), 4) for v in pixels.mean(0)], [round(float(v), 4) for v in pixels.std(0)]
