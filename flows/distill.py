"""Prefect flow of the distillation pipeline: one task per stage, the same stage functions.

Run it the way users do::

    fadrm run                                   # this flow, ephemeral Prefect or $PREFECT_API_URL
    python -m flows.distill --preset smoke      # the same, without the CLI
    fadrm deploy --pool gpu                     # a deployment that GPU workers pick up

Tasks pass paths and small dicts, never tensors: each stage reads its inputs from the
output folder and writes its own. Retries cover I/O errors only; a user error (bad config,
bad data) fails at once with its message. After the run, DVC knows the outputs (``dvc
status`` has nothing to do) and MLflow holds one parent run with a child per stage.
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from fadrm import preflight
from fadrm.config import Config, load_config, validate
from fadrm.errors import FadrmError
from fadrm.lineage import Lineage
from fadrm.lock import hold, holder_text
from fadrm.pipeline import STAGES, summary_table
from fadrm.stage import STAGE_ORDER, Layout, summarize
from fadrm.tracking import mlflow_run_link, open_tracker
from flows.dvc_sync import sync_dvc


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


@task(task_run_name="{name}", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on_io)
def stage_task(name: str, config: dict[str, Any], parent_run_id: str | None) -> dict[str, Any]:
    """Run one stage (the same function the CLI and DVC call) under the pipeline's MLflow run."""
    cfg = validate(config)
    with open_tracker(cfg, stage=name, parent_run_id=parent_run_id, enabled=parent_run_id is not None) as tracker:
        with tracker.stage(name) as stage_tracker:
            return STAGES[name](cfg, stage_tracker)


@flow(name="fadrm-distill", log_prints=True)
def distill_flow(
    params: str = "params.yaml",
    preset: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    track: bool = True,
) -> dict[str, Any]:
    """prepare -> squeeze -> select -> recover -> relabel -> evaluate; returns the run summary."""
    logger = get_run_logger()
    cfg = load_config(params, preset, overrides or [])
    layout = Layout.of(cfg)
    preflight.check(cfg, STAGE_ORDER, preflight.best_facts(cfg, layout))
    # one writer per output folder: the tasks run in this process and take the same lock again
    with hold(layout) as held, open_tracker(cfg, enabled=track) as tracker:
        if held.previous:
            logger.warning("took over %s from %s, which ended without releasing it", layout.root,
                           holder_text(held.previous))
        parent_run_id = getattr(tracker, "run_id", None)
        for name in STAGE_ORDER:
            if name == "squeeze":
                preflight.check(cfg, STAGE_ORDER, preflight.best_facts(cfg, layout))  # the dataset is known now
            reason = "forced" if force else Lineage(cfg, layout).stale_reason(name)
            if reason is None:
                logger.info("%s: up to date, skipped", name)
                continue
            logger.info("%s: running (%s)", name, reason)
            stage_task(name, cfg.to_dict(), parent_run_id)
        summary = summarize(layout)
    summary["mlflow_run_id"] = parent_run_id
    _report(cfg, summary, parent_run_id)
    summary["dvc"] = sync_dvc(cfg, params, preset, overrides)
    logger.info("DVC: %s", summary["dvc"])
    return summary


def _report(cfg: Config, summary: dict[str, Any], parent_run_id: str | None) -> None:
    link = mlflow_run_link(cfg, parent_run_id) if parent_run_id else "tracking was off"
    markdown = "\n".join([
        f"# fadrm: {cfg.method}, IPC {cfg.ipc}, preset {cfg.preset or '(params.yaml)'}",
        "",
        "```",
        summary_table(summary),
        "```",
        "",
        f"MLflow run: {link}",
        f"Outputs: `{cfg.out_dir}`",
    ])
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
    result = distill_flow(args.params, args.preset, args.overrides)
    print(summary_table(result))  # noqa: T201
    sys.exit(0)
