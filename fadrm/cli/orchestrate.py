"""``fadrm run``, ``fadrm check``, ``fadrm deploy`` and ``fadrm schedule`` — the Prefect side.

``fadrm run`` runs the Prefect distillation flow: against ``PREFECT_API_URL`` when it is
set, otherwise in Prefect's ephemeral mode on this machine. ``--local`` runs the very same
stages in this process without Prefect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fadrm.cli.app import DEFAULT_PARAMS, NoTrackOpt, ParamsOpt, PresetOpt, SetOpt, app, config_from, echo, guarded
from fadrm.cli.stages import ForceOpt, announce, print_summary


def check_prefect_api() -> None:
    """Fail at once, before any work, when the Prefect server named by the settings does not answer."""
    from flows.server import check_prefect_api as check

    check()


LocalOpt = Annotated[bool, typer.Option("--local", help="Run the stages in this process, without Prefect.")]
DaskOpt = Annotated[
    str | None,
    typer.Option(
        "--dask",
        help="Run select and recover as one shard per Dask worker: a scheduler address (tcp://host:8786) "
        "or local:N for a local cluster of N worker processes.",
    ),
]


@app.command("run")
@guarded
def run(
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
    preset: PresetOpt = None,
    local: LocalOpt = False,
    force: ForceOpt = False,
    no_track: NoTrackOpt = False,
    dask: DaskOpt = None,
) -> None:
    """Run the whole pipeline: prepare -> squeeze -> select -> recover -> relabel -> evaluate."""
    config_from(params, preset, set_)  # config errors surface here, before Prefect starts
    if dask is not None and local:
        raise typer.BadParameter("--dask fans shards out as Prefect tasks; drop --local", param_hint="--dask")
    if local:
        from fadrm.jobs import distill

        summary = distill(params, preset, set_, track=not no_track, force=force, announce=announce)
        echo(f"DVC: {summary['dvc']}")
    else:
        check_prefect_api()
        from flows.distill import distill_flow

        summary = distill_flow(str(params), preset, set_ or [], force=force, track=not no_track, dask=dask)
    print_summary(summary)


@app.command("check")
@guarded
def check_command(
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
    preset: PresetOpt = None,
    baseline: Annotated[str | None, typer.Option(help="Baseline JSON file, mlflow:<run>, or mlflow:tagged.")] = None,
    update_baseline: Annotated[bool, typer.Option("--update-baseline", help="Write this run as the baseline file.")] = False,
    local: LocalOpt = False,
    no_track: NoTrackOpt = False,
) -> None:
    """Run the regression benchmark once; exit 1 if a metric dropped beyond its tolerance."""
    from fadrm.tracking import load_baseline

    project = config_from(params, preset, set_)  # config errors surface here, before any work
    if not update_baseline:
        load_baseline(project, baseline or project.regression.baseline)  # missing or broken: fails now, not later
    if not local and not update_baseline:
        check_prefect_api()
    if update_baseline:
        _update_baseline(params, preset, set_ or [], baseline or project.regression.baseline, no_track)
        return
    if local:
        from fadrm.jobs import regression_check
        from fadrm.regression import RegressionFailed

        result = regression_check(params, preset, set_, baseline, track=not no_track, announce=announce)
        typer.echo(result.report)
        if not result.verdict.passed:
            raise RegressionFailed(f"regression against {result.verdict.baseline_source}")
        return
    from flows.regression import regression_flow

    result = regression_flow(str(params), preset, set_ or [], baseline, track=not no_track)
    echo(f"regression check passed against {result['verdict']['baseline']}")


def _update_baseline(params: Path, preset: str | None, overrides: list[str], path: str, no_track: bool) -> None:
    from fadrm.jobs import regression_config, tracked_pipeline
    from fadrm.regression import write_baseline

    if path.startswith("mlflow:"):
        raise typer.BadParameter("--update-baseline writes a file; tag an MLflow run with fadrm.baseline=true instead")
    _, cfg = regression_config(params, preset, overrides)
    summary = tracked_pipeline(cfg, track=not no_track, force=True, announce=announce)
    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    write_baseline(Path(path), metrics, cfg.to_dict(), note=f"fadrm check --update-baseline, preset {cfg.preset}")
    echo(f"wrote baseline {path}: {json.dumps(metrics)}")


PoolOpt = Annotated[str, typer.Option(help="Prefect work pool (created as a process pool if missing).")]
DevicesOpt = Annotated[str, typer.Option(help="CUDA_VISIBLE_DEVICES for runs of this deployment.")]


@app.command("deploy")
@guarded
def deploy(
    pool: PoolOpt = "gpu",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "gpu",
    devices: DevicesOpt = "0",
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
    preset: PresetOpt = None,
) -> None:
    """Deploy the distillation flow to a work pool; GPU workers run it (`prefect worker start --pool gpu`)."""
    from flows.deploy import deploy_distill

    config_from(params, preset, set_)  # refuse to deploy a configuration that would not validate
    check_prefect_api()
    parameters = {"params": str(params), "preset": preset, "overrides": set_ or []}
    deployment_id = deploy_distill(pool, name, parameters, devices)
    echo(f"deployed fadrm-distill/{name} ({deployment_id}) to pool '{pool}'")
    echo(f"start a worker:  prefect worker start --pool {pool}")
    echo(f"submit a run:    prefect deployment run 'fadrm-distill/{name}' --param preset=smoke")


@app.command("schedule")
@guarded
def schedule(
    cron: Annotated[str, typer.Option(help="Cron expression, e.g. '0 3 * * *' (03:00 every day).")] = "0 3 * * *",
    pool: PoolOpt = "gpu",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly",
    devices: DevicesOpt = "0",
    timezone: Annotated[str, typer.Option(help="Time zone of the cron expression.")] = "UTC",
    baseline: Annotated[str | None, typer.Option(help="Baseline JSON file, mlflow:<run>, or mlflow:tagged.")] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
    preset: PresetOpt = None,
) -> None:
    """Deploy the regression check with a cron schedule."""
    from flows.deploy import deploy_regression

    config_from(params, preset, set_)
    check_prefect_api()
    parameters = {"params": str(params), "preset": preset, "overrides": set_ or [], "baseline": baseline}
    deployment_id = deploy_regression(cron, pool, name, parameters, devices, timezone=timezone)
    echo(f"scheduled fadrm-regression/{name} ({deployment_id}) at '{cron}' ({timezone}) on pool '{pool}'")
