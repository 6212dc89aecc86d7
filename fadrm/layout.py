"""Where a pipeline's outputs live under ``out_dir``, and which stage reads which.

Layout under ``out_dir`` (each stage folder is one DVC output)::

    prepare/ squeeze/ select/ recover/ relabel/ evaluate/    stage outputs
    metrics/<stage>.json                                      per-stage figures (dvc metrics)
    plots/<name>.json                                         curves (dvc plots)
    metrics.json                                              the run summary, every figure
    headline.json                                             what `dvc metrics show` shows (fadrm.stage.HEADLINE)
    efficiency.png                                            seconds per stage
    .<stage>.partial/                                         finished pieces of an interrupted stage
    .fadrm/lock, .fadrm/hashes.sqlite                         the writer's lock, the content-hash cache
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fadrm.config import Config

STAGE_ORDER = ("prepare", "squeeze", "select", "recover", "relabel", "evaluate")

# Which earlier stages' outputs each stage reads.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "prepare": (),
    "squeeze": ("prepare",),
    "select": ("prepare", "squeeze"),
    "recover": ("prepare", "squeeze", "select"),
    "relabel": ("prepare", "squeeze", "recover"),
    "evaluate": ("prepare", "squeeze", "recover", "relabel"),
}


@dataclass(frozen=True)
class Layout:
    """Paths of a pipeline's outputs under one root folder."""

    root: Path

    @classmethod
    def of(cls, cfg: Config) -> Layout:
        return cls(Path(cfg.out_dir))

    def stage(self, name: str) -> Path:
        return self.root / name

    def metrics(self, name: str) -> Path:
        return self.root / "metrics" / f"{name}.json"

    def plot(self, name: str) -> Path:
        return self.root / "plots" / f"{name}.json"

    @property
    def summary(self) -> Path:
        return self.root / "metrics.json"

    @property
    def headline(self) -> Path:
        return self.root / "headline.json"

    def partial(self, name: str) -> Path:
        """Where a long stage keeps finished pieces of work so that a rerun resumes."""
        return self.root / f".{name}.partial"

    @property
    def state(self) -> Path:
        """Bookkeeping that is not an output: the lock and the hash cache."""
        return self.root / ".fadrm"

    @property
    def lock(self) -> Path:
        return self.state / "lock"

    @property
    def hash_cache(self) -> Path:
        return self.state / "hashes.sqlite"
