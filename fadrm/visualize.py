"""Pictures people would rather look at than read: per-class grids of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

LABEL_WIDTH = 110


def class_grid(
    rows: list[tuple[str, list[list[np.ndarray]]]], path: Path, titles: list[str], max_images: int = 10, cell: int = 64
) -> Path:
    """Save a grid: one row per class, one block of images per column group (e.g. init | synthetic).

    ``rows``: (class name, [group_0_images, group_1_images, ...]) with HxWx3 uint8 images.
    """
    groups = len(titles)
    per_group = min(max_images, max((len(g) for _, gs in rows for g in gs), default=1))
    gap = cell // 4
    width = LABEL_WIDTH + groups * per_group * cell + (groups - 1) * gap
    height = 20 + len(rows) * cell
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for g, title in enumerate(titles):
        draw.text((LABEL_WIDTH + g * (per_group * cell + gap) + 4, 4), title, fill="black")
    for r, (name, image_groups) in enumerate(rows):
        y = 20 + r * cell
        draw.text((4, y + cell // 2 - 6), name[:16], fill="black")
        for g, images in enumerate(image_groups):
            x0 = LABEL_WIDTH + g * (per_group * cell + gap)
            for k, image in enumerate(images[:per_group]):
                tile = Image.fromarray(np.ascontiguousarray(image)).resize((cell, cell), Image.NEAREST)
                canvas.paste(tile, (x0 + k * cell, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def line_plot(rows: list[dict], x: str, ys: list[str], path: Path, title: str, group: str | None = None) -> Path:
    """A PNG line chart of ``ys`` against ``x`` (one line per ``group`` value if given)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    groups = sorted({r.get(group) for r in rows}) if group else [None]
    for g in groups:
        subset = [r for r in rows if group is None or r.get(group) == g]
        for y in ys:
            points = [(r[x], r[y]) for r in subset if r.get(y) is not None]
            if points:
                label = y if g is None else f"{y} ({g})"
                ax.plot(*zip(*points), label=label, marker="o" if len(points) < 30 else None, markersize=3)
    ax.set_xlabel(x)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
