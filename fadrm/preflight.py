"""Checks that cost nothing, run before anything that costs a lot.

Each stage module may define ``preflight(cfg, facts)``, raising a :class:`FadrmError` for a
configuration that cannot work with this dataset (a recovery schedule that does not end at
the dataset's resolution, more images per class than a class has, a missing weights file).
The pipeline runs every stage's check before the first stage, with what the configuration
alone says about the data, and again as soon as the prepared dataset exists (prepare is
cheap; the teacher is not), so such a mistake never surfaces after the teacher has trained.
Each stage also runs its own check when it starts alone.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from fadrm.config import Config
from fadrm.data.facts import FACTS, resolve_name
from fadrm.device import resolve_device, resolve_precision
from fadrm.errors import ConfigError
from fadrm.io import read_json
from fadrm.layout import Layout


@dataclass(frozen=True)
class DataFacts:
    """What is known about the dataset: None where it is not known yet."""

    resolution: int | None = None
    classes: tuple[str, ...] | None = None
    train_counts: dict[str, int] | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> DataFacts:
        data = cfg.data
        known = FACTS.get(resolve_name(data)) if data.source in ("builtin", "torchvision") else None
        return cls(resolution=data.resolution or (known.resolution if known else None))

    @classmethod
    def from_prepared(cls, folder: Path) -> DataFacts | None:
        path = Path(folder) / "manifest.json"
        if not path.is_file():
            return None
        manifest = read_json(path)
        return cls(manifest["resolution"], tuple(manifest["classes"]), dict(manifest["counts"]["train"]))


def check(cfg: Config, stages: tuple[str, ...], facts: DataFacts) -> None:
    """The device and precisions exist here; then the ``preflight`` of every stage in ``stages``."""
    device = resolve_device(cfg.device)
    for section in ("squeeze", "recover", "relabel", "evaluate"):
        precision = getattr(cfg, section).precision
        try:
            resolve_precision(precision, device)
        except ConfigError as exc:
            raise ConfigError(f"{section}.precision: {exc}") from None
    for name in stages:
        module = importlib.import_module(f"fadrm.stages.{name}")
        preflight = getattr(module, "preflight", None)
        if preflight is not None:
            preflight(cfg, facts)


def best_facts(cfg: Config, layout: Layout) -> DataFacts:
    """The prepared dataset's facts when it exists, else what the configuration says."""
    return DataFacts.from_prepared(layout.stage("prepare")) or DataFacts.from_config(cfg)
