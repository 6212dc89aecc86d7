"""Preload of a local cluster's Dask workers (``preload=["flows.dask_worker"]``, see :mod:`flows.sharding`).

A closing Dask worker (distributed 2026.8) stops its periodic heartbeat and then closes its
connections; a heartbeat already on its way to the scheduler at that moment fails with
"Stream is closed" and the worker logs it as an error with a 30-line traceback -- at the end
of a run that went well, more often on a busy machine. The filter installed here drops that one
record while the worker is closing; while it runs, a heartbeat that fails (a lost scheduler)
still shows.
"""

from __future__ import annotations

import logging
from typing import Any

from distributed.core import Status

HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"
CLOSING = frozenset({Status.closing, Status.closed})


class ClosingHeartbeatFilter(logging.Filter):
    """Drops a heartbeat failure that ``worker`` logs while it closes; passes every other record."""

    def __init__(self, worker: Any) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        return self.worker.status not in CLOSING or not record.getMessage().startswith(HEARTBEAT_FAILED)


def dask_setup(worker: Any) -> None:
    """Called by Dask in each worker process as it starts."""
    logging.getLogger("distributed.worker").addFilter(ClosingHeartbeatFilter(worker))
