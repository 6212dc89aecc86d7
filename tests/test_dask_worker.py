"""A local Dask cluster closes without a traceback, even when a worker's heartbeat is on its way
to the scheduler as the worker closes (the race that printed one at the end of a good
`fadrm run --dask local:2` on a busy machine)."""

import asyncio
import logging
import threading

import pytest
from distributed import LocalCluster
from distributed.core import Status

from flows.dask_worker import HEARTBEAT_FAILED, ClosingHeartbeatFilter
from flows.sharding import task_runner


def close_during_a_heartbeat(cluster_kwargs: dict) -> None:
    """Start a one-worker cluster, hold the worker's next heartbeat at the scheduler, close."""
    in_flight = threading.Event()
    with LocalCluster(**{**cluster_kwargs, "n_workers": 1}) as cluster:
        answer = cluster.scheduler.handlers["heartbeat_worker"]

        async def slow_heartbeat(**kwargs):
            in_flight.set()
            await asyncio.sleep(5)
            return answer(**kwargs)

        cluster.scheduler.handlers["heartbeat_worker"] = slow_heartbeat
        assert in_flight.wait(30), "the worker sent no heartbeat"


def test_a_local_cluster_closes_without_the_heartbeat_traceback(capfd):
    kwargs = task_runner("local:1").cluster_kwargs
    assert kwargs["preload"] == ["flows.dask_worker"]

    close_during_a_heartbeat({k: v for k, v in kwargs.items() if k != "preload"})
    bare = capfd.readouterr().err
    assert HEARTBEAT_FAILED in bare and "Traceback" in bare, "the race was not forced: this test proves nothing"

    close_during_a_heartbeat(kwargs)
    ours = capfd.readouterr().err
    assert HEARTBEAT_FAILED not in ours and "Traceback" not in ours, ours[-3000:]


class Worker:
    def __init__(self, status):
        self.status = status


@pytest.mark.parametrize(
    ("status", "message", "shown"),
    [
        (Status.closing, HEARTBEAT_FAILED + ".", False),
        (Status.closed, HEARTBEAT_FAILED + ".", False),
        (Status.running, HEARTBEAT_FAILED + ".", True),  # a lost scheduler while working still shows
        (Status.closing, "Unexpected exception during heartbeat. Closing worker.", True),
        (Status.closing, "Failed to log closing event", True),
    ],
)
def test_only_a_closing_workers_heartbeat_failure_is_dropped(status, message, shown):
    record = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, message, None, None)
    assert ClosingHeartbeatFilter(Worker(status)).filter(record) is shown
