"""Paths in the SQL store are relative to ``storage.root``.

Every node mounts the shared storage root, but not necessarily at the same place: a path
in ``instances.path``, ``outbox.paths`` or ``results.sr_path`` is stored relative to the
root (``spool/<series>/<sop>.dcm``) and each node resolves it against its own
``storage.root``. A path outside the root (a row written before migration 0006 on a node
that did not say where its root was) stays absolute and resolves to itself.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath


def to_stored(path: str | os.PathLike[str], root: Path) -> str:
    """``path`` as the store keeps it: relative to ``root`` when under it, else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return PurePosixPath(absolute.relative_to(Path(os.path.abspath(root)))).as_posix()
    except ValueError:
        return str(absolute)


def to_local(stored: str, root: Path) -> Path:
    """The file a stored path names on this node (an absolute one is returned as is)."""
    return Path(os.path.abspath(root)) / stored
