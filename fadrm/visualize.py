"""Pictures people would rather look at than read: per-class grids of images, and charts
with labelled axes and units (accuracy in percent, log scales where terms differ by orders
of magnitude) that DVC shows (``dvc plots show``, offline) and MLflow keeps as artifacts."""

from __future__ import annotations

from dataclasses import dataclass
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


# How a column of a curve is named in a legend.
SERIES_NAMES = {
    "top1": "top-1",
    "top5": "top-5",
    "test_top1": "test top-1",
    "train_loss": "training loss",
    "loss": "total",
    "ce": "cross-entropy",
    "bn": "BN statistics (weighted)",
    "seconds": "seconds",
}


@dataclass(frozen=True)
class Axis:
    """The y axis of a chart: which columns, what they measure (with the unit), how to scale.

    ``percent``: the columns are fractions, drawn as percent. ``log``: a log scale, for terms
    that differ by orders of magnitude (a loss and its weighted parts; seconds per stage).
    """

    columns: tuple[str, ...]
    label: str
    percent: bool = False
    log: bool = False


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _style(ax, axis: Axis) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.set_ylabel(axis.label)
    if axis.log:
        ax.set_yscale("log")
    if axis.percent:
        ax.yaxis.set_major_formatter(PercentFormatter(100))


def line_plot(
    rows: list[dict], x: str, axis: Axis, path: Path, title: str, *, xlabel: str, right: Axis | None = None, group: str | None = None
) -> Path:
    """Save :func:`line_figure` as a PNG at ``path``."""
    return _save(line_figure(rows, x, axis, title, xlabel=xlabel, right=right, group=group), path)


def line_figure(rows: list[dict], x: str, axis: Axis, title: str, *, xlabel: str, right: Axis | None = None, group: str | None = None):
    """A line chart of ``axis.columns`` against ``x`` (one line per ``group`` value if given);
    ``right``: more columns on a second y axis with their own unit (e.g. accuracy beside a loss)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    axes = [(ax, axis)]
    if right is not None and any(r.get(c) is not None for r in rows for c in right.columns):
        axes.append((ax.twinx(), right))
    groups = sorted({r.get(group) for r in rows}) if group else [None]
    handles = []
    for target, spec in axes:
        for g in groups:
            subset = [r for r in rows if group is None or r.get(group) == g]
            for column in spec.columns:
                points = [(r[x], 100 * r[column] if spec.percent else r[column]) for r in subset if r.get(column) is not None]
                if points:
                    name = SERIES_NAMES.get(column, column) + ("" if g is None else f" ({g})")
                    style = "--" if target is not ax else "-"
                    handles += target.plot(*zip(*points), style, label=name, marker="o" if len(points) < 30 else None, markersize=3)
        _style(target, spec)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and iterations are whole numbers
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=8)
    return fig


def bar_plot(rows: list[dict], label: str, value: str, path: Path, title: str, *, xlabel: str, log: bool = False) -> Path:
    """A PNG of horizontal bars, one per row (e.g. seconds per stage), in row order top to bottom."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(rows) + 1.2), dpi=100)
    names = [str(r[label]) for r in rows][::-1]
    values = [r.get(value) or 0 for r in rows][::-1]
    ax.barh(names, values, color="#4c72b0")
    if log and any(v > 0 for v in values):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.5, 1, 2, 5, not 10^-1
        ax.xaxis.set_minor_formatter(NullFormatter())
    for y, v in enumerate(values):
        ax.annotate(f" {v:.3g}", (v, y), va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
