"""The instance spool: one file per received instance, written atomically.

Layout: ``<spool root>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Both UIDs are validated
by :func:`qgate.core.uids.clean_uid` before they become path components, so a path is made of
digits and dots only and cannot escape the root.

A file is first written to a hidden temporary file in its final folder and then renamed
over its final name (``os.replace`` is atomic within a file system), so a reader never sees
a partial instance.

Durability (``fsync``): the file is renamed first and then fsynced under its final name.
On a journaling file system (ext4, XFS, btrfs) the rename changed the file's inode, so
that one fsync commits the data *and* the new name in one journal transaction: one disk
flush per instance, which is what a receiver pays per C-STORE (Orthanc pays one
``fdatasync`` per instance too). ``fsync_directory`` adds the POSIX-strict fsync of the
folder after the rename, a second flush, for file systems without that guarantee (some
network file systems). A crash between rename and fsync can leave a partial file under
its final name; it was never acknowledged and has no row, and start-up recovery
(:mod:`qgate.receive.recover`) moves files it cannot read out of the spool.

Page cache (``drop_cache``, ``storage.drop_page_cache``): once a received file is
fsynced its pages are clean, and the spool is read once, later, by the scorer. Evicting
them right away (``POSIX_FADV_DONTNEED``) lets the next instance reuse memory the kernel
already holds instead of growing the cache. On a VM whose memory the host maps in on
first touch, growing the cache cost ~1 ms per 512 KB slice on the C-STORE path
(``benchmarks/RESULTS.md``). The same advice given right after the write, while the
pages are still dirty, starts their writeback without waiting (``start_writeback``):
the disk write then runs while the receive stage does its SQL, and the fsync mostly
waits for the journal commit alone.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

from qgate.core.uids import clean_uid

TMP_SUFFIX = ".tmp"

Buffer: TypeAlias = bytes | bytearray | memoryview


def spool_path(root: str | os.PathLike[str], series_uid: str, sop_uid: str) -> Path:
    """The spool file of one instance.

    Parameters
    ----------
    root : path-like
        The spool root (``Settings.spool_dir``).
    series_uid : str
        Series Instance UID. Required; validated.
    sop_uid : str
        SOP Instance UID. Required; validated.

    Raises
    ------
    ValueError
        If either UID is not a valid DICOM UID.
    """
    series = clean_uid(series_uid)
    sop = clean_uid(sop_uid)
    return Path(root) / series / f"{sop}.dcm"


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new, renamed or removed files) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path, *, fsync: bool) -> None:
    """Create ``path`` (and parents); with ``fsync``, make each new entry durable."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    if not missing:
        return
    path.mkdir(parents=True, exist_ok=True)
    if fsync:
        for created in reversed(missing):
            fsync_dir(created.parent)


def write_temp(
    path: Path, data: Buffer | Sequence[Buffer], *, fsync: bool, start_writeback: bool = False
) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` and return its path.

    ``data`` is one buffer or a sequence of buffers written back to back (the receive
    stage writes a header and the dataset as received, without joining them into a
    copy). The temporary file is hidden (``.NAME.XXXX.tmp``) and lives in ``path``'s
    folder so that :func:`publish` is a same-folder rename; :func:`publish` flushes it.
    ``fsync`` makes a folder created here durable. ``start_writeback`` hands the data to
    the disk now, without waiting (``POSIX_FADV_DONTNEED`` on dirty pages starts their
    writeback), so that the fsync in :func:`publish` finds it under way or done.
    """
    ensure_dir(path.parent, fsync=fsync)
    # Unique per writer thread (two associations may carry the same instance at once);
    # cheaper than mkstemp's random names, which matters on the C-STORE path.
    tmp = path.parent / f".{path.name}.{os.getpid()}-{threading.get_ident()}{TMP_SUFFIX}"
    parts = [data] if isinstance(data, Buffer) else data
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, views)
            if start_writeback:
                _dontneed(fd)
        finally:
            os.close(fd)
    except BaseException:
        discard(tmp)
        raise
    return tmp


def _write_all(fd: int, views: list[memoryview]) -> None:
    while views:
        written = os.writev(fd, views)
        while written and views:  # drop what went out; keep the rest of a short write
            if written >= len(views[0]):
                written -= len(views.pop(0))
            else:
                views[0] = views[0][written:]
                written = 0


def _dontneed(fd: int) -> None:
    """Evict a file's clean pages; for dirty ones, start their writeback (module docstring)."""
    if hasattr(os, "posix_fadvise"):  # not on macOS
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def fsync_file(path: Path, *, drop_cache: bool = False) -> None:
    """Flush a file's data and metadata to disk; with ``drop_cache``, then evict its
    now clean pages from the page cache (see the module docstring)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if drop_cache:
            _dontneed(fd)
    finally:
        os.close(fd)


def publish(
    tmp: Path, path: Path, *, fsync: bool, fsync_directory: bool = False, drop_cache: bool = False
) -> None:
    """Atomically rename ``tmp`` to ``path``; with ``fsync``, make both durable.

    The fsync comes after the rename, so that a journaling file system commits the data
    and the name in one flush (see the module docstring); ``fsync_directory`` also
    flushes the folder, for file systems that need it.
    """
    os.replace(tmp, path)
    if fsync:
        fsync_file(path, drop_cache=drop_cache)
        if fsync_directory:
            fsync_dir(path.parent)


def discard(tmp: Path) -> None:
    """Remove a temporary file if it is still there."""
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()


def write_atomic(
    path: str | os.PathLike[str], data: bytes, *, fsync: bool, fsync_directory: bool = False
) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, rename, optional fsync.

    Parameters
    ----------
    path : path-like
        Final file path; its folder is created if needed.
    data : bytes
        The complete file content.
    fsync : bool
        Flush the file (and its new name) after the rename.
    fsync_directory : bool
        Also flush the folder (POSIX-strict; see the module docstring).
    """
    path = Path(path)
    tmp = write_temp(path, data, fsync=fsync)
    try:
        publish(tmp, path, fsync=fsync, fsync_directory=fsync_directory)
    except BaseException:
        discard(tmp)
        raise
