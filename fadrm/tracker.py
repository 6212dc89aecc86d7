"""The tracker interface the core reports through, and its no-op default.

Stages never ask "is tracking on?": they call a :class:`Tracker`, which is either
:data:`NULL_TRACKER` (does nothing) or the MLflow implementation in ``fadrm.tracking`` —
the only module of the package that imports MLflow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def stage(self, name: str) -> contextlib.AbstractContextManager[Tracker]:
        """A scope (an MLflow child run) for one stage."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, folder: str | None = None) -> None: ...

    def log_dataset(self, name: str, digest: str, source: str, context: str, profile: Mapping[str, Any]) -> None:
        """Record a dataset the stage read (lineage), identified by its content hash."""

    def set_tags(self, tags: Mapping[str, str]) -> None: ...


class NullTracker:
    """Accepts every call and records nothing."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[NullTracker]:
        yield self

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        pass

    def log_dataset(self, name: str, digest: str, source: str, context: str, profile: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass


NULL_TRACKER = NullTracker()


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
