"""Progress of long loops on stderr. ``FADRM_PROGRESS=0`` turns it off.

On a terminal: a tqdm bar. Without one (CI logs, Prefect workers, ``2> file``) a bar's
carriage returns make one unreadable line that often shows only its first state (0%), so
there :class:`LogLines` writes a plain line at most every ``interval`` seconds and one at
the end. Both have the methods the stages call (``update``, ``set_postfix``, ``close``).

Where several jobs share one log (a benchmark's worker processes), ``FADRM_PROGRESS_LABEL``
names the job at the start of each of its lines and ``FADRM_PROGRESS_INTERVAL`` sets the
seconds between two lines.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from tqdm import tqdm

from fadrm.errors import ConfigError

LOG_INTERVAL = 30.0  # seconds between two lines in a log


def enabled() -> bool:
    return os.environ.get("FADRM_PROGRESS", "1") not in ("0", "false", "no")


def log_interval() -> float:
    """Seconds between two log lines: ``FADRM_PROGRESS_INTERVAL``, else :data:`LOG_INTERVAL`."""
    value = os.environ.get("FADRM_PROGRESS_INTERVAL")
    if value is None:
        return LOG_INTERVAL
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ConfigError(f"FADRM_PROGRESS_INTERVAL must be a number of seconds (>= 0), got {value!r}")
    return seconds


class LogLines:
    """A progress report for logs: ``desc: done/total unit (pct%), elapsed [postfix]`` lines."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        interval: float = LOG_INTERVAL,
        stream=None,
        disable: bool = False,
    ):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval, self.disable = interval, disable
        self.stream = stream or sys.stderr
        self.started = self.last = time.monotonic()
        self.postfix: dict[str, Any] = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and time.monotonic() - self.last >= self.interval:
            self._line()

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if not self.disable:
            self._line()
            self.disable = True  # a second close writes nothing

    def _line(self) -> None:
        self.last = time.monotonic()
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        elapsed = tqdm.format_interval(self.last - self.started)  # mm:ss, h:mm:ss from an hour on (as the bar)
        self.stream.write(f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {elapsed} elapsed{extra}\n")
        self.stream.flush()


def bar(total: int, desc: str, unit: str = "it", initial: int = 0) -> tqdm | LogLines:
    """A tqdm bar on a terminal, plain log lines elsewhere; silent with ``FADRM_PROGRESS=0``."""
    label = os.environ.get("FADRM_PROGRESS_LABEL")
    if label:
        desc = f"[{label}] {desc}"
    if not sys.stderr.isatty():
        return LogLines(total, desc, unit, initial, interval=log_interval(), disable=not enabled())
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        disable=not enabled(),
        mininterval=0.2,
        dynamic_ncols=True,
        leave=True,
        file=sys.stderr,
    )
