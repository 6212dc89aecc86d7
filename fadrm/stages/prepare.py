"""Stage 1 — prepare: validate a raw dataset and write its versioned, hashed form.

Output (``<out>/prepare``): ``manifest.json`` (classes, counts, normalisation, one dataset
hash), ``files.tsv`` (split, class, path, sha256 of every source file), labels, and for
small images the decoded uint8 cache. Later stages and the tracker take lineage from here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fadrm.config import Config
from fadrm.data.facts import FACTS, IMAGENET_MEAN, IMAGENET_STD, use_cache
from fadrm.data.prepared import FILES, MANIFEST, fit_image
from fadrm.data.sources import builtin_archive, find_root, safe_extract, scan, torchvision_arrays
from fadrm.errors import ConfigError, DataError
from fadrm.io import sha256_bytes, write_json
from fadrm.progress import bar
from fadrm.stage import stage_run
from fadrm.tracker import NULL_TRACKER, Tracker

THREADS = 4  # decoding releases the GIL; a few threads keep 2+ cores busy


def prepare(cfg: Config, tracker: Tracker = NULL_TRACKER) -> dict:
    """Validate ``cfg.data`` and write the prepared dataset. Returns the stage metrics."""
    data = cfg.data
    facts = FACTS.get(data.name)
    resolution = data.resolution or (facts.resolution if facts else None)
    if resolution is None:
        raise ConfigError(f"data.resolution is required for dataset '{data.name}' (not in the facts table)")
    cached = use_cache(data.cache, resolution)
    if data.source == "torchvision" and not cached:
        raise ConfigError("the torchvision source holds 32 px arrays; use data.cache: auto or on")
    with stage_run("prepare", cfg, tracker) as run:
        out = run.dir
        if data.source == "torchvision":
            root = Path(data.path or "data/torchvision")
            classes, arrays = torchvision_arrays(data.name, root, data.download)
            arrays = {split: arr.subset(_limit(data, split)) for split, arr in arrays.items()}
            rows, images, labels = _from_arrays(arrays, resolution)
            origin = {"root": None, "test_folder": "test", "source_path": str(root)}
        else:
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=".prepare-scratch-") as scratch:
                base = _raw_root(cfg, Path(scratch) if cached else out / "files")
                root = find_root(base)
                classes, files = scan(root, data.test_split)
                files = {split: listing.subset(_limit(data, split)) for split, listing in files.items()}
                rows, images, labels = _from_files(root, files, resolution, cached)
                stored_root = None if cached else root.relative_to(out).as_posix() if root.is_relative_to(out) else str(root.resolve())
                test_folder = "val" if (root / "val").is_dir() and data.test_split != "test" else "test"
            origin = {"root": stored_root, "test_folder": test_folder, "source_path": data.path or "builtin"}
        mean, std = _normalisation(data.name, len(classes), images.get("train"))
        for split in ("train", "test"):
            np.save(out / f"{split}_labels.npy", labels[split])
            if cached:
                np.save(out / f"{split}_images.npy", images[split])
        with open(out / FILES, "w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
            writer.writerow(["split", "class", "path", "sha256"])
            writer.writerows(rows)
        digest = hashlib.sha256("".join("\t".join(r) + "\n" for r in rows).encode()).hexdigest()
        counts = {
            split: {name: int((labels[split] == i).sum()) for i, name in enumerate(classes)} for split in ("train", "test")
        }
        manifest = {
            "name": data.name,
            "source": data.source,
            **origin,
            "resolution": resolution,
            "cached": cached,
            "classes": classes,
            "mean": mean,
            "std": std,
            "counts": counts,
            "dataset_hash": digest,
        }
        write_json(out / MANIFEST, manifest)
        run.metrics.update(
            classes=len(classes),
            train_images=len(labels["train"]),
            test_images=len(labels["test"]),
            resolution=resolution,
            dataset_hash=digest,
        )
        run.artifacts += [MANIFEST]
        profile = {"classes": len(classes), "train": len(labels["train"]), "test": len(labels["test"])}
        tracker.log_dataset(data.name, digest, origin["source_path"], "prepare", profile)
    return run.metrics


def _limit(data, split: str) -> int | None:
    return data.train_per_class if split == "train" else data.test_per_class


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


def _read_image(path: Path, resolution: int, decode: bool) -> tuple[str, np.ndarray | None]:
    blob = path.read_bytes()
    try:
        with Image.open(io.BytesIO(blob)) as img:
            if decode:
                return sha256_bytes(blob), np.asarray(fit_image(img, resolution), dtype=np.uint8)
            img.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"unreadable image {path}: {exc}") from None
    return sha256_bytes(blob), None


def _from_files(root: Path, files, resolution: int, cached: bool):
    rows: list[list[str]] = []
    images: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for split, listing in files.items():
        progress = bar(len(listing.paths), f"prepare {split}", unit="img")
        with ThreadPoolExecutor(THREADS) as pool:
            results = []
            for result in pool.map(lambda p: _read_image(root / p, resolution, cached), listing.paths):
                results.append(result)
                progress.update()
        progress.close()
        classes_of = {rel: rel.split("/")[1] for rel in listing.paths}
        rows += [[split, classes_of[rel], rel, sha] for rel, (sha, _) in zip(listing.paths, results)]
        labels[split] = np.asarray(listing.labels, dtype=np.int64)
        if cached:
            images[split] = np.stack([arr for _, arr in results])
    return rows, images, labels


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
