"""The whole pipeline in-process: prepare -> squeeze -> select -> recover -> relabel -> evaluate.

The run holds the output folder's writer lock from start to end (a second run on the same
``out_dir`` is refused; the leftovers of a killed one are removed). Every stage's cheap checks
run before the first stage and again once the dataset is prepared, so a configuration that
cannot work fails before the teacher trains. Stages whose output is current (same params,
code and input content, output intact: :mod:`fadrm.lineage`) are skipped unless ``force`` —
rerunning after a change redoes only what it affects, like ``dvc repro``, and says why each
stage runs. The table printed at the end comes from ``<out>/metrics.json``.

This is the one pipeline function: ``fadrm run --local`` calls it, and so does the Prefect
flow, which only changes *how* a stage runs (``execute``: as a Prefect task with retries)
while which stages run stays decided here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from fadrm import preflight
from fadrm.config import Config
from fadrm.errors import storage_errors
from fadrm.io import HashCache
from fadrm.lineage import Lineage
from fadrm.lock import hold, holder_text
from fadrm.shards import Shard
from fadrm.stage import STAGE_ORDER, Layout, summarize
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


def stages_until(until: str | None) -> tuple[str, ...]:
    return STAGE_ORDER if until is None else STAGE_ORDER[: STAGE_ORDER.index(until) + 1]


# How one stage is executed: called with the stage's name and a function that runs it (its
# tracker scope included) and returns the stage metrics.
StageExecutor = Callable[[str, Callable[[], dict]], dict]


def in_process(name: str, run_stage: Callable[[], dict]) -> dict:
    """The default executor: run the stage here, now."""
    return run_stage()


def run_pipeline(
    cfg: Config,
    tracker: Tracker = NULL_TRACKER,
    *,
    force: bool = False,
    until: str | None = None,
    announce: Callable[[str, str], None] = lambda stage, status: None,
    execute: StageExecutor = in_process,
) -> dict[str, Any]:
    """Run every stage (up to ``until``) that is not current, in order, each through ``execute``;
    return the summary (``<out>/metrics.json``).

    ``announce(stage, status)`` hears ``"up to date"``, ``"running (<why>)"`` and ``"done"``
    for each stage, and ``("lock", ...)`` when this run took over from a killed one.
    """
    layout = Layout.of(cfg)
    names = stages_until(until)
    preflight.check(cfg, names, preflight.best_facts(cfg, layout))
    with storage_errors("run", layout.root), hold(layout) as held:
        if held.previous:
            announce("lock", f"took over from {holder_text(held.previous)}, which ended without releasing it")
        if held.removed:
            announce("lock", f"removed {len(held.removed)} leftover(s) of an interrupted run: {', '.join(held.removed[:4])}")
        cache = HashCache(layout.hash_cache)
        checked_with_data = False
        for name in names:
            if name != "prepare" and not checked_with_data:
                preflight.check(cfg, names, preflight.best_facts(cfg, layout))  # the dataset is known now
                checked_with_data = True
            reason = "forced" if force else Lineage(cfg, layout, cache).stale_reason(name)
            if reason is None:
                announce(name, "up to date")
                continue
            announce(name, f"running ({reason})")
            execute(name, functools.partial(_run_stage, name, cfg, tracker))
            announce(name, "done")
        cache.close()
        return summarize(layout)


def _run_stage(name: str, cfg: Config, tracker: Tracker) -> dict:
    with tracker.stage(name) as stage_tracker:
        return STAGES[name](cfg, stage_tracker)


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
            f"{name:<10}{stage.get('seconds', 0):>10.1f}{stage.get('peak_mem_mb', 0):>10.0f}{(rate / 1e9 if rate else 0):>10.1f}"
        )
    lines.append(f"{'total':<10}{summary.get('total_seconds', 0):>10.1f}")
    return "\n".join(lines)
