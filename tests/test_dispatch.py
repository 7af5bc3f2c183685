"""Dispatch: the outbox state machine, the C-STORE SCU, and delivery to a real Orthanc.

Orthanc is the real archive (``tests/support/orthanc.py``); a small in-process pynetdicom
SCP counts TCP connections, associations and C-STOREs where the test needs to see (or
refuse) exactly what arrives.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE, evt
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import ArchiveConfig, DispatchConfig, Settings
from qgate.core.db.models import Event, OutboxItem
from qgate.dispatch import (
    Destination,
    Dispatcher,
    RetryPolicy,
    claim_due,
    enqueue,
    list_items,
    mark_failed,
    mark_sent,
    retry,
    run_once,
    send_files,
)
from qgate.synth import make_ct_series, write_series
from tests.conftest import free_port
from tests.support.orthanc import Orthanc, orthanc, start_orthanc

__all__ = ["orthanc"]  # the fixture, imported for pytest

BACKOFF = re.compile(r"next in ([\d.]+) s")


# -- helpers -------------------------------------------------------------------------------


def dispatch_settings(
    settings: Settings,
    *,
    port: int,
    max_attempts: int = 8,
    initial: float = 0.1,
    maximum: float = 1.0,
    ae_title: str = "ARCHIVE",
) -> Settings:
    return settings.model_copy(
        update={
            "archive": ArchiveConfig(ae_title=ae_title, host="127.0.0.1", port=port, timeout=5),
            "dispatch": DispatchConfig(
                max_attempts=max_attempts,
                backoff_initial_seconds=initial,
                backoff_max_seconds=maximum,
                poll_seconds=0.05,
            ),
        }
    )


def series_files(folder: Path, n: int = 4, **kw: object) -> tuple[str, list[str], list[str]]:
    """A small synthetic CT series on disk: (series UID, paths, SOP Instance UIDs)."""
    datasets = make_ct_series(n, 48, 48, **kw)  # type: ignore[arg-type]
    paths = [str(p) for p in write_series(datasets, folder)]
    return datasets[0].SeriesInstanceUID, paths, [d.SOPInstanceUID for d in datasets]


def add_item(
    sessions: sessionmaker[Session], settings: Settings, series_uid: str, paths: list[str]
) -> int:
    with sessions() as s:
        item = enqueue(
            s,
            series_uid=series_uid,
            kind="results",
            paths=paths,
            dest=Destination.from_settings(settings.archive),
        )
        s.commit()
        return item.id


def get_item(sessions: sessionmaker[Session], item_id: int) -> OutboxItem:
    with sessions() as s:
        item = s.get(OutboxItem, item_id)
        assert item is not None
        return item


def events(sessions: sessionmaker[Session], name: str | None = None) -> list[Event]:
    with sessions() as s:
        q = select(Event).where(Event.stage == "dispatch").order_by(Event.id)
        if name:
            q = q.where(Event.event == name)
        return list(s.scalars(q))


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class CountingSCP:
    """A pynetdicom storage SCP that counts connections, associations and C-STOREs."""

    port: int
    connections: int = 0
    associations: int = 0
    stored: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> syntax
    statuses: dict[str, int] = field(default_factory=dict)  # answers other than 0x0000
    delay: float = 0.0  # seconds each C-STORE takes
    dest: Destination = field(init=False)

    def __post_init__(self) -> None:
        self.dest = Destination("COUNTER", "127.0.0.1", self.port)
        self._lock = threading.Lock()

    def on_conn(self, event: evt.Event) -> None:
        with self._lock:
            self.connections += 1

    def on_established(self, event: evt.Event) -> None:
        with self._lock:
            self.associations += 1

    def on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        time.sleep(self.delay)
        with self._lock:
            self.stored[uid] = str(event.context.transfer_syntax)
        return self.statuses.get(uid, 0x0000)


@pytest.fixture
def counting_scp() -> Iterator[Callable[..., CountingSCP]]:
    """Factory: ``counting_scp(syntaxes=[...], sop_classes=[...], called_aet=None)``."""
    servers = []

    def start(
        syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
        sop_classes: tuple[str, ...] = (CTImageStorage,),
        require_called_aet: bool = False,
    ) -> CountingSCP:
        scp = CountingSCP(free_port())
        ae = AE(ae_title="COUNTER")
        ae.require_called_aet = require_called_aet
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, list(syntaxes))
        handlers = [
            (evt.EVT_CONN_OPEN, scp.on_conn),
            (evt.EVT_ESTABLISHED, scp.on_established),
            (evt.EVT_C_STORE, scp.on_store),
        ]
        servers.append(ae.start_server(("127.0.0.1", scp.port), block=False, evt_handlers=handlers))
        return scp

    yield start
    for server in servers:
        server.shutdown()


# -- (a) a series through the outbox into Orthanc ------------------------------------------


def test_series_through_outbox_reaches_orthanc(
    orthanc: Orthanc, settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    cfg = dispatch_settings(settings, port=orthanc.dicom_port)
    series_uid, paths, uids = series_files(tmp_path / "series", n=6)
    item_id = add_item(sessions, cfg, series_uid, paths)

    assert run_once(cfg, sessions, owner="node/dispatch") == 1

    item = get_item(sessions, item_id)
    assert (item.state, item.attempts, item.last_error) == ("sent", 1, None)
    assert item.sent_at is not None and item.lease_owner is None
    assert orthanc.sop_instance_uids(series_uid) == set(uids)
    # (d) one association for the whole series, as Orthanc saw it
    assert orthanc.associations_received() == 1
    assert [e.event for e in events(sessions)] == ["enqueued", "claimed", "sent"]
    assert run_once(cfg, sessions, owner="node/dispatch") == 0


# -- (b) archive down, then up ---------------------------------------------------------------


def test_archive_down_then_up_retries_with_backoff(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    port = free_port()
    cfg = dispatch_settings(settings, port=port, max_attempts=10, initial=0.2, maximum=0.8)
    series_uid, paths, uids = series_files(tmp_path / "series")
    item_id = add_item(sessions, cfg, series_uid, paths)

    dispatcher = Dispatcher(cfg, sessions, owner="node/dispatch")
    dispatcher.start()
    archive: Orthanc | None = None
    try:
        wait_for(lambda: get_item(sessions, item_id).attempts >= 3, 10, "three failed attempts")
        down = get_item(sessions, item_id)
        assert down.state in ("pending", "sending")
        assert "could not associate" in (down.last_error or "")
        archive = start_orthanc(tmp_path / "orthanc", dicom_port=port, http_port=free_port())
        wait_for(lambda: get_item(sessions, item_id).state == "sent", 10, "delivery")
    finally:
        dispatcher.stop()
        dispatcher.join(timeout=10)
        if archive is not None:
            assert archive.sop_instance_uids(series_uid) == set(uids)
            archive.stop(kill=True)
    assert not dispatcher.is_alive()

    item = get_item(sessions, item_id)
    claims = events(sessions, "claimed")
    retries = events(sessions, "retry_scheduled")
    assert 4 <= item.attempts <= 10
    assert len(claims) == item.attempts and len(retries) == item.attempts - 1
    assert item.last_error is None and len(events(sessions, "sent")) == 1
    # The backoff doubles from 0.2 s and is capped at 0.8 s ...
    delays = [float(m.group(1)) for e in retries if (m := BACKOFF.search(e.detail or ""))]
    assert len(delays) == len(retries)
    assert delays == [min(0.2 * 2**i, 0.8) for i in range(len(delays))]
    # ... and each claim waited at least that long after the failure before it.
    for failure, next_claim, delay in zip(retries, claims[1:], delays, strict=True):
        assert (next_claim.at - failure.at).total_seconds() >= delay - 0.05


# -- (c) dead letter, then resubmitted -------------------------------------------------------


def test_dead_letter_after_max_attempts_then_retry_delivers(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    port = free_port()
    cfg = dispatch_settings(settings, port=port, max_attempts=3, initial=0.05, maximum=0.05)
    series_uid, paths, uids = series_files(tmp_path / "series")
    item_id = add_item(sessions, cfg, series_uid, paths)

    deadline = time.monotonic() + 10
    while get_item(sessions, item_id).state != "dead":
        assert time.monotonic() < deadline, "never dead-lettered"
        run_once(cfg, sessions, owner="node/dispatch")
        time.sleep(0.06)

    dead = get_item(sessions, item_id)
    assert dead.attempts == 3
    assert "could not associate with ARCHIVE@127.0.0.1" in (dead.last_error or "")
    assert len(events(sessions, "claimed")) == 3
    assert len(events(sessions, "retry_scheduled")) == 2
    [dead_event] = events(sessions, "dead")
    assert "after 3 attempt(s)" in (dead_event.detail or "")
    assert run_once(cfg, sessions, owner="node/dispatch") == 0  # dead letters stay put
    with sessions() as s:
        assert [i.id for i in list_items(s, "dead")] == [item_id]
        assert retry(s, ids=[item_id + 1000]) == 0  # unknown id: nothing

    with start_orthanc(tmp_path / "orthanc", dicom_port=port, http_port=free_port()) as archive:
        with sessions() as s:
            assert retry(s) == 1
        resubmitted = get_item(sessions, item_id)
        assert (resubmitted.state, resubmitted.attempts) == ("pending", 0)
        assert run_once(cfg, sessions, owner="node/dispatch") == 1
        assert archive.sop_instance_uids(series_uid) == set(uids)
        archive.stop(kill=True)

    item = get_item(sessions, item_id)
    assert (item.state, item.attempts, item.last_error) == ("sent", 1, None)
    assert len(events(sessions, "resubmitted")) == 1


# -- (d) one association per send --------------------------------------------------------------


def test_one_association_per_send_and_per_item(
    counting_scp: Callable[..., CountingSCP],
    settings: Settings,
    sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    scp = counting_scp()
    _, paths, uids = series_files(tmp_path / "a", n=5)
    result = send_files(paths, scp.dest, calling_aet="QGATE", timeout=5)
    assert result.ok, result.summary()
    assert (result.associations, result.stored_count) == (1, 5)
    assert (scp.connections, scp.associations) == (1, 1)
    assert set(scp.stored) == set(uids)

    # Through the outbox: two items (say results + forward) -> exactly two more associations.
    cfg = dispatch_settings(settings, port=scp.port, ae_title="COUNTER")
    series_b, paths_b, uids_b = series_files(tmp_path / "b", n=3)
    add_item(sessions, cfg, series_b, paths_b)
    add_item(sessions, cfg, series_b, paths)
    assert run_once(cfg, sessions, owner="node/dispatch") == 2
    assert (scp.connections, scp.associations) == (3, 3)
    assert set(scp.stored) == set(uids) | set(uids_b)


# -- presentation contexts, statuses, rejection ------------------------------------------------


def test_contexts_fall_back_to_what_the_archive_accepts(
    counting_scp: Callable[..., CountingSCP], tmp_path: Path
) -> None:
    datasets = make_ct_series(3, 48, 48)
    datasets[1].compress(RLELossless, generate_instance_uid=False)
    mr = datasets[2]
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    paths = write_series(datasets, tmp_path / "mixed")
    ct_uid, rle_uid, mr_uid = (str(d.SOPInstanceUID) for d in datasets)

    # Implicit VR only: the explicit file is re-encoded, the RLE file decompressed (same
    # SOP Instance UID), the MR file has no context and fails alone; one association.
    implicit_only = counting_scp(syntaxes=(ImplicitVRLittleEndian,))
    result = send_files(paths, implicit_only.dest, calling_aet="QGATE", timeout=5)
    assert implicit_only.stored == {
        ct_uid: ImplicitVRLittleEndian,
        rle_uid: ImplicitVRLittleEndian,
    }
    assert not result.ok and result.stored_count == 2 and implicit_only.associations == 1
    [failed] = result.failed
    assert failed.sop_instance_uid == mr_uid
    assert "no presentation context for MR Image Storage" in failed.message

    # An archive that takes RLE gets the compressed original as it is.
    rle_ok = counting_scp(syntaxes=(RLELossless, ExplicitVRLittleEndian))
    result = send_files(paths[:2], rle_ok.dest, calling_aet="QGATE", timeout=5)
    assert result.ok, result.summary()
    assert rle_ok.stored == {ct_uid: ExplicitVRLittleEndian, rle_uid: RLELossless}


def test_warning_statuses_count_as_stored_failures_do_not(
    counting_scp: Callable[..., CountingSCP], tmp_path: Path
) -> None:
    scp = counting_scp()
    _, paths, uids = series_files(tmp_path / "s", n=5)
    scp.statuses = {uids[1]: 0xB000, uids[2]: 0xB007, uids[3]: 0xA700, uids[4]: 0xC123}
    result = send_files(paths, scp.dest, calling_aet="QGATE", timeout=5)
    assert [f.stored for f in result.files] == [True, True, True, False, False]
    assert [f.status for f in result.files] == [0x0000, 0xB000, 0xB007, 0xA700, 0xC123]
    assert "0xA700 (Failure: Refused: Out of Resources)" in result.files[3].message
    assert not result.ok and scp.associations == 1
    assert "3/5 stored on COUNTER@127.0.0.1" in result.summary()


def test_rejected_association_is_a_clear_failure(
    counting_scp: Callable[..., CountingSCP], tmp_path: Path
) -> None:
    scp = counting_scp(require_called_aet=True)
    _, paths, _ = series_files(tmp_path / "s", n=2)
    wrong = Destination("NOT-COUNTER", "127.0.0.1", scp.port)
    result = send_files(paths, wrong, calling_aet="QGATE", timeout=5)
    assert not result.ok and result.stored_count == 0
    assert result.error is not None
    assert result.error.startswith("association rejected by NOT-COUNTER@127.0.0.1")
    assert "Called AE title not recognised" in result.error
    assert all(f.message == "not sent" for f in result.files)


# -- (e) leases ----------------------------------------------------------------------------------


def test_expired_lease_is_reclaimed(
    counting_scp: Callable[..., CountingSCP],
    settings: Settings,
    sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    scp = counting_scp()
    cfg = dispatch_settings(settings, port=scp.port, ae_title="COUNTER")
    series_uid, paths, uids = series_files(tmp_path / "s", n=2)
    item_id = add_item(sessions, cfg, series_uid, paths)
    t0 = dt.datetime.now(dt.UTC)

    with sessions() as s:  # a dispatcher claims it, then dies
        stuck = claim_due(s, owner="dead-node/dispatch", lease_seconds=30, now=t0)
        assert stuck is not None and stuck.id == item_id
    with sessions() as s:  # lease still running: nobody else may take it
        later = t0 + dt.timedelta(seconds=10)
        assert claim_due(s, owner="other/dispatch", lease_seconds=30, now=later) is None

    with sessions() as s:  # run_once with the real clock would wait for 30 s; jump ahead
        after = t0 + dt.timedelta(seconds=31)
        taken = claim_due(s, owner="other/dispatch", lease_seconds=30, now=after)
        assert taken is not None and taken.id == item_id
        assert (taken.state, taken.lease_owner, taken.attempts) == ("sending", "other/dispatch", 2)
    with sessions() as s:  # the dead owner coming back cannot record anything
        assert not mark_sent(s, stuck, owner="dead-node/dispatch")
        policy = RetryPolicy.from_settings(cfg.dispatch)
        assert mark_failed(s, stuck, owner="dead-node/dispatch", error="x", policy=policy) is None
        assert mark_sent(s, taken, owner="other/dispatch", detail="2/2 stored")
    assert "re-claimed after an expired lease by other/dispatch" in (
        events(sessions, "claimed")[-1].detail or ""
    )
    assert get_item(sessions, item_id).state == "sent"

    # A stuck item whose (short) lease has lapsed is picked up by run_once and delivered.
    second = add_item(sessions, cfg, series_uid, paths)
    with sessions() as s:
        now = dt.datetime.now(dt.UTC)
        assert claim_due(s, owner="dead-node/dispatch", lease_seconds=0.01, now=now)
    time.sleep(0.05)
    assert run_once(cfg, sessions, owner="node/dispatch") == 1
    assert get_item(sessions, second).state == "sent"
    assert set(scp.stored) == set(uids)


def test_stop_finishes_the_item_in_flight(
    counting_scp: Callable[..., CountingSCP],
    settings: Settings,
    sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    scp = counting_scp()
    scp.delay = 0.2
    cfg = dispatch_settings(settings, port=scp.port, ae_title="COUNTER")
    series_uid, paths, uids = series_files(tmp_path / "s", n=4)
    item_id = add_item(sessions, cfg, series_uid, paths)
    later_id = add_item(sessions, cfg, series_uid, paths)

    dispatcher = Dispatcher(cfg, sessions, owner="node/dispatch")
    dispatcher.start()
    wait_for(lambda: len(scp.stored) >= 1, 5, "the first C-STORE")
    dispatcher.stop()
    dispatcher.join(timeout=10)
    assert not dispatcher.is_alive()
    assert get_item(sessions, item_id).state == "sent"  # finished and recorded
    assert get_item(sessions, later_id).state == "pending"  # not started after stop
    assert set(scp.stored) == set(uids)


def test_lost_lease_on_last_attempt_dead_letters(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    cfg = dispatch_settings(settings, port=free_port(), max_attempts=2)
    item_id = add_item(sessions, cfg, "1.2.3", [str(tmp_path / "x.dcm")])
    t = dt.datetime.now(dt.UTC)
    for i in range(2):  # two dispatchers die mid-send
        with sessions() as s:
            now = t + dt.timedelta(seconds=100 * i)
            assert claim_due(s, owner=f"n{i}", lease_seconds=10, now=now, max_attempts=2)
    with sessions() as s:
        now = t + dt.timedelta(seconds=300)
        assert claim_due(s, owner="n2", lease_seconds=10, now=now, max_attempts=2) is None
    item = get_item(sessions, item_id)
    assert (item.state, item.attempts) == ("dead", 2)
    assert "lease expired on the final attempt" in (item.last_error or "")


def test_concurrent_claims_never_share_an_item(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    dest = Destination("ARCHIVE", "127.0.0.1", 1)
    with sessions() as s:
        for i in range(24):
            enqueue(s, series_uid=f"1.2.{i}", kind="forward", paths=["/nowhere"], dest=dest)
        s.commit()
    claimed: dict[str, list[int]] = {}

    def worker(owner: str) -> None:
        got = claimed.setdefault(owner, [])
        with sessions() as s:
            while item := claim_due(s, owner=owner, lease_seconds=60, now=utc_now()):
                got.append(item.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    ids = [i for got in claimed.values() for i in got]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 24
    with sessions() as s:
        assert {i.lease_owner for i in list_items(s, "sending")} <= set(claimed)


# -- backoff policy and input checks -----------------------------------------------------------


def test_backoff_doubles_and_caps() -> None:
    policy = RetryPolicy(max_attempts=8, initial_seconds=5, max_seconds=600)
    assert [policy.delay(n) for n in range(1, 10)] == [5, 10, 20, 40, 80, 160, 320, 600, 600]
    assert policy.delay(10_000) == 600
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_enqueue_validates_and_joins_callers_transaction(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    dest = Destination.from_settings(settings.archive)
    with sessions() as s:
        with pytest.raises(ValueError):
            enqueue(s, series_uid="1.2", kind="other", paths=["/a"], dest=dest)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            enqueue(s, series_uid="1.2", kind="results", paths=[], dest=dest)
        enqueue(s, series_uid="1.2", kind="results", paths=["/a"], dest=dest)
        s.rollback()  # the caller's transaction failed: no row, no event
    with sessions() as s:
        assert list_items(s) == []
    assert events(sessions) == []
