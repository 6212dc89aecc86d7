"""Is the Prefect server that the settings name reachable? Asked before any work starts."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from fadrm.errors import FadrmError


class PrefectUnreachable(FadrmError):
    """PREFECT_API_URL names a server that does not answer."""


def check_prefect_api(timeout: float = 5.0) -> None:
    """Fail at once, before any work, when ``PREFECT_API_URL`` is set but its server does not answer."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        try:  # or set in the active Prefect profile
            from prefect.settings import get_current_settings

            url = get_current_settings().api.url
        except Exception:  # noqa: BLE001 - no readable setting: Prefect's ephemeral mode
            url = None
    if not url:
        return  # Prefect's ephemeral mode on this machine
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise PrefectUnreachable(
        f"the Prefect server at PREFECT_API_URL={url} is unreachable ({problem}). Start it (`prefect server "
        "start`), unset PREFECT_API_URL to use Prefect's ephemeral mode, or run without Prefect: --local"
    )
