"""Progress bars for long loops (tqdm on stderr). ``FADRM_PROGRESS=0`` turns them off."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def enabled() -> bool:
    return os.environ.get("FADRM_PROGRESS", "1") not in ("0", "false", "no")


def bar(total: int, desc: str, unit: str = "it", **kwargs) -> tqdm:
    """A bar that refreshes often on a terminal and rarely in logs (CI, Prefect workers)."""
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled(),
        mininterval=0.2 if tty else 15.0,
        dynamic_ncols=True,
        leave=tty,
        file=sys.stderr,
        **kwargs,
    )
