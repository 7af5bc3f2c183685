"""The instance spool: one file per received instance, written atomically.

Layout: ``<spool root>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Both UIDs are validated
by :func:`qgate.uids.clean_uid` before they become path components, so a path is made of
digits and dots only and cannot escape the root.

A file is first written to a hidden temporary file in its final folder and then renamed
over its final name (``os.replace`` is atomic within a file system), so a reader never sees
a partial instance. With ``fsync`` the file is flushed before the rename and the folder
after it, so an acknowledged instance survives a power loss.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from qgate.uids import clean_uid

TMP_SUFFIX = ".tmp"


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


def write_temp(path: Path, data: bytes, *, fsync: bool) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` and return its path.

    The temporary file is hidden (``.NAME.XXXX.tmp``) and lives in ``path``'s folder so that
    :func:`publish` is a same-folder rename. With ``fsync`` its content is flushed to disk.
    """
    ensure_dir(path.parent, fsync=fsync)
    # Unique per writer thread (two associations may carry the same instance at once);
    # cheaper than mkstemp's random names, which matters on the C-STORE path.
    tmp = path.parent / f".{path.name}.{os.getpid()}-{threading.get_ident()}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        discard(tmp)
        raise
    return tmp


def publish(tmp: Path, path: Path, *, fsync: bool) -> None:
    """Atomically rename ``tmp`` to ``path``; with ``fsync``, flush the folder entry."""
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def discard(tmp: Path) -> None:
    """Remove a temporary file if it is still there."""
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()


def write_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, optional fsync, rename.

    Parameters
    ----------
    path : path-like
        Final file path; its folder is created if needed.
    data : bytes
        The complete file content.
    fsync : bool
        Flush the file before the rename and its folder after it.
    """
    path = Path(path)
    tmp = write_temp(path, data, fsync=fsync)
    try:
        publish(tmp, path, fsync=fsync)
    except BaseException:
        discard(tmp)
        raise
