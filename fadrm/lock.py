"""One writer per output folder, and the clean-up of what a killed writer left behind.

Every process that writes under ``out_dir`` (``fadrm run``, one ``fadrm <stage>``, a Prefect
flow, ``dvc repro``'s stage commands) first takes an exclusive ``flock`` on
``<out_dir>/.fadrm/lock`` and writes who it is into that file. A second writer is refused at
once with the holder's pid, host, start time and command. The kernel drops the lock when
its process dies, however it dies, so a lock left by a killed run is taken over safely: the
next writer finds the file unlocked, reports whom it took over from, and removes the
temporary folders that run left (``.<stage>.tmp-*``, ``.prepare-scratch-*``, ...) — no live
process can own them, since it would hold the lock.

The lock is re-entrant within a process (the pipeline holds it, each stage takes it again).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fadrm.errors import FadrmError
from fadrm.layout import STAGE_ORDER, Layout


class OutputBusyError(FadrmError):
    """Another process is writing to the same output folder."""

    exit_code = 3


@dataclass
class Held:
    """What taking the lock found: whom it took over from, which debris it removed."""

    previous: dict[str, Any] | None = None
    removed: list[str] = field(default_factory=list)


_HELD: dict[str, list] = {}  # resolved lock path -> [open file, depth, Held]
_GUARD = threading.Lock()


def process_token(pid: int) -> str | None:
    """What tells process ``pid`` apart from a later one with the same number: its start time
    (Linux ``/proc``); None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, token: str | None = None) -> bool:
    """Whether process ``pid`` (started as ``token`` says, when given) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return token is None or process_token(pid) in (None, token)


def holder_text(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (it has not written its details yet)"
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')} ({info.get('command', '?')})"


def _read(fh) -> dict[str, Any] | None:
    fh.seek(0)
    text = fh.read()
    try:
        return json.loads(text) if text.strip() else None
    except ValueError:
        return None


@contextlib.contextmanager
def hold(layout: Layout) -> Iterator[Held]:
    """Hold the writer's lock of ``layout.root`` for the block (re-entrant in this process)."""
    path = layout.lock
    with _GUARD:
        key = str(path.resolve())
        entry = _HELD.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield entry[2]
        finally:
            with _GUARD:
                entry[1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    ignore = path.parent / ".gitignore"
    if not ignore.exists():  # bookkeeping, never something to commit (as .pytest_cache does it)
        ignore.write_text("# written by fadrm: the writer's lock and the hash cache\n*\n")
    fh = open(path, "a+")  # noqa: SIM115 - held open for the lifetime of the lock
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        info = _read(fh)
        fh.close()
        raise OutputBusyError(
            f"{layout.root} is being written by {holder_text(info)}; two runs on one output folder would mix "
            "their files. Wait for it to finish, or give this run its own folder (-S out_dir=...)"
        ) from None
    previous = _read(fh)
    me = {
        "pid": os.getpid(),
        "token": process_token(os.getpid()),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
    }
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps(me))
    fh.flush()
    held = Held(previous=previous, removed=remove_debris(layout))
    key = str(path.resolve())
    with _GUARD:
        _HELD[key] = [fh, 1, held]
    try:
        yield held
    finally:
        with _GUARD:
            del _HELD[key]
        fh.seek(0)
        fh.truncate()  # a clean release leaves no holder behind
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def holds(layout: Layout) -> bool:
    """Whether this process holds the lock of ``layout.root``."""
    path = layout.lock
    return path.parent.exists() and str(path.resolve()) in _HELD


def debris(layout: Layout) -> list[Path]:
    """Temporary files and folders of interrupted writers under ``layout.root``."""
    root = layout.root
    if not root.is_dir():
        return []
    patterns = [f".{name}.tmp-*" for name in STAGE_ORDER] + [f".{name}.old-*" for name in STAGE_ORDER]
    patterns += [".prepare-scratch-*", ".*.tmp-*"]
    found = {p for pattern in patterns for p in root.glob(pattern)}
    for sub in ("metrics", "plots"):
        found.update((root / sub).glob(".*.tmp-*"))
    for name in STAGE_ORDER:
        found.update(layout.partial(name).rglob("*.tmp"))
    return sorted(found)


def remove_debris(layout: Layout) -> list[str]:
    """Remove :func:`debris` (call only while holding the lock); returns what was removed."""
    removed = []
    for path in debris(layout):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.relative_to(layout.root).as_posix())
    return removed
