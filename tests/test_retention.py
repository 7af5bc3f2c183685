"""Retention (qgate.housekeeping.retention, ``qgate purge``) on SQLite and PostgreSQL: only what was
delivered goes; unsent, unscored and held series stay.

Series are scored by the real worker and sent by the real dispatcher to dcmtk's storescp.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qgate.cli import main
from qgate.core.config import ArchiveConfig, GateConfig, RetentionConfig, ScoringConfig, Settings
from qgate.core.db.models import Event, Instance, OutboxItem, Series, utcnow
from qgate.core.storage import to_local
from qgate.dispatch.dispatcher import run_once
from qgate.housekeeping.retention import run_purge
from tests.conftest import free_port
from tests.support.storescp import storescp
from tests.support.web import score_pending, spool_series

CLASSICAL = ScoringConfig(scorers=["noise", "snr"])


def _settings(settings: Settings, mode: str, port: int, **retention: object) -> Settings:
    return settings.model_copy(
        update={
            "gate": GateConfig(mode=mode),  # type: ignore[arg-type]
            "scoring": CLASSICAL,
            "archive": ArchiveConfig(host="127.0.0.1", port=port, timeout=10),
            "retention": RetentionConfig.model_validate(retention),
        }
    )


def _scored(settings: Settings, sessions: sessionmaker[Session], **kw: object) -> str:
    uid = spool_series(settings, sessions, n=3, size=64, **kw)  # type: ignore[arg-type]
    assert score_pending(settings, sessions) == ["scored"]
    return uid


def _spool_files(settings: Settings, sessions: sessionmaker[Session], uid: str) -> list[Path]:
    with sessions() as s:
        q = select(Instance.path).where(Instance.series_instance_uid == uid)
        return [to_local(p, settings.storage.root) for p in s.scalars(q)]


def _outgoing_files(settings: Settings, sessions: sessionmaker[Session], uid: str) -> list[Path]:
    with sessions() as s:
        q = select(OutboxItem.paths).where(
            OutboxItem.series_instance_uid == uid, OutboxItem.kind == "results"
        )
        return [to_local(p, settings.storage.root) for paths in s.scalars(q) for p in paths]


def _exist(paths: list[Path]) -> list[bool]:
    return [p.exists() for p in paths]


def test_only_delivered_originals_and_sent_results_are_purged(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    port = free_port()
    forward = _settings(settings, "forward", port, delivered_originals_days=0, sent_outgoing_days=0)
    gate = _settings(settings, "gate", port, delivered_originals_days=0, sent_outgoing_days=0)

    with storescp(port, tmp_path / "archive") as archive:
        delivered = _scored(forward, sessions, seed=1, patient_id="P1")
        assert run_once(forward, sessions, owner="test/dispatch") == 2  # results + originals
        received = len(list(archive.iterdir()))
    assert received == 3 + len(_outgoing_files(settings, sessions, delivered))

    unsent = _scored(forward, sessions, seed=2, patient_id="P2")  # never dispatched
    held = _scored(gate, sessions, seed=3, patient_id="P3", noise_hu=80.0)  # flagged: held
    unscored = spool_series(forward, sessions, n=2, size=64, seed=4, patient_id="P4")
    with sessions() as s:
        held_row = s.get(Series, held)
        assert held_row is not None and held_row.held
    keep = {u: _spool_files(settings, sessions, u) for u in (unsent, held, unscored)}
    keep_out = _outgoing_files(settings, sessions, unsent)
    gone = _spool_files(settings, sessions, delivered)
    gone_out = _outgoing_files(settings, sessions, delivered)
    assert all(_exist(gone + gone_out))

    # Too young at the default age of a day: nothing goes.
    young = forward.model_copy(update={"retention": RetentionConfig()})
    report = run_purge(young, sessions)
    assert (report.originals_series, report.outgoing_items) == (0, 0)
    assert all(_exist(gone + gone_out))

    dry = run_purge(forward, sessions, dry_run=True)
    assert (dry.originals_series, dry.originals_files, dry.outgoing_items) == (1, 3, 1)
    assert dry.originals_bytes == sum(p.stat().st_size for p in gone)
    assert all(_exist(gone + gone_out))

    report = run_purge(forward, sessions)
    assert (report.originals_series, report.originals_files, report.outgoing_items) == (1, 3, 1)
    assert not any(_exist(gone + gone_out))
    assert not (forward.spool_dir / delivered).exists()  # the emptied folder too
    for u, paths in keep.items():
        assert all(_exist(paths)), u
    assert all(_exist(keep_out))

    with sessions() as s:
        row = s.get(Series, delivered)
        assert row is not None and row.originals_purged_at is not None
        events = s.scalars(
            select(Event.event).where(
                Event.series_instance_uid == delivered, Event.stage == "retention"
            )
        ).all()
        assert sorted(events) == ["originals_purged", "outgoing_purged"]
        # The instance rows stay: the record of what was received.
        assert len(_spool_files(settings, sessions, delivered)) == 3

    again = run_purge(forward, sessions)
    assert (again.originals_series, again.outgoing_items) == (0, 0)


def test_observe_mode_purges_scored_originals_by_age_only(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    observe = _settings(settings, "observe", free_port(), scored_originals_days=0)
    uid = _scored(observe, sessions, seed=5)
    files = _spool_files(settings, sessions, uid)
    # In forward mode the same series is unsent: the observe-mode age does not apply.
    forward = observe.model_copy(update={"gate": GateConfig(mode="forward")})
    assert run_purge(forward, sessions).originals_series == 0
    assert all(_exist(files))
    assert run_purge(observe, sessions).originals_series == 1
    assert not any(_exist(files))


def test_event_rows_older_than_the_limit_are_deleted(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    now = utcnow()
    with sessions.begin() as s:
        for days in (400, 100, 1):
            s.add(Event(stage="test", event=f"old-{days}", at=now - dt.timedelta(days=days)))
    cfg = settings.model_copy(update={"retention": RetentionConfig(events_days=30)})
    report = run_purge(cfg, sessions, now=now)
    assert report.events == 2
    with sessions() as s:
        left = set(s.scalars(select(Event.event)))
    assert "old-1" in left and "old-100" not in left and "old-400" not in left
    assert "events_purged" in left


def test_qgate_purge_dry_run_changes_nothing(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    now = utcnow()
    with sessions.begin() as s:
        s.add(Event(stage="test", event="old", at=now - dt.timedelta(days=500)))
    config = tmp_path / "qgate.yaml"
    config.write_text(
        json.dumps(
            {
                "database": {"url": settings.database.url},
                "storage": {"root": str(settings.storage.root)},
                "retention": {"events_days": 365},
            }
        )
    )
    runner = CliRunner()
    dry = runner.invoke(main, ["purge", "--dry-run", "--json", "--config", str(config)])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["events"] == 1
    with sessions() as s:
        assert s.scalar(select(Event.id).where(Event.event == "old")) is not None
    real = runner.invoke(main, ["purge", "--config", str(config)])
    assert real.exit_code == 0, real.output
    assert "deleted" in real.output and "1 event rows" in real.output
    with sessions() as s:
        assert s.scalar(select(Event.id).where(Event.event == "old")) is None
