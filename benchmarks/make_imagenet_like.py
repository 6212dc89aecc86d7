"""A generated dataset with ImageNet-1K's shape: N classes of 224-px JPEGs in ImageFolder layout.

    python benchmarks/make_imagenet_like.py data/imagenet-like --classes 1000 --train 4 --val 1

The pixels are smooth random colour fields (a few low-frequency waves per image), so JPEG
files have realistic sizes and decoding costs; the labels mean nothing. It exists to measure
what the pipeline costs at ImageNet's shape (classes, resolution, files) without the data:
peak memory, disk, seconds per synthetic image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def image(rng: np.random.Generator, size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size] / size
    channels = []
    for _ in range(3):
        field = sum(
            rng.uniform(0.2, 1) * np.sin(2 * np.pi * (rng.uniform(0, 4) * xx + rng.uniform(0, 4) * yy) + rng.uniform(0, 2 * np.pi))
            for _ in range(4)
        )
        channels.append(field)
    array = np.stack(channels, -1)
    array = (array - array.min()) / (np.ptp(array) + 1e-9) * 255
    noise = rng.normal(0, 12, array.shape)
    return Image.fromarray(np.clip(array + noise, 0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--train", type=int, default=4, help="training images per class")
    parser.add_argument("--val", type=int, default=1, help="validation images per class")
    parser.add_argument("--size", type=int, default=256, help="side of the stored images (224-px crops are taken)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for split, count in (("train", args.train), ("val", args.val)):
        for c in range(args.classes):
            folder = args.dest / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image(rng, args.size).save(folder / f"{split}_{c:04d}_{i}.JPEG", quality=90)
    print(f"wrote {args.classes} classes x ({args.train} train + {args.val} val) images to {args.dest}")


if __name__ == "__main__":
    main()
