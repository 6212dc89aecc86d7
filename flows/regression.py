"""Prefect flow of the scheduled regression check.

Runs a fixed small benchmark (the ``smoke`` preset unless configured otherwise) through the
distillation flow, compares its figures with a baseline (a committed JSON file or an MLflow
run tagged ``fadrm.baseline=true``) under ``regression.tolerances``, records the verdict in
MLflow and as a Prefect artifact, and fails the flow run on a regression. Deployed with a
cron schedule by ``fadrm schedule --cron "0 3 * * *"`` (or ``prefect deploy`` from
``prefect.yaml``); ``fadrm check`` runs it once.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from fadrm.config import load_config
from fadrm.regression import RegressionFailed
from fadrm.tracking import judge, load_baseline, record_verdict
from flows.distill import distill_flow

DEFAULT_OUT = "outputs/regression"


@flow(name="fadrm-regression", log_prints=True)
def regression_flow(
    params: str = "params.yaml",
    preset: str | None = None,
    overrides: list[str] | None = None,
    baseline: str | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Run the benchmark, compare with the baseline, record the verdict; fail on a regression."""
    logger = get_run_logger()
    project = load_config(params)
    preset = preset or project.regression.preset
    load_baseline(project, baseline or project.regression.baseline)  # a missing baseline fails before the benchmark
    overrides = [f"out_dir={DEFAULT_OUT}", *(overrides or [])]
    summary = distill_flow(params, preset, overrides, force=True, track=track)
    cfg = load_config(params, preset, overrides)
    verdict, report = judge(summary, cfg, project.regression.tolerances, baseline or project.regression.baseline)
    create_markdown_artifact(report, key="fadrm-regression", description="regression check verdict")
    if summary.get("mlflow_run_id"):
        record_verdict(cfg, summary["mlflow_run_id"], verdict, report)
    logger.info("\n%s", report)
    if not verdict.passed:
        raise RegressionFailed(f"regression against {verdict.baseline_source}:\n{report}")
    return {"summary": summary, "verdict": verdict.to_dict()}
