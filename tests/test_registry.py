"""The model registry: versions, activation, rollback, checksums."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from qgate.registry import (
    RegistryError,
    activate,
    active_weights,
    list_versions,
    register_version,
    shipped_path,
)


def _weights(tmp_path: Path, name: str, payload: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(payload)
    return p


def test_activate_and_roll_back(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    with sessions() as s:
        assert active_weights(s)["mdiqa"].path == shipped_path("mdiqa")
        a = register_version(
            s,
            model="mdiqa",
            path=_weights(tmp_path, "a", b"A"),
            parent=None,
            data_snapshot={"verdicts_max_id": 0},
            metrics={"overall": 2.0},
        )
        s.commit()
        b = register_version(
            s,
            model="mdiqa",
            path=_weights(tmp_path, "b", b"B"),
            parent=a.version,
            data_snapshot={"verdicts_max_id": 3},
            metrics={"overall": 2.2},
        )
        s.commit()
        assert a.version != b.version
        activate(s, b.version)
        assert active_weights(s)["mdiqa"].version == b.version
        assert active_weights(s)["n2q"].version == "n2q-shipped"
        activate(s, a.version)  # rollback
        serving = active_weights(s)["mdiqa"]
        assert (serving.version, serving.path) == (a.version, (tmp_path / "a").resolve())
        assert [v.active for v in list_versions(s, "mdiqa")] == [True, False]


def test_tampered_or_unknown_versions_are_refused(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    with sessions() as s:
        path = _weights(tmp_path, "w", b"W")
        v = register_version(s, model="n2q", path=path, parent=None, data_snapshot={}, metrics={})
        s.commit()
        path.write_bytes(b"changed")
        with pytest.raises(RegistryError, match="checksum"):
            activate(s, v.version)
        with pytest.raises(RegistryError, match="no such"):
            activate(s, "n2q-nope")
        with pytest.raises(RegistryError, match="unknown model"):
            register_version(s, model="vgg", path=path, parent=None, data_snapshot={}, metrics={})
