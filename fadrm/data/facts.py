"""One table of per-dataset facts, and the resolution-dependent defaults of the method.

Unknown dataset names are fine (a user's own ImageFolder): prepare then measures the
channel mean/std on the training split and takes the resolution from the images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetFacts:
    num_classes: int
    resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


FACTS: dict[str, DatasetFacts] = {
    "cifar10": DatasetFacts(10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetFacts(100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": DatasetFacts(200, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "imagenette": DatasetFacts(10, 224, IMAGENET_MEAN, IMAGENET_STD),
    "imagenet-1k": DatasetFacts(1000, 224, IMAGENET_MEAN, IMAGENET_STD),
}

# FADRM.md: small sets (32-64 px) use no stitching, jitter 4 and a constant resolution;
# 224-px sets stitch 2x2 patches, jitter 32 and alternate 200/224 px.
SMALL = 64


def default_factor(resolution: int) -> int:
    return 1 if resolution <= SMALL else 2


def default_jitter(resolution: int) -> int:
    return 4 if resolution <= SMALL else 32


def default_recover_crop_scale(resolution: int) -> tuple[float, float]:
    """Recovery views should look like the teacher's training views, or BN matching fights the
    augmentation: small teachers train on padded crops of the whole image (scale ~(0.5, 1)),
    large ones on random-resized crops (0.08, 1). On CIFAR-10 IPC 10 the small-crop views gave
    +3 points of student accuracy (docs/benchmarks-cpu-sweep.md)."""
    return (0.5, 1.0) if resolution <= SMALL else (0.08, 1.0)


def default_relabel_crop_scale(resolution: int) -> tuple[float, float]:
    """Views for the student: at 32-64 px a crop of 8% of the image is a few pixels blown up, a
    view neither the teacher nor the test set looks like; (0.25, 1) scored +0.8 points (student
    batch 25) and +1.3 (batch 10) on CIFAR-10 IPC 10 (docs/ablation-protocol.md)."""
    return (0.25, 1.0) if resolution <= SMALL else (0.08, 1.0)


def default_schedule(resolution: int, iterations: int = 500) -> tuple[tuple[int, int], ...]:
    if resolution <= SMALL:
        return ((resolution, iterations),) * 4
    low = round(resolution * 200 / 224)
    return ((low, iterations), (resolution, iterations)) * 2


def use_cache(mode: str, resolution: int) -> bool:
    return mode == "on" or (mode == "auto" and resolution <= SMALL)


def resolve_name(data) -> str:
    """The dataset's name: ``data.name`` when set; the built-in subset is cifar10; otherwise the
    name of the folder or archive it comes from (``/data/pets`` and ``pets.tar.gz`` are 'pets')."""
    if data.name:
        return data.name
    if data.source == "builtin":
        return "cifar10"
    name = PurePath(str(data.path or "dataset").rstrip("/\\")).name
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "dataset"
    return name or "dataset"
