"""Tar archives: safe extraction, and the one extracted copy a file-backed dataset reads from.

Kept apart from ``fadrm.data.sources`` (how raw datasets are found and listed) because every
stage that opens a prepared dataset may need it: a file-backed dataset extracted from an
archive is extracted again when its copy is missing (e.g. after ``dvc pull`` elsewhere).
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path, PurePosixPath, PureWindowsPath

from fadrm.errors import DataError, UnsafeArchiveError
from fadrm.io import sha256_file

BUILTIN_ARCHIVE = "cifar10-mini.tar.gz"


def builtin_archive() -> Path:
    """The small real CIFAR-10 subset carried in the package (500 train + 100 test per class)."""
    with resources.as_file(resources.files("fadrm") / "assets" / BUILTIN_ARCHIVE) as path:
        return Path(path)


def check_member(member: tarfile.TarInfo, dest: Path) -> None:
    """Refuse members that would land outside ``dest`` or are not plain files/folders.

    The test is on the name alone: with links refused, a relative name without ``..`` cannot leave
    ``dest`` (resolving every member on disk cost seconds per extraction of a few thousand images).
    """
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts or ".." in PureWindowsPath(name).parts:
        raise UnsafeArchiveError(f"archive member '{name}' would be written outside {dest}; refusing to extract")
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(f"archive member '{name}' is a link ({member.linkname}); refusing to extract")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"archive member '{name}' is not a regular file or folder; refusing to extract")


def _plain(member: tarfile.TarInfo, _dest: str) -> tarfile.TarInfo:
    """Extraction filter for members ``check_member`` passed: no owners, ordinary permissions (what
    tarfile's "data" filter does, without its second resolution of every path)."""
    mode = 0o755 if member.isdir() else 0o644
    return member.replace(mode=mode, uid=None, gid=None, uname=None, gname=None, deep=False)


def safe_extract(archive: Path, dest: Path, select: Callable[[list[str]], Iterable[str]] | None = None) -> None:
    """Extract a tar/tar.gz into ``dest``, checking every member before anything is written.

    ``select``, when given, is called with the names of the archive's files (POSIX, normalised) and
    returns the ones to extract: a subset of a large archive then costs one read of it, not one file
    written per image it holds.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"archive not found: {archive}")
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for member in members:
                check_member(member, dest)
            if select is not None:
                files = {PurePosixPath(m.name).as_posix(): m for m in members if m.isfile()}
                members = [files[name] for name in select(list(files))]
            tf.extractall(dest, members=members, filter=_plain)
    except tarfile.TarError as exc:
        raise DataError(f"{archive}: not a readable tar archive ({exc})") from None
    except (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as exc:
        # a truncated or corrupted compressed stream (a download cut short)
        raise DataError(
            f"{archive}: the archive is truncated or corrupted ({type(exc).__name__}: {exc}); download or copy it again"
        ) from None
    except OSError as exc:
        if exc.errno is not None:
            raise  # a file-system failure while extracting (full disk, permissions): reported as such
        raise DataError(f"{archive}: the archive is truncated or corrupted ({exc}); download or copy it again") from None


EXTRACTED = ".cache/extracted"  # under the output folder, outside every DVC stage output
COMPLETE = ".complete"


def keep_extracted(tree: Path, archive_sha256: str, cache: Path) -> Path:
    """Move a freshly extracted ``tree`` into ``cache/<sha256[:16]>`` (one copy per archive, kept
    outside the stage outputs DVC versions) and return that folder; an existing copy is reused."""
    dest = cache / archive_sha256[:16]
    if not (dest / COMPLETE).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        (tree / COMPLETE).write_text(archive_sha256 + "\n")
        shutil.rmtree(dest, ignore_errors=True)  # an unfinished copy from an interrupted run
        try:
            tree.rename(dest)
        except OSError:  # another process finished the same copy first
            if not (dest / COMPLETE).is_file():
                raise
    return dest


def restore_extracted(archive: Path, archive_sha256: str, dest: Path) -> None:
    """Re-extract ``archive`` into ``dest`` (e.g. after ``dvc pull`` on another machine), refusing
    an archive that is not the one the dataset was prepared from."""
    if not Path(archive).is_file():
        raise DataError(
            f"the prepared dataset reads its images from {dest}, which is missing, and the archive it was "
            f"extracted from ({archive}) is not here either; bring the archive back or rerun `fadrm prepare`"
        )
    if sha256_file(Path(archive)) != archive_sha256:
        raise DataError(f"{archive} changed since the dataset was prepared from it; rerun `fadrm prepare`")
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        safe_extract(archive, scratch)
        keep_extracted(scratch, archive_sha256, dest.parent)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
