"""The model registry: versions, activation, rollback, checksums."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.registry import (
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
        assert active_weights(s, root=tmp_path)["mdiqa"].path == shipped_path("mdiqa")
        a = register_version(
            s,
            root=tmp_path,
            model="mdiqa",
            path=_weights(tmp_path, "a", b"A"),
            parent=None,
            data_snapshot={"verdicts_max_id": 0},
            metrics={"overall": 2.0},
        )
        s.commit()
        b = register_version(
            s,
            root=tmp_path,
            model="mdiqa",
            path=_weights(tmp_path, "b", b"B"),
            parent=a.version,
            data_snapshot={"verdicts_max_id": 3},
            metrics={"overall": 2.2},
        )
        s.commit()
        assert a.version != b.version
        activate(s, b.version, root=tmp_path)
        assert active_weights(s, root=tmp_path)["mdiqa"].version == b.version
        assert active_weights(s, root=tmp_path)["n2q"].version == "n2q-shipped"
        activate(s, a.version, root=tmp_path)  # rollback
        serving = active_weights(s, root=tmp_path)["mdiqa"]
        assert (serving.version, serving.path) == (a.version, (tmp_path / "a").resolve())
        assert [v.active for v in list_versions(s, "mdiqa")] == [True, False]


def test_tampered_or_unknown_versions_are_refused(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    with sessions() as s:
        path = _weights(tmp_path, "w", b"W")
        v = register_version(
            s, root=tmp_path, model="n2q", path=path, parent=None, data_snapshot={}, metrics={}
        )
        s.commit()
        path.write_bytes(b"changed")
        with pytest.raises(RegistryError, match="checksum"):
            activate(s, v.version, root=tmp_path)
        with pytest.raises(RegistryError, match="no such"):
            activate(s, "n2q-nope", root=tmp_path)
        with pytest.raises(RegistryError, match="unknown model"):
            register_version(
                s, root=tmp_path, model="vgg", path=path, parent=None, data_snapshot={}, metrics={}
            )


def test_paths_are_stored_relative_and_resolved_on_each_node(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A version under the storage root is stored relative to it, the shipped weights as
    ``shipped:<file>``; a node that mounts the shared storage elsewhere finds both."""
    root, other = tmp_path / "var", tmp_path / "mnt"
    weights = root / "models" / "run-1" / "mdiqa.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"trained")
    with sessions() as s:
        trained = register_version(
            s, root=root, model="mdiqa", path=weights, parent=None, data_snapshot={}, metrics={}
        )
        shipped = register_version(
            s,
            root=root,
            model="n2q",
            path=shipped_path("n2q"),
            parent=None,
            data_snapshot={},
            metrics={},
        )
        s.commit()
        assert trained.path == "models/run-1/mdiqa.safetensors"
        assert shipped.path == "shipped:n2q.safetensors"
        root.rename(other)  # the same shared storage, mounted elsewhere on another node
        activate(s, trained.version, root=other)
        activate(s, shipped.version, root=other)
        serving = active_weights(s, root=other)
    assert serving["mdiqa"].path == other / "models" / "run-1" / "mdiqa.safetensors"
    assert serving["n2q"].path == shipped_path("n2q")
