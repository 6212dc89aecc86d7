"""User-facing errors.

Anything a user can cause (bad config, bad data, missing inputs, a diverging loss) raises a
:class:`FadrmError` subclass with a message that names the offending key, path or class.
The adapters (CLI, DVC stages, Prefect tasks) print the message and exit non-zero instead
of showing a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path


class FadrmError(Exception):
    """Base class for errors caused by input, not by a bug."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `timeout`, `kill`): stop the way Ctrl-C does, keeping finished work and closing
    the run's records, instead of dying mid-write. Raised by :func:`raise_terminated` as a signal handler."""


def raise_terminated(signum, frame) -> None:
    raise Terminated(f"stopped by signal {signal.Signals(signum).name}")


class ConfigError(FadrmError):
    """Invalid parameters: unknown keys, wrong types, inconsistent values."""


class DataError(FadrmError):
    """A dataset that cannot be used: missing paths, empty classes, unreadable images."""


class UnsafeArchiveError(DataError):
    """An archive member would be written outside its target folder."""


class MissingInputError(FadrmError):
    """A stage was run before the stage it depends on produced its outputs."""


class DamagedInputError(MissingInputError):
    """An earlier stage's output no longer matches the manifest written with it, or holds
    values no stage should have published."""


class WeightsError(FadrmError):
    """Teacher/student weights that cannot be loaded."""


class DivergenceError(FadrmError):
    """A loss became NaN or infinite; finished work is kept, the stage output is not written."""


class TrackingError(FadrmError):
    """The experiment tracker cannot be reached or refused a request."""


class StorageError(FadrmError):
    """The output folder cannot be written: no permission, a read-only or full file system."""


_STORAGE_HINTS = {
    errno.EACCES: "check the permissions of that path, or write elsewhere (-S out_dir=...)",
    errno.EPERM: "check the permissions of that path, or write elsewhere (-S out_dir=...)",
    errno.EROFS: "that file system is read-only; write elsewhere (-S out_dir=...)",
    errno.ENOSPC: "the disk is full; free some space or write elsewhere (-S out_dir=...)",
    errno.EDQUOT: "the disk quota is used up; free some space or write elsewhere (-S out_dir=...)",
    errno.EFBIG: "a file grew beyond what this file system or process may write; write elsewhere (-S out_dir=...)",
}
LOW_SPACE_BYTES = 1 << 20  # below this much free space, a failed write is taken for a full disk


def storage_problem(exc: BaseException, where: str, root: Path) -> StorageError | None:
    """A :class:`StorageError` describing ``exc`` when it comes from the file system, else None.

    Libraries report a full disk in their own words (torch.save raises RuntimeError "file write
    failed", SQLite "database or disk is full"), so a failure while the disk holding ``root`` has
    almost no space left is reported as a full disk whatever its type.
    """
    if isinstance(exc, FadrmError) or not isinstance(exc, Exception):
        return None
    if isinstance(exc, OSError) and exc.errno in _STORAGE_HINTS:
        path = exc.filename or root
        return StorageError(f"{where}: cannot write {path}: {exc.strerror}; {_STORAGE_HINTS[exc.errno]}")
    probe = Path(root)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return None
    if free < LOW_SPACE_BYTES:
        return StorageError(
            f"{where}: writing under {root} failed ({type(exc).__name__}: {exc}) with "
            f"{free} bytes left on its disk; {_STORAGE_HINTS[errno.ENOSPC]}"
        )
    return None


@contextlib.contextmanager
def storage_errors(where: str, root: Path) -> Iterator[None]:
    """Turn file-system failures under ``root`` into one clear :class:`StorageError`."""
    try:
        yield
    except Exception as exc:
        problem = storage_problem(exc, where, root)
        if problem is None:
            raise
        raise problem from None
