"""Prefect flow of the scheduled regression check.

Calls :func:`fadrm.jobs.regression_check` — the function ``fadrm check --local`` calls: it
runs a fixed small benchmark (the ``smoke`` preset unless configured otherwise) with each
stage as a Prefect task, compares its figures with a baseline (a committed JSON file or an
MLflow run tagged ``fadrm.baseline=true``) under ``regression.tolerances`` and records the
verdict in MLflow. The flow adds the verdict as a Prefect artifact and fails the flow run on
a regression. Deployed with a cron schedule by ``fadrm schedule --cron "0 3 * * *"`` (or
``prefect deploy`` from ``prefect.yaml``); ``fadrm check`` runs it once.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from fadrm.jobs import regression_check
from fadrm.regression import RegressionFailed
from flows.distill import as_tasks, log_status, report


@flow(name="fadrm-regression", log_prints=True)
def regression_flow(
    params: str = "params.yaml",
    preset: str | None = None,
    overrides: list[str] | None = None,
    baseline: str | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Run the benchmark, compare with the baseline, record the verdict; fail on a regression."""
    result = regression_check(params, preset, overrides, baseline, track=track, execute=as_tasks, announce=log_status)
    report(result.cfg, result.summary)
    create_markdown_artifact(result.report, key="fadrm-regression", description="regression check verdict")
    get_run_logger().info("\n%s", result.report)
    if not result.verdict.passed:
        raise RegressionFailed(f"regression against {result.verdict.baseline_source}:\n{result.report}")
    return {"summary": result.summary, "verdict": result.verdict.to_dict()}
