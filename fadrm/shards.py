"""Splitting a stage's work into shards: which units of work (recovery batches, selection
classes, relabel batches) belong to which worker.

A unit is identified by its index and seeded by it alone, so the result never depends on
how the units were spread: 1, 2 or N shards (``fadrm recover --shard i/N``, Prefect tasks on
a Dask cluster, or ``torchrun`` ranks) give byte-identical outputs. Finished units are files
in the stage's partial folder; a unit that exists is skipped, one that was cut off is redone.
"""

from __future__ import annotations

from dataclasses import dataclass

from fadrm import distributed
from fadrm.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the units ``u`` with ``u % count == index``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index}/{self.count} does not exist: use i/N with 0 <= i < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``'1/4'`` -> Shard(1, 4)."""
        index, sep, count = text.partition("/")
        if not sep or not index.strip().isdigit() or not count.strip().isdigit():
            raise ConfigError(f"--shard '{text}' is not of the form i/N (e.g. 0/4)")
        return cls(int(index), int(count))

    @classmethod
    def of_process(cls) -> Shard:
        """This process's shard under ``torchrun`` (rank of world), or the whole work alone."""
        return cls(distributed.rank(), distributed.world_size())

    def owns(self, unit: int) -> bool:
        return unit % self.count == self.index

    def units(self, total: int) -> list[int]:
        return [u for u in range(total) if self.owns(u)]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
