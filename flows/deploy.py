"""Deployments of the flows to a Prefect work pool (GPU agents), and the nightly schedule.

A worker on a GPU machine picks the runs up::

    prefect worker start --pool gpu          # on the GPU machine, in a clone of this repo
    fadrm deploy --pool gpu --devices 0      # once, from anywhere with PREFECT_API_URL set
    prefect deployment run 'fadrm-distill/gpu' --param preset=cifar100
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DISTILL_ENTRY = "flows/distill.py:distill_flow"
REGRESSION_ENTRY = "flows/regression.py:regression_flow"


def ensure_pool(pool: str, pool_type: str = "process") -> None:
    """Create the work pool if it does not exist yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type))


def job_variables(devices: str | None, root: Path) -> dict[str, Any]:
    """Process-worker job variables: which GPUs the run may see, and where the project is."""
    env = {"PYTHONUNBUFFERED": "1", "FADRM_PROGRESS": "0"}
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return {"env": env, "working_dir": str(root)}


def _deploy(entry: str, name: str, pool: str, parameters: dict, devices: str | None, root: Path, **kwargs) -> str:
    from prefect import flow

    ensure_pool(pool)
    remote = flow.from_source(source=str(root), entrypoint=entry)
    deployment_id = remote.deploy(
        name=name,
        work_pool_name=pool,
        job_variables=job_variables(devices, root),
        parameters=parameters,
        build=False,
        push=False,
        print_next_steps=False,
        **kwargs,
    )
    return str(deployment_id)


def deploy_distill(
    pool: str = "gpu", name: str = "gpu", parameters: dict | None = None, devices: str | None = "0", root: Path = PROJECT_ROOT
) -> str:
    """Deploy the distillation flow to ``pool``; returns the deployment id."""
    return _deploy(DISTILL_ENTRY, name, pool, parameters or {}, devices, root)


def deploy_regression(
    cron: str,
    pool: str = "gpu",
    name: str = "nightly",
    parameters: dict | None = None,
    devices: str | None = "0",
    root: Path = PROJECT_ROOT,
    timezone: str = "UTC",
) -> str:
    """Deploy the regression flow with a cron schedule; returns the deployment id.

    At most one check runs at a time: they share ``outputs/regression``, and a tick that comes
    while the previous check still runs is cancelled rather than queued behind it.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    return _deploy(
        REGRESSION_ENTRY,
        name,
        pool,
        parameters or {},
        devices,
        root,
        schedule=Cron(cron, timezone=timezone),
        concurrency_limit=one_at_a_time,
    )
