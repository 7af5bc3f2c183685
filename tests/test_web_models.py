"""Activating (rolling back to) a model version from the web app, as ``qgate models
activate``: admins only, CSRF-protected, audited. The real app; SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings
from qgate.core.db.models import AuditEntry, ModelVersion
from qgate.core.registry import activate, register_version
from qgate.web.app import create_app
from tests.support.web import add_user, csrf_from, login

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def versions(settings: Settings, sessions: sessionmaker[Session]) -> tuple[str, str]:
    """Two MD-IQA versions under the storage root (stored relative to it); the newer
    one serves."""
    names = []
    root = settings.storage.root
    (root / "models").mkdir(parents=True, exist_ok=True)
    with sessions() as s:
        for i in range(2):
            weights = root / "models" / f"mdiqa-{i}.safetensors"
            weights.write_bytes(f"weights {i}".encode())
            row = register_version(
                s,
                root=root,
                model="mdiqa",
                path=weights,
                parent=names[-1] if names else None,
                data_snapshot={},
                metrics={},
                now=T0 + dt.timedelta(days=i),
            )
            names.append(row.version)
        s.commit()
        activate(s, names[1], root=root)
    return names[0], names[1]


@pytest.fixture
def client(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[TestClient]:
    add_user(sessions, "rad", "radiologist")
    add_user(sessions, "boss", "admin")
    with TestClient(create_app(settings, sessions)) as c:
        yield c


def _active(sessions: sessionmaker[Session]) -> list[str]:
    with sessions() as s:
        q = select(ModelVersion.version).where(ModelVersion.active.is_(True))
        return list(s.scalars(q))


def _audits(sessions: sessionmaker[Session]) -> list[AuditEntry]:
    with sessions() as s:
        q = select(AuditEntry).where(AuditEntry.action == "model_activate")
        return list(s.scalars(q.order_by(AuditEntry.id)))


def test_admin_rolls_back_to_an_older_version_audited(
    client: TestClient, sessions: sessionmaker[Session], versions: tuple[str, str]
) -> None:
    old, new = versions
    assert _active(sessions) == [new]
    csrf = login(client, "boss")
    r = client.post(f"/api/models/{old}/activate", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"], body["previous"]) == ("mdiqa", old, new)
    assert body["activated_at"]
    assert _active(sessions) == [old]  # the newer one no longer serves
    [entry] = _audits(sessions)
    assert entry.username == "boss" and entry.user_id is not None
    assert entry.detail == {"model": "mdiqa", "version": old, "previous": new}
    assert entry.remote_addr
    # And it is in the admin's audit log.
    log = client.get("/api/audit", params={"action": "model_activate"}).json()
    assert [i["detail"]["version"] for i in log["items"]] == [old]


def test_a_radiologist_may_not_activate(
    client: TestClient, sessions: sessionmaker[Session], versions: tuple[str, str]
) -> None:
    old, new = versions
    csrf = login(client, "rad")
    r = client.post(f"/api/models/{old}/activate", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 403
    assert _active(sessions) == [new]
    assert _audits(sessions) == []


def test_unknown_version_is_404_and_not_audited(
    client: TestClient, sessions: sessionmaker[Session], versions: tuple[str, str]
) -> None:
    csrf = login(client, "boss")
    r = client.post(
        "/api/models/mdiqa-19990101000000-deadbeef/activate", headers={"X-CSRF-Token": csrf}
    )
    assert r.status_code == 404
    assert "no such model version" in r.json()["detail"]
    assert _active(sessions) == [versions[1]]
    assert _audits(sessions) == []


def test_without_the_csrf_token_nothing_changes(
    client: TestClient, sessions: sessionmaker[Session], versions: tuple[str, str]
) -> None:
    old, new = versions
    login(client, "boss")
    assert client.post(f"/api/models/{old}/activate").status_code == 403
    r = client.post(f"/api/models/{old}/activate", headers={"X-CSRF-Token": "forged"})
    assert r.status_code == 403
    assert _active(sessions) == [new]
    assert _audits(sessions) == []


def test_not_logged_in_is_refused(
    client: TestClient, sessions: sessionmaker[Session], versions: tuple[str, str]
) -> None:
    token = csrf_from(client.get("/login").text)
    r = client.post(f"/api/models/{versions[0]}/activate", headers={"X-CSRF-Token": token})
    assert r.status_code == 401
    assert _active(sessions) == [versions[1]]


def test_weights_that_do_not_match_are_409_and_the_audit_row_rolls_back(
    client: TestClient,
    settings: Settings,
    sessions: sessionmaker[Session],
    versions: tuple[str, str],
) -> None:
    old, new = versions
    with sessions() as s:
        path = s.scalar(select(ModelVersion.path).where(ModelVersion.version == old))
    assert path == "models/mdiqa-0.safetensors"  # relative to the storage root
    (settings.storage.root / path).write_bytes(b"tampered")
    csrf = login(client, "boss")
    r = client.post(f"/api/models/{old}/activate", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 409
    assert "checksum" in r.json()["detail"]
    assert _active(sessions) == [new]
    assert _audits(sessions) == []


def test_training_page_activate_button_for_admins_only(
    client: TestClient,
    settings: Settings,
    sessions: sessionmaker[Session],
    versions: tuple[str, str],
) -> None:
    old, new = versions
    rad = TestClient(create_app(settings, sessions))
    rad_csrf = login(rad, "rad")
    page = rad.get("/training")
    assert page.status_code == 200
    assert old in page.text and new in page.text  # both versions are listed
    assert "/activate" not in page.text
    r = rad.post(
        f"/training/models/{old}/activate", data={"csrf_token": rad_csrf}, follow_redirects=False
    )
    assert r.status_code == 403
    assert _active(sessions) == [new]

    login(client, "boss")
    page = client.get("/training").text
    action = f'action="/training/models/{old}/activate"'
    assert action in page
    assert f'action="/training/models/{new}/activate"' not in page  # already serving
    # The form's own token is what the button sends.
    form = page[page.index(action) :]
    r = client.post(
        f"/training/models/{old}/activate",
        data={"csrf_token": csrf_from(form)},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/training"
    assert _active(sessions) == [old]
    assert [a.username for a in _audits(sessions)] == ["boss"]
    assert f"mdiqa: now serving {old} (was {new})." in client.get("/training").text
    # Without the token the form post is refused.
    r = client.post(f"/training/models/{new}/activate", data={}, follow_redirects=False)
    assert r.status_code == 403
    assert _active(sessions) == [old]
