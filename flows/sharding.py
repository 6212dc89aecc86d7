"""Shards of select and recover on a Dask cluster, through prefect-dask.

``fadrm run --dask ADDRESS`` (an existing scheduler, ``tcp://host:8786``) or ``--dask local:N``
(a local cluster of N worker processes, one thread each) splits the two stages whose work is
independent per unit — selection per class, recovery per batch — into one shard per worker.
Each shard is a Prefect task run ("recover shard 1/2") on a Dask worker; it writes its finished
units into the output folder's partial area (``fadrm.shards``), which every worker must see (a
shared file system). The stage itself then runs as usual in the flow's process: it finds every
unit done, assembles and publishes, so the output is the same bytes for any number of workers
(given the same hardware and CPU thread count per worker: on CPUs the thread count changes rounding).

Workers of an existing cluster must reach the flow's Prefect API: start them with the same
``PREFECT_API_URL`` as the flow (a local cluster gets it passed on).

A worker on a machine with several GPUs takes GPU ``worker index % GPU count`` (a cluster whose
workers each see one GPU, e.g. through ``CUDA_VISIBLE_DEVICES`` or dask-cuda, needs nothing).
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from fadrm.config import Config, validate
from fadrm.errors import ConfigError
from fadrm.pipeline import SHARDED
from fadrm.shards import Shard


def parse_address(address: str) -> tuple[str | None, int | None]:
    """``local:N`` -> (None, N); anything else is a scheduler address -> (address, None)."""
    if address.startswith("local:"):
        count = address.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(f"--dask {address}: use local:N with N >= 1 worker processes, or a scheduler address")
        return None, int(count)
    if "://" not in address and ":" not in address:
        raise ConfigError(f"--dask {address}: not a scheduler address (tcp://host:8786) nor local:N")
    return address, None


def task_runner(address: str, api_url: str | None = None) -> DaskTaskRunner:
    """The runner for ``address``. A local cluster's workers get ``api_url`` (the flow's Prefect API)
    so that their task runs land on the flow's server -- without it each worker process would start a
    temporary server of its own -- and log only errors (not the nanny's shutdown chatter), less the
    one a closing worker logs about its own heartbeat (:mod:`flows.dask_worker`)."""
    scheduler, workers = parse_address(address)
    if scheduler is not None:
        return DaskTaskRunner(address=scheduler)
    kwargs: dict[str, Any] = {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        "silence_logs": logging.ERROR,
        "preload": ["flows.dask_worker"],  # no shutdown-race traceback from a closing worker
    }
    if api_url:
        kwargs["env"] = {"PREFECT_API_URL": api_url}
    return DaskTaskRunner(cluster_kwargs=kwargs)


def flow_api_url() -> str | None:
    """The API the running flow talks to (its temporary server in Prefect's ephemeral mode)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/") or None


def worker_count(address: str) -> int:
    """How many workers the cluster has: one shard each."""
    scheduler, workers = parse_address(address)
    if workers is not None:
        return workers
    from distributed import Client

    with Client(scheduler, timeout=30) as client:
        return max(1, len(client.scheduler_info()["workers"]))


def _on_this_worker(cfg: Config) -> Config:
    """The config a shard runs with here: on a multi-GPU worker machine, this worker's GPU."""
    import torch

    if cfg.device not in ("auto", "cuda") or torch.cuda.device_count() < 2:
        return cfg
    from distributed import get_worker

    name = get_worker().name
    index = name if isinstance(name, int) else sum(map(ord, str(name)))
    return validate({**cfg.to_dict(), "device": f"cuda:{index % torch.cuda.device_count()}"})


@task(task_run_name="{name} shard {index}/{count}", retries=1, cache_policy=NO_CACHE)
def shard_task(name: str, config: dict[str, Any], index: int, count: int) -> dict[str, Any]:
    """One shard of a stage's units, on whichever worker Dask gives it; publishes nothing."""
    return SHARDED[name](_on_this_worker(validate(config)), Shard(index, count))


@flow(name="fadrm-shards")
def shards_flow(name: str, config: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Every shard of one stage, mapped over the flow's task runner (the Dask cluster)."""
    futures = [shard_task.submit(name, config, index, count) for index in range(count)]
    return [future.result() for future in futures]


def run_shards(name: str, cfg: Config, address: str) -> list[dict[str, Any]]:
    """Fan ``name``'s shards out over the cluster at ``address`` and wait for all of them."""
    count = worker_count(address)
    # the scheduler and the nannies of a local cluster log here, through Prefect's console handler:
    # their start/stop chatter (and "worker still alive after 4 s, killing" at every shutdown) is
    # not something a user acts on; errors still show
    logging.getLogger("distributed").setLevel(logging.ERROR)
    return shards_flow.with_options(task_runner=task_runner(address, flow_api_url()))(name, cfg.to_dict(), count)
