"""The two jobs users run, each one function that every entry point calls.

- :func:`distill` — the pipeline (:func:`fadrm.pipeline.run_pipeline`) under one MLflow
  parent run, then DVC told about the outputs. ``fadrm run --local`` calls it as is; the
  Prefect flow (``fadrm run``, deployments) passes an executor that submits each stage as a
  task. Which stages run is decided by ``run_pipeline`` alone.
- :func:`regression_check` — the benchmark run, its verdict against the baseline, and the
  verdict recorded in MLflow. ``fadrm check --local`` calls it as is; the Prefect regression
  flow (``fadrm check``, the scheduled deployment) adds its artifact and fails on a regression.

Adapter level, like ``fadrm.tracking`` (MLflow) and ``fadrm.dvc_sync`` (DVC) that it uses;
no Typer, no Prefect: the stage functions know nothing of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fadrm.config import Config, load_config
from fadrm.dvc_sync import sync_dvc
from fadrm.pipeline import StageExecutor, in_process, run_pipeline
from fadrm.regression import Verdict
from fadrm.tracking import judge, load_baseline, open_tracker, record_verdict

REGRESSION_OUT = "outputs/regression"

Announce = Callable[[str, str], None]


def _silent(stage: str, status: str) -> None:
    pass


def tracked_pipeline(
    cfg: Config, *, track: bool = True, force: bool = False, execute: StageExecutor = in_process, announce: Announce = _silent
) -> dict[str, Any]:
    """``run_pipeline`` under one MLflow parent run; the summary gets ``mlflow_run_id`` (None untracked)."""
    with open_tracker(cfg, enabled=track) as tracker:
        summary = run_pipeline(cfg, tracker, force=force, announce=announce, execute=execute)
    summary["mlflow_run_id"] = getattr(tracker, "run_id", None)
    return summary


def distill(
    params: str | Path,
    preset: str | None = None,
    overrides: list[str] | None = None,
    *,
    track: bool = True,
    force: bool = False,
    execute: StageExecutor = in_process,
    announce: Announce = _silent,
) -> dict[str, Any]:
    """The distillation job: the tracked pipeline, then DVC told about its outputs (``summary['dvc']``)."""
    overrides = list(overrides or [])
    cfg = load_config(params, preset, overrides)
    summary = tracked_pipeline(cfg, track=track, force=force, execute=execute, announce=announce)
    summary["dvc"] = sync_dvc(cfg, str(params), preset, overrides)
    return summary


@dataclass
class CheckResult:
    """What a regression check found: the run, the verdict and its Markdown report."""

    cfg: Config
    summary: dict[str, Any]
    verdict: Verdict
    report: str


def regression_config(params: str | Path, preset: str | None = None, overrides: list[str] | None = None) -> tuple[Config, Config]:
    """(the project's config, the benchmark's config): ``regression.preset`` unless ``preset``,
    writing to ``outputs/regression`` unless an override says otherwise."""
    project = load_config(params)
    chosen = preset or project.regression.preset
    return project, load_config(params, chosen, [f"out_dir={REGRESSION_OUT}", *(overrides or [])])


def regression_check(
    params: str | Path,
    preset: str | None = None,
    overrides: list[str] | None = None,
    baseline: str | None = None,
    *,
    track: bool = True,
    execute: StageExecutor = in_process,
    announce: Announce = _silent,
) -> CheckResult:
    """Run the benchmark from scratch, judge it against the baseline under ``regression.tolerances``,
    and record the verdict on the run's MLflow parent (tags ``fadrm.regression*``, report artifacts).

    Raises nothing on a regression: the caller decides (exit 1, a failed flow run).
    """
    project, cfg = regression_config(params, preset, overrides)
    reference = baseline or project.regression.baseline
    load_baseline(cfg, reference)  # a missing baseline fails now, not after the benchmark ran
    summary = tracked_pipeline(cfg, track=track, force=True, execute=execute, announce=announce)
    verdict, report = judge(summary, cfg, project.regression.tolerances, reference)
    if summary["mlflow_run_id"]:
        record_verdict(cfg, summary["mlflow_run_id"], verdict, report)
    return CheckResult(cfg, summary, verdict, report)
