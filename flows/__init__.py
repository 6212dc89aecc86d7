"""Prefect flows: the distillation pipeline, scheduled regression checks, deployments.

Importing this package (before Prefect itself) sets two defaults for the temporary Prefect
server that ``fadrm run`` starts when ``PREFECT_API_URL`` is unset, unless the user chose
otherwise:

- its telemetry is off. That service writes a session row while the server migrates its
  database (intermittently ``sqlite3.OperationalError: database is locked``, a 130-line
  traceback in the middle of a run) and then tries to reach the internet (an ERROR line on
  machines without it); neither says anything a user of ``fadrm`` can act on;
- it gets 90 s to start instead of Prefect's 20: a cold start takes 10-20 s on a 2-core
  machine, and on one busy with other work `fadrm run` otherwise dies with "Timed out while
  attempting to connect to ephemeral Prefect API server" before any stage runs.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
