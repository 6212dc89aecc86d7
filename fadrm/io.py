"""Files: atomic stage outputs, JSON, content hashes (cached), lossless images.

A stage writes into a temporary sibling folder and renames it into place only when every
file is complete, so an output folder that exists is an output folder that is whole.
Content hashes are what lineage trusts; :class:`HashCache` makes them cheap to re-check by
keeping each file's hash under its size and timestamps, and hashing again when either moves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

STAGE_RECORD = "stage.json"


@contextlib.contextmanager
def atomic_dir(final: Path, publish: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces ``final`` only if the block succeeds
    (and ``publish``: helper processes of a multi-process run work in it, then drop it)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not publish:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_png(array: np.ndarray, path: Path) -> None:
    """Save an HxWx3 uint8 array losslessly (fixed compression, no timestamps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path, format="PNG", compress_level=6)


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


# ----------------------------------------------------------------------------- cached content hashes

# A timestamp this close to the moment a hash was taken may hide a later write in the same clock
# tick (coarse file-system timestamps): such an entry is not trusted and the file is hashed again
# ("racy" entries, as git calls them).
RACY_SECONDS = 2.0


class HashCache:
    """sha256 of files, remembered under (size, mtime, ctime) in a small SQLite file.

    A lookup stats the file; the stored hash is reused only when size and both timestamps are
    unchanged and the entry was recorded well after the file's last change. Anything else —
    an in-place edit, a copy, a restore from a backup — is hashed again. SQLite keeps lookups
    cheap for datasets of a million files and survives concurrent readers.
    """

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self._db: sqlite3.Connection | None = None
        self._pending: dict[str, tuple] = {}  # path -> (size, mtime, ctime, recorded, sha256), not yet written

    def _conn(self) -> sqlite3.Connection | None:
        if self.path is None:
            return None
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, timeout=30)
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, "
                    "ctime INTEGER, recorded REAL, sha256 TEXT)"
                )
            except (OSError, sqlite3.Error):
                self.path = None  # a read-only place: hash without remembering
                return None
        return self._db

    def sha256(self, path: Path) -> str:
        """The content hash of ``path`` (from the cache when provably unchanged)."""
        path = Path(path)
        st = path.stat()
        key = str(path.resolve())
        db = self._conn()
        if db is not None:
            row = (
                self._pending.get(key)
                or db.execute("SELECT size, mtime, ctime, recorded, sha256 FROM hashes WHERE path = ?", (key,)).fetchone()
            )
            if row is not None:
                size, mtime, ctime, recorded, digest = row
                settled = max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 < recorded - RACY_SECONDS
                if (size, mtime, ctime) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns) and settled:
                    return digest
        digest = sha256_file(path)
        self.remember(path, digest, st)
        return digest

    def remember(self, path: Path, digest: str, st: os.stat_result | None = None) -> None:
        """Record a hash computed elsewhere (e.g. while writing the file)."""
        if self._conn() is None:
            return
        st = st or Path(path).stat()
        self._pending[str(Path(path).resolve())] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, time.time(), digest)
        if len(self._pending) >= 1000:
            self.flush()

    def flush(self) -> None:
        db = self._conn()
        if db is None or not self._pending:
            return
        try:
            with db:
                db.executemany(
                    "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?)", [(key, *row) for key, row in self._pending.items()]
                )
        except sqlite3.Error:
            pass  # a cache that cannot be written only costs time
        self._pending = {}

    def close(self) -> None:
        self.flush()
        if self._db is not None:
            self._db.close()
            self._db = None


def tree_files(folder: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Every file under ``folder`` as sorted POSIX paths relative to it (links to folders not followed)."""
    folder = Path(folder)
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            rel = Path(dirpath, name).relative_to(folder).as_posix()
            if rel not in skip:
                out.append(rel)
    return sorted(out)
