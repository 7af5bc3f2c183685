"""Stopping the receive stage with associations open, against real pynetdicom peers.

SIGTERM to ``qgate receive`` (what ``qgate serve`` sends its receive stage on stop):
no new association is accepted, the open ones may go on for ``dicom.stop_grace_seconds``,
the rest are then aborted; every instance acknowledged is in the spool and recorded, and
every series' ``open_associations`` is back to 0.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings
from qgate.core.db.models import Event, Instance, Series
from qgate.receive import handlers, scp
from qgate.receive.drain import stop_server
from qgate.synth import make_ct_series
from tests.conftest import free_port
from tests.support.qgate_proc import QgateProcess


def _receiver(tmp_path: Path, *, grace: float, receivers: int = 1) -> QgateProcess:
    config: dict[str, Any] = {
        "dicom": {
            "ae_title": "QGATE",
            "host": "127.0.0.1",
            "port": free_port(),
            "receivers": receivers,
            "stop_grace_seconds": grace,
        },
        "series": {"stable_seconds": 3600, "release_grace_seconds": 3600},
        "database": {"url": f"sqlite:///{tmp_path / 'qgate.db'}"},
        "storage": {"root": str(tmp_path / "var"), "fsync": True, "min_free_mb": 0},
    }
    q = QgateProcess(tmp_path / "q", config, command=["receive"])
    q.cli("db", "upgrade")
    return q.start()


def _associate(q: QgateProcess) -> Association:
    ae = AE("MODALITY")
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", q.port, ae_title=q.ae_title)


def _stored(tmp_path: Path) -> tuple[set[str], set[str], list[int]]:
    """SOP Instance UIDs recorded, those in the spool, and each series' open associations."""
    engine = create_engine(f"sqlite:///{tmp_path / 'qgate.db'}")
    with engine.connect() as conn:
        rows = set(conn.execute(select(Instance.sop_instance_uid)).scalars())
        open_assocs = list(conn.execute(select(Series.open_associations)).scalars())
    engine.dispose()
    spooled = {p.stem for p in (tmp_path / "var" / "spool").rglob("*.dcm")}
    return {str(u) for u in rows}, spooled, open_assocs


@pytest.mark.parametrize("receivers", [1, 2])
def test_an_open_association_finishes_its_series_within_the_grace_period(
    tmp_path: Path, receivers: int
) -> None:
    q = _receiver(tmp_path, grace=30, receivers=receivers)
    series = make_ct_series(6, 64, 64, seed=5)
    assoc = _associate(q)
    assert assoc.is_established
    assert int(assoc.send_c_store(series[0]).Status) == 0
    assert q.proc is not None
    q.proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # every receiver process has stopped accepting
    late = _associate(q)
    assert not late.is_established  # no new association once stopping
    # The open one goes on: its series is stored, then it releases.
    assert [int(assoc.send_c_store(ds).Status) for ds in series[1:]] == [0] * 5
    assoc.release()
    released = time.monotonic()
    assert q.proc.wait(timeout=20) == 0
    assert time.monotonic() - released < 10  # the stop ends with the association, not later
    recorded, spooled, open_assocs = _stored(tmp_path)
    sent = {str(ds.SOPInstanceUID) for ds in series}
    assert recorded == spooled == sent
    assert open_assocs == [0]  # its release was recorded


def test_an_association_still_open_after_the_grace_period_is_aborted_losing_nothing(
    tmp_path: Path,
) -> None:
    """A sender that keeps sending past the grace period is aborted mid-stream. Every
    instance acknowledged is stored and recorded, and no instance is left written but
    unrecorded (the C-STORE in hand at the abort is finished, or was never written)."""
    grace = 1.0
    q = _receiver(tmp_path, grace=grace)
    assoc = _associate(q)
    assert assoc.is_established
    acked: list[str] = []
    failed: list[str] = []

    def stream() -> None:
        for k in range(10_000):
            ds = make_ct_series(1, 64, 64, seed=k, series_uid="1.2.826.0.1.3680043.8.498.1")[0]
            status = assoc.send_c_store(ds) if assoc.is_established else None
            if status is None or "Status" not in status or int(status.Status) != 0:
                failed.append(str(ds.SOPInstanceUID))
                return
            acked.append(str(ds.SOPInstanceUID))

    sender = threading.Thread(target=stream)
    sender.start()
    while len(acked) < 5:
        time.sleep(0.05)
    assert q.proc is not None
    signalled = time.monotonic()
    q.proc.send_signal(signal.SIGTERM)
    assert q.proc.wait(timeout=grace + 30) == 0
    stopped = time.monotonic() - signalled
    sender.join(timeout=30)
    assert not sender.is_alive() and failed and assoc.is_aborted
    assert stopped >= grace  # it kept receiving for the grace period
    assert "association(s) still open after dicom.stop_grace_seconds=1; aborted" in q.log()
    recorded, spooled, open_assocs = _stored(tmp_path)
    assert set(acked) <= recorded
    assert spooled == recorded  # no instance written without its row
    assert open_assocs == [0]  # the abort was recorded


def test_the_stop_abort_during_the_first_instance_of_a_new_series_leaves_no_open_count(
    settings: Settings, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop's abort lands while the association stores the first instance of a new
    series (held after it counted as new, before its commit): the abort's end handler
    closes the series already sent, the store then commits its increment and, finding
    the association ended, undoes it. No series stays counted as open."""
    storing, ended = threading.Event(), threading.Event()
    record, release = handlers.record_instance, scp.handle_release

    def held_record(*args: Any, **kw: Any) -> handlers.StoreOutcome:
        if kw["header"].series_instance_uid == second.SeriesInstanceUID:
            storing.set()
            assert ended.wait(10)  # the abort has ended the association
        return record(*args, **kw)

    def noted_release(*args: Any, **kw: Any) -> None:
        release(*args, **kw)
        ended.set()

    monkeypatch.setattr(handlers, "record_instance", held_record)
    monkeypatch.setattr(scp, "handle_release", noted_release)
    [first] = make_ct_series(1, 32, 32, seed=1)
    [second] = make_ct_series(1, 32, 32, seed=2)
    assert first.SeriesInstanceUID != second.SeriesInstanceUID
    server = scp.start_scp(settings, sessions)
    stopped = False
    try:
        ae = AE("MODALITY")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", settings.dicom.port, ae_title="QGATE")
        assert assoc.is_established
        assert int(assoc.send_c_store(first).Status) == 0
        sender = threading.Thread(target=assoc.send_c_store, args=(second,))
        sender.start()
        assert storing.wait(10)
        stop_server(server, grace_seconds=0)  # aborts, then waits for the store in hand
        stopped = True
        sender.join(10)
    finally:
        if not stopped:
            server.shutdown()
    assert assoc.is_aborted and not sender.is_alive()
    with sessions() as s:
        counts = dict(s.execute(select(Series.series_instance_uid, Series.open_associations)).all())
        trail = s.execute(select(Event.series_instance_uid, Event.event).order_by(Event.id)).all()
    assert counts == {first.SeriesInstanceUID: 0, second.SeriesInstanceUID: 0}
    ended_by = [(uid, ev) for uid, ev in trail if ev in ("aborted", "closed", "released")]
    assert len(ended_by) == 2
    ends = dict(ended_by)
    # The abort (or the socket thread's close, when it comes first) ends the first
    # series; the store that committed after the end closes the second itself.
    assert ends[first.SeriesInstanceUID] in ("aborted", "closed")
    assert ends[second.SeriesInstanceUID] == "closed"
