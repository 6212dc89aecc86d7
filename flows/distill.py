"""Prefect flow of the distillation pipeline: one task per stage, the same pipeline function.

Run it the way users do::

    fadrm run                                   # this flow, ephemeral Prefect or $PREFECT_API_URL
    python -m flows.distill --preset smoke      # the same, without the CLI
    fadrm deploy --pool gpu                     # a deployment that GPU workers pick up

The flow calls :func:`fadrm.jobs.distill` — the job ``fadrm run --local`` runs — and only
says how a stage is executed: as a Prefect task (:func:`stage_task`), with retries on I/O
errors. Which stages run (the skip logic) stays in :func:`fadrm.pipeline.run_pipeline`.
Tasks pass paths and small dicts, never tensors: each stage reads its inputs from the output
folder and writes its own. After the run, DVC knows the outputs (``dvc status`` has nothing
to do) and MLflow holds one parent run with a child per stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from fadrm.config import Config, load_config
from fadrm.errors import FadrmError
from fadrm.jobs import distill
from fadrm.pipeline import SHARDED, summary_table
from fadrm.tracking import mlflow_run_link


def retry_on_io(task, task_run, state) -> bool:
    """Retry transient I/O failures (network file systems, object stores), not user errors."""
    try:
        state.result()
    except FadrmError:
        return False
    except OSError:
        return True
    except Exception:  # noqa: BLE001 - anything else is a bug or a user error: do not retry
        return False
    return False


# NO_CACHE: whether a stage must run is the pipeline's decision (its fingerprints), not Prefect's.
@task(task_run_name="{name}", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on_io, cache_policy=NO_CACHE)
def stage_task(name: str, run_stage: Callable[[], dict]) -> dict[str, Any]:
    """One stage as a Prefect task: ``run_stage`` is the pipeline's own call of the stage function."""
    return run_stage()


def as_tasks(name: str, run_stage: Callable[[], dict]) -> dict[str, Any]:
    """The pipeline's executor under Prefect: every stage that runs is a task run named after it."""
    return stage_task(name, run_stage)


def sharded_tasks(cfg: Config, dask: str) -> Callable[[str, Callable[[], dict]], dict[str, Any]]:
    """The executor with a Dask cluster: a stage that splits into shards first runs them there."""
    from flows.sharding import parse_address, run_shards

    parse_address(dask)  # a malformed address fails before any work

    def execute(name: str, run_stage: Callable[[], dict]) -> dict[str, Any]:
        if name in SHARDED:
            run_shards(name, cfg, dask)
        return stage_task(name, run_stage)

    return execute


def log_status(stage: str, status: str) -> None:
    get_run_logger().info("%s: %s", stage, status)


@flow(name="fadrm-distill", log_prints=True)
def distill_flow(
    params: str = "params.yaml",
    preset: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    track: bool = True,
    dask: str | None = None,
) -> dict[str, Any]:
    """prepare -> squeeze -> select -> recover -> relabel -> evaluate; returns the run summary.

    ``dask``: a scheduler address or ``local:N``; select and recover then run one shard per
    Dask worker (:mod:`flows.sharding`) before the stage assembles and publishes."""
    execute = as_tasks if dask is None else sharded_tasks(load_config(params, preset, overrides or []), dask)
    summary = distill(params, preset, overrides, track=track, force=force, execute=execute, announce=log_status)
    report(load_config(params, preset, overrides or []), summary)
    get_run_logger().info("DVC: %s", summary["dvc"])
    return summary


def report(cfg: Config, summary: dict[str, Any]) -> None:
    """The run summary as Prefect artifacts: a Markdown table and the time/memory per stage."""
    run_id = summary.get("mlflow_run_id")
    link = mlflow_run_link(cfg, run_id) if run_id else "tracking was off"
    markdown = "\n".join(
        [
            f"# fadrm: {cfg.method}, IPC {cfg.ipc}, preset {cfg.preset or '(params.yaml)'}",
            "",
            "```",
            summary_table(summary),
            "```",
            "",
            f"MLflow run: {link}",
            f"Outputs: `{cfg.out_dir}`",
        ]
    )
    create_markdown_artifact(markdown, key="fadrm-summary", description="fadrm run summary")
    rows = [{"stage": n, **s} for n, s in summary.get("stages", {}).items()]
    if rows:
        create_table_artifact(rows, key="fadrm-stages", description="time and memory per stage")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the fadrm distillation flow.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(summary_table(distill_flow(args.params, args.preset, args.overrides)))  # noqa: T201
