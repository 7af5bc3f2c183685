"""Test data for the review app: really scored series, users, a logged-in client.

A series is written with :mod:`qgate.synth` into the spool with the rows the receive stage
would have written, then completed and scored by the real assembler and worker, so the
results, SR and quality-map files are the genuine article.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from sqlalchemy.orm import Session, sessionmaker

from qgate.assemble.completion import queue_complete_series
from qgate.core.config import Settings
from qgate.core.db.models import Instance, Series, utcnow
from qgate.score.pipeline import build_scorers
from qgate.score.worker import work_once
from qgate.synth import make_ct_series
from qgate.web.users import create_user

PASSWORD = "correct horse battery"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def spool_series(
    settings: Settings,
    sessions: sessionmaker[Session],
    *,
    n: int = 6,
    size: int = 128,
    noise_hu: float = 12.0,
    seed: int = 0,
    calling_aet: str = "CT_SCANNER_1",
    patient_name: str = "Test^Phantom",
    patient_id: str = "QG-0001",
    received_at: dt.datetime | None = None,
    datasets: list[Dataset] | None = None,
) -> str:
    """Put a synthetic CT series (or ``datasets``) in the spool with its rows, as received.
    Returns its UID."""
    if datasets is None:
        datasets = make_ct_series(
            n,
            size,
            size,
            noise_hu=noise_hu,
            seed=seed,
            patient_name=patient_name,
            patient_id=patient_id,
        )
    n = len(datasets)
    first = datasets[0]
    uid = str(first.SeriesInstanceUID)
    folder = settings.spool_dir / uid
    folder.mkdir(parents=True, exist_ok=True)
    when = received_at or utcnow()
    with sessions.begin() as s:
        s.add(
            Series(
                series_instance_uid=uid,
                study_instance_uid=str(first.StudyInstanceUID),
                patient_id=patient_id,
                patient_name=patient_name,
                study_date=str(first.StudyDate),
                series_description=str(first.SeriesDescription),
                modality="CT",
                calling_aet=calling_aet,
                status="receiving",
                instance_count=n,
                first_received_at=when,
                last_received_at=when,
            )
        )
        s.flush()
        for k, ds in enumerate(datasets):
            buf = DicomBytesIO()
            ds.save_as(buf, enforce_file_format=True)
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            path.write_bytes(buf.getvalue())
            s.add(
                Instance(
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    series_instance_uid=uid,
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    path=str(path.absolute()),
                    size=len(buf.getvalue()),
                    calling_aet=calling_aet,
                    instance_number=k + 1,
                    received_at=when,
                )
            )
    return uid


def score_pending(settings: Settings, sessions: sessionmaker[Session]) -> list[str]:
    """Complete every spooled series and score it with the real worker; the outcomes."""
    queue_complete_series(sessions, settings.series, now=utcnow() + dt.timedelta(days=1))
    scorers = build_scorers(settings)
    outcomes = []
    while (outcome := work_once(settings, sessions, scorers, owner="test/web")) is not None:
        outcomes.append(outcome)
    return outcomes


def scored_series(settings: Settings, sessions: sessionmaker[Session], **kw: Any) -> str:
    uid = spool_series(settings, sessions, **kw)
    assert score_pending(settings, sessions) == ["scored"]
    return uid


def add_user(sessions: sessionmaker[Session], username: str, role: str) -> None:
    with sessions() as s:
        create_user(s, username=username, password=PASSWORD, role=role, by="test")
        s.commit()


def csrf_from(html: str) -> str:
    m = _CSRF.search(html)
    assert m is not None, "no CSRF field in the page"
    return m.group(1)


def login(client: Any, username: str, password: str = PASSWORD) -> str:
    """Log ``client`` (a TestClient) in through the form; returns the session's CSRF token."""
    token = csrf_from(client.get("/login").text)
    r = client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": token, "next": "/"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    return str(client.get("/api/me").json()["csrf_token"])
