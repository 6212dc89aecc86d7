"""The distillation methods this code yields, as data: one table, no branches on names.

All five run through the same select -> recover -> relabel -> evaluate stages, so their
numbers are comparable on equal terms; they differ only in the fields below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MethodSpec:
    init: Literal["patches", "random", "noise"]  # what select produces
    recover: bool  # optimise the images at all
    merges: bool  # residual merges with the initialisation between schedule stages
    all_teachers: bool  # round-robin over every teacher (FADRM+) or use the first only
    single_resolution: bool  # collapse the schedule to its total at the final resolution
    fp32: bool  # force full precision (the SRe2L efficiency baseline)
    summary: str


METHODS: dict[str, MethodSpec] = {
    "fadrm": MethodSpec("patches", True, True, False, False, False, "patch init + data residual matching"),
    "fadrm+": MethodSpec("patches", True, True, True, False, False, "FADRM with all teachers in round-robin"),
    "sre2l": MethodSpec("noise", True, False, False, True, True, "noise init, no merges, one resolution, fp32"),
    "rded": MethodSpec("patches", False, False, False, False, False, "selected real patches, no recovery"),
    "random": MethodSpec("random", False, False, False, False, False, "random real images"),
}
