"""Free space under ``storage.root`` against the ``storage.min_free_mb`` watermark.

The receive stage refuses new associations while space is low (a full disk would
otherwise show only as 0xA700 answers mid-series), and ``/healthz`` and ``/metrics``
report it. One ``statvfs`` call: cheap enough for every association request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qgate.core.config import Settings

MIB = 1024 * 1024


@dataclass(frozen=True)
class DiskSpace:
    """Free bytes where qgate writes, and the watermark they are held against."""

    path: Path
    free_bytes: int
    min_free_bytes: int

    @property
    def low(self) -> bool:
        return self.free_bytes < self.min_free_bytes

    @property
    def reason(self) -> str | None:
        """Why new associations are refused, or None while space suffices."""
        if not self.low:
            return None
        return (
            f"{self.free_bytes // MIB} MiB free under {self.path}, below "
            f"storage.min_free_mb {self.min_free_bytes // MIB}: new associations refused"
        )


def _existing(path: Path) -> Path:
    # Before the first start storage.root may not exist yet: measure the file system it
    # will be created on.
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_space(settings: Settings) -> DiskSpace:
    """Free space (for unprivileged users, as qgate runs) under ``storage.root``."""
    root = _existing(Path(settings.storage.root))
    st = os.statvfs(root)
    return DiskSpace(
        path=Path(settings.storage.root),
        free_bytes=st.f_bavail * st.f_frsize,
        min_free_bytes=settings.storage.min_free_mb * MIB,
    )
