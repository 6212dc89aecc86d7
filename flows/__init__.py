"""Prefect flows: the distillation pipeline, scheduled regression checks, deployments.

Importing this package (before Prefect itself) turns off the telemetry of the temporary
Prefect server that ``fadrm run`` starts when ``PREFECT_API_URL`` is unset, unless the user
chose otherwise. That service writes a session row while the server migrates its database
(intermittently ``sqlite3.OperationalError: database is locked``, a 130-line traceback in
the middle of a run) and then tries to reach the internet (an ERROR line on machines without
it); neither says anything a user of ``fadrm`` can act on.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
