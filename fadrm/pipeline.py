"""The whole pipeline in-process: prepare -> squeeze -> select -> recover -> relabel -> evaluate.

Stages whose output is current (same params, same inputs: see ``fadrm.stage.is_current``)
are skipped unless ``force`` — rerunning after a change redoes only what it affects, like
``dvc repro``. The table printed at the end comes from ``<out>/metrics.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fadrm.config import Config
from fadrm.shards import Shard
from fadrm.stage import STAGE_ORDER, Layout, is_current, summarize
from fadrm.stages.evaluate import evaluate
from fadrm.stages.prepare import prepare
from fadrm.stages.recover import recover, recover_shard
from fadrm.stages.relabel import relabel
from fadrm.stages.select import select, select_shard
from fadrm.stages.squeeze import squeeze
from fadrm.tracker import NULL_TRACKER, Tracker

STAGES: dict[str, Callable[[Config, Tracker], dict]] = {
    "prepare": prepare,
    "squeeze": squeeze,
    "select": select,
    "recover": recover,
    "relabel": relabel,
    "evaluate": evaluate,
}
assert tuple(STAGES) == STAGE_ORDER
# Stages whose work splits into shards (fadrm.shards): one shard's units, nothing published.
SHARDED: dict[str, Callable[[Config, Shard], dict]] = {"select": select_shard, "recover": recover_shard}


def run_pipeline(
    cfg: Config,
    tracker: Tracker = NULL_TRACKER,
    *,
    force: bool = False,
    until: str | None = None,
    announce: Callable[[str, str], None] = lambda stage, status: None,
) -> dict[str, Any]:
    """Run every stage (up to ``until``) in order; return the summary (``<out>/metrics.json``)."""
    layout = Layout.of(cfg)
    names = STAGE_ORDER if until is None else STAGE_ORDER[: STAGE_ORDER.index(until) + 1]
    for name in names:
        if not force and is_current(name, cfg, layout):
            announce(name, "up to date")
            continue
        announce(name, "running")
        with tracker.stage(name) as stage_tracker:
            STAGES[name](cfg, stage_tracker)
        announce(name, "done")
    return summarize(layout)


def summary_table(summary: dict[str, Any]) -> str:
    """Plain-text table of a run summary (accuracy, then time and memory per stage)."""

    def pct(value):
        return "-" if value is None else f"{100 * value:.2f}%"

    lines = [
        f"teacher top-1        {pct(summary.get('teacher_top1'))}",
        f"student top-1/top-5  {pct(summary.get('student_top1'))} / {pct(summary.get('student_top5'))}"
        f"   (best top-1 {pct(summary.get('student_best_top1'))})",
    ]
    if summary.get("recover_s_per_image") is not None:
        lines.append(f"recover              {summary['recover_s_per_image']:.3f} s per synthetic image")
    lines += ["", f"{'stage':<10}{'seconds':>10}{'peak MB':>10}{'GFLOP/s':>10}"]
    for name, stage in summary.get("stages", {}).items():
        rate = stage.get("flops_per_s")
        lines.append(
            f"{name:<10}{stage.get('seconds', 0):>10.1f}{stage.get('peak_mem_mb', 0):>10.0f}"
            f"{(rate / 1e9 if rate else 0):>10.1f}"
        )
    lines.append(f"{'total':<10}{summary.get('total_seconds', 0):>10.1f}")
    return "\n".join(lines)
