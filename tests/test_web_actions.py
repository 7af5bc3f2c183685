"""The review app's operator actions on a series whose scoring failed, on SQLite and
PostgreSQL: it is on the worklist with its error, and release, rescore and resubmit work
from the API and the pages, each audited with its event rows.

The series is really received into the spool, really fails in the worker (its pixel data
cannot be decoded), and its release is really sent by the dispatcher, to an address where
no archive listens, so that the send becomes a dead letter to resubmit.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import ArchiveConfig, DispatchConfig, GateConfig, Settings
from qgate.core.db.models import AuditEntry, Event, OutboxItem, Series
from qgate.dispatch import run_once
from qgate.web.app import create_app
from tests.conftest import free_port
from tests.support.dicomfiles import undecodable_ct_series
from tests.support.web import add_user, login, score_pending, spool_series


@pytest.fixture
def gate_settings(settings: Settings) -> Settings:
    """Gate mode (on_failure: hold, its default); the archive is down, sends die at once."""
    return settings.model_copy(
        update={
            "gate": GateConfig(mode="gate"),
            "archive": ArchiveConfig(ae_title="ARCHIVE", host="127.0.0.1", port=free_port()),
            "dispatch": DispatchConfig(max_attempts=1, poll_seconds=0.1),
        }
    )


@pytest.fixture
def client(gate_settings: Settings, sessions: sessionmaker[Session]) -> Iterator[TestClient]:
    add_user(sessions, "rad", "radiologist")
    with TestClient(create_app(gate_settings, sessions)) as c:
        yield c


def _trail(sessions: sessionmaker[Session], uid: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(audit rows as (user, action), event rows as "stage event: detail") of one series."""
    with sessions() as s:
        audit = s.scalars(
            select(AuditEntry).where(AuditEntry.series_instance_uid == uid).order_by(AuditEntry.id)
        )
        events = s.scalars(select(Event).where(Event.series_instance_uid == uid).order_by(Event.id))
        return [(a.username, a.action) for a in audit], [
            f"{e.stage} {e.event}: {e.detail}" for e in events
        ]


def test_failed_series_is_listed_released_rescored_and_resubmitted_from_the_web(
    client: TestClient, gate_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    uid = spool_series(gate_settings, sessions, datasets=undecodable_ct_series(3, seed=21))
    assert score_pending(gate_settings, sessions) == ["parked"]
    token = login(client, "rad")
    headers = {"X-CSRF-Token": token}

    # On the default worklist (flagged or failed), held, with its error.
    [item] = [
        i for i in client.get("/api/series").json()["items"] if i["series_instance_uid"] == uid
    ]
    assert (item["status"], item["held"], item["decision"]) == ("failed", True, None)
    assert item["error"].startswith("SeriesLoadError: no CT slice could be decoded")
    assert item["reasons"] == [f"scoring failed: {item['error']}"]
    assert item["skipped_parts"] == []
    assert "scoring failed: SeriesLoadError" in client.get("/").text
    page = client.get(f"/series/{uid}").text
    assert "Scoring failed, so the originals are held back" in page
    assert "Release to archive" in page and "Score again" in page
    assert "Resubmit failed sends" not in page

    # Rescore (API): the parked job is requeued; a second request while it waits is refused.
    r = client.post(f"/api/series/{uid}/rescore", headers=headers)
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    again = client.post(f"/api/series/{uid}/rescore", headers=headers)
    assert again.status_code == 409 and "already queued" in again.json()["detail"]
    assert score_pending(gate_settings, sessions) == ["parked"]  # still undecodable
    with sessions() as s:
        series = s.get(Series, uid)
        assert series is not None and (series.status, series.held) == ("failed", True)

    # Release (the page's form): the originals are queued for the archive.
    r = client.post(f"/series/{uid}/release", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303
    assert "Released to the archive: 3 instances queued" in client.get(f"/series/{uid}").text
    assert client.post(f"/api/series/{uid}/release", headers=headers).status_code == 409

    # The archive is down: the send dies, and is resubmitted from the API.
    run_once(gate_settings, sessions, owner="test/dispatch")
    with sessions() as s:
        [send] = s.scalars(select(OutboxItem).where(OutboxItem.series_instance_uid == uid))
        assert (send.kind, send.state) == ("forward", "dead")
    assert "1 send(s) to the archive failed for good" in client.get(f"/series/{uid}").text
    r = client.post(f"/api/series/{uid}/resubmit", headers=headers)
    assert r.status_code == 200 and r.json() == {"series_instance_uid": uid, "resubmitted": 1}
    with sessions() as s:
        assert s.get(OutboxItem, send.id).state == "pending"  # type: ignore[union-attr]
    none_dead = client.post(f"/api/series/{uid}/resubmit", headers=headers)
    assert none_dead.status_code == 409
    # And once more from the page's button, after it died again.
    run_once(gate_settings, sessions, owner="test/dispatch")
    r = client.post(f"/series/{uid}/resubmit", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303
    assert "Resubmitted 1 failed send(s)" in client.get(f"/series/{uid}").text

    # Unknown series: 404, nothing audited.
    for action in ("rescore", "resubmit", "release"):
        assert client.post(f"/api/series/1.2.3/{action}", headers=headers).status_code == 404

    audit, events = _trail(sessions, uid)
    assert audit == [
        ("rad", "rescore"),
        ("rad", "release"),
        ("rad", "resubmit"),
        ("rad", "resubmit"),
    ]
    assert f"queue rescore: job {job_id} by rad" in events
    assert "gate held: scoring failed; held until released (gate.on_failure: hold)" in events
    assert "gate released: by rad" in events
    assert sum(e.startswith("dispatch resubmitted") for e in events) == 2
    with sessions() as s:
        entry = s.scalar(select(AuditEntry).where(AuditEntry.action == "rescore"))
        assert entry is not None and entry.detail == {"job_id": job_id, "generation": 0}
        assert entry.remote_addr == "testclient"
