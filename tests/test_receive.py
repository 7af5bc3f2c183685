"""The receive stage against real DICOM clients (dcmtk, pynetdicom), on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from qgate.core import spool
from qgate.core.config import Settings
from qgate.core.db import Event, Instance, Series, make_engine, make_session_factory
from qgate.core.spool import spool_path, write_atomic
from qgate.core.storage import to_local
from qgate.core.uids import clean_uid, is_valid_uid
from qgate.receive import TRANSFER_SYNTAXES, start_scp
from qgate.receive.handlers import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    OUT_OF_RESOURCES,
    AssociationTracker,
    ReceiveContext,
)
from qgate.receive.reactor import start_server
from qgate.receive.scp import build_ae, event_handlers
from qgate.synth import make_ct_series, write_series
from tests.support.dicomfiles import (
    LOSSY,
    MAKERS,
    convert,
    echoscu,
    encode_body,
    save,
    send_raw,
    storescu,
    write_raw,
)

PATIENT_NAME = "Secret^Patient"
PATIENT_ID = "PHI-12345"


@pytest.fixture
def scp(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[ThreadedAssociationServer]:
    server = start_scp(settings, sessions)
    yield server
    server.shutdown()


def _series(n: int, **kw: object) -> list[Dataset]:
    kw.setdefault("patient_name", PATIENT_NAME)
    kw.setdefault("patient_id", PATIENT_ID)
    return make_ct_series(n, 32, 32, **kw)  # type: ignore[arg-type]


def _wait(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _row(sessions: sessionmaker[Session], uid: str) -> Series:
    with sessions() as s:
        row = s.get(Series, uid)
        assert row is not None
        return row


def _count(sessions: sessionmaker[Session], model: type, **where: object) -> int:
    with sessions() as s:
        q = select(func.count()).select_from(model)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return int(s.scalar(q) or 0)


def _events(sessions: sessionmaker[Session], series_uid: str) -> list[str]:
    with sessions() as s:
        q = select(Event.event).where(Event.series_instance_uid == series_uid).order_by(Event.id)
        return list(s.scalars(q))


def _spooled(settings: Settings) -> list[Path]:
    return sorted(p for p in settings.spool_dir.rglob("*") if p.is_file())


# --- uids and spool ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2"),
        ("1.2.3\x00", "1.2.3"),
        (b"1.2.3 ", "1.2.3"),
        ("0.1.0", "0.1.0"),
    ],
)
def test_clean_uid_accepts_and_strips(value: object, expected: str) -> None:
    assert clean_uid(value) == expected
    assert is_valid_uid(value)


@pytest.mark.parametrize(
    "value",
    ["", "\x00", "1..2", ".1.2", "1.2.", "1.02.3", "1.2.a", "../../etc", "1/2", "1" * 65, None, 12],
)
def test_clean_uid_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        clean_uid(value)
    assert not is_valid_uid(value)


def test_spool_path_and_write_atomic(tmp_path: Path) -> None:
    path = spool_path(tmp_path, "1.2.3\x00", "1.2.3.4")
    assert path == tmp_path / "1.2.3" / "1.2.3.4.dcm"
    with pytest.raises(ValueError):
        spool_path(tmp_path, "../..", "1.2")
    write_atomic(path, b"one", fsync=True)
    write_atomic(path, b"two", fsync=False)
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


@pytest.mark.parametrize("size", [0, 1, 4095, 525_311, (9 << 20) + 3])
def test_write_temp_writes_the_buffers_back_to_back(tmp_path: Path, size: int) -> None:
    head, body = b"H" * 333, os.urandom(size)
    path = tmp_path / "1.2" / "1.2.3.dcm"
    tmp = spool.write_temp(path, (head, memoryview(body)), fsync=True)
    spool.publish(tmp, path, fsync=True, drop_cache=True)
    assert path.read_bytes() == head + body
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_short_writes_are_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_writev = os.writev

    def at_most_1000(fd: int, buffers: list[memoryview]) -> int:
        first = buffers[0]
        return real_writev(fd, [first[:1000]])  # as a signal or a full disk may cut it

    monkeypatch.setattr(spool.os, "writev", at_most_1000)
    parts = [b"a" * 1500, b"", b"b" * 2500, os.urandom(3333)]
    tmp = spool.write_temp(tmp_path / "1.2" / "1.2.4.dcm", parts, fsync=False)
    assert tmp.read_bytes() == b"".join(parts)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_page_cache_advice_comes_after_the_write_and_after_the_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    advice: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        advice.append(("fsync", fd))
        real_fsync(fd)

    def fadvise(fd: int, offset: int, length: int, how: int) -> None:
        advice.append(("dontneed" if how == os.POSIX_FADV_DONTNEED else str(how), fd))

    path = tmp_path / "1.2" / "1.2.5.dcm"
    path.parent.mkdir()  # no folder fsyncs in the trace
    monkeypatch.setattr(spool.os, "fsync", fsync)
    monkeypatch.setattr(spool.os, "posix_fadvise", fadvise)
    spool.publish(spool.write_temp(path, b"x" * 9000, fsync=True), path, fsync=True)
    spool.publish(
        spool.write_temp(path, b"y" * 9000, fsync=True), path, fsync=True, drop_cache=True
    )
    assert [a for a, _ in advice] == ["fsync", "fsync", "dontneed"]  # after its own fsync
    assert advice[1][1] == advice[2][1]
    assert path.read_bytes() == b"y" * 9000
    # start_writeback: the same advice right after the write starts the disk write early.
    advice.clear()
    tmp = spool.write_temp(path, b"z" * 9000, fsync=True, start_writeback=True)
    spool.publish(tmp, path, fsync=True, drop_cache=True)
    assert [a for a, _ in advice] == ["dontneed", "fsync", "dontneed"]
    assert path.read_bytes() == b"z" * 9000


def test_tracker_counts_an_association_once_and_forgets_it_at_its_end() -> None:
    tracker = AssociationTracker()
    assoc = threading.Thread()  # any hashable, weak-referenceable object
    assert tracker.is_new(assoc, "1.2")
    assert tracker.add(assoc, "1.2")
    assert not tracker.is_new(assoc, "1.2")
    assert tracker.end(assoc) == {"1.2"}
    assert tracker.end(assoc) == set()  # RELEASED then CONN_CLOSE: only the first counts
    assert not tracker.add(assoc, "1.3")  # a store that finished after the end
    assert len(tracker) == 0


# --- association level ------------------------------------------------------------------


def test_echo(scp: ThreadedAssociationServer, settings: Settings) -> None:
    res = echoscu(settings.dicom.port)
    assert res.returncode == 0, res.stderr


def test_calling_ae_whitelist(
    settings: Settings, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    dicom = settings.dicom.model_copy(update={"allowed_calling_aets": ["CT_SCANNER"]})
    server = start_scp(settings.model_copy(update={"dicom": dicom}), sessions)
    try:
        with caplog.at_level(logging.WARNING, logger="qgate.receive"):
            refused = echoscu(settings.dicom.port, calling_aet="INTRUDER")
        assert refused.returncode != 0
        assert "Rejected" in refused.stderr + refused.stdout
        assert "association rejected: aet=INTRUDER" in caplog.text
        assert echoscu(settings.dicom.port, calling_aet="CT_SCANNER").returncode == 0
    finally:
        server.shutdown()


def test_other_sop_classes_and_syntaxes_refused_at_negotiation(
    scp: ThreadedAssociationServer, settings: Settings, tmp_path: Path
) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRBigEndian)
    assoc = ae.associate("127.0.0.1", settings.dicom.port, ae_title="QGATE")
    assert assoc.is_established
    try:
        rejected = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.rejected_contexts}
        assert rejected == {
            (MRImageStorage, ExplicitVRLittleEndian),
            (CTImageStorage, ExplicitVRBigEndian),
        }
    finally:
        assoc.release()

    mr = _series(1)[0]
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    res = storescu(settings.dicom.port, [save(mr, tmp_path / "mr.dcm")])
    assert res.returncode != 0
    assert _spooled(settings) == []


# --- storing ----------------------------------------------------------------------------


def test_series_via_storescu(
    scp: ThreadedAssociationServer, settings: Settings, sessions: sessionmaker[Session], tmp_path
) -> None:
    datasets = _series(5)
    uid = datasets[0].SeriesInstanceUID
    res = storescu(settings.dicom.port, write_series(datasets, tmp_path / "in"))
    assert res.returncode == 0, res.stderr

    files = _spooled(settings)
    assert [p.name for p in files] == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in datasets)
    assert {p.parent.name for p in files} == {uid}
    row = _row(sessions, uid)
    assert row.instance_count == 5
    assert row.status == "receiving" and row.generation == 0
    assert (row.calling_aet, row.modality) == ("STORESCU", "CT")
    assert (row.patient_id, row.patient_name) == (PATIENT_ID, PATIENT_NAME)
    assert row.study_instance_uid == datasets[0].StudyInstanceUID
    assert row.study_date == datasets[0].StudyDate
    assert row.series_description == datasets[0].SeriesDescription
    with sessions() as s:
        inst = s.scalars(select(Instance).order_by(Instance.instance_number)).all()
    assert [i.instance_number for i in inst] == [1, 2, 3, 4, 5]
    # Stored relative to storage.root, so that every node resolves it on its own mount.
    assert [i.path for i in inst] == [f"spool/{uid}/{i.sop_instance_uid}.dcm" for i in inst]
    assert all(to_local(i.path, settings.storage.root).is_file() for i in inst)
    first = to_local(inst[0].path, settings.storage.root)
    assert inst[0].size == first.stat().st_size
    got = dcmread(first)
    assert got.SOPInstanceUID == datasets[0].SOPInstanceUID
    assert np.array_equal(got.pixel_array, datasets[0].pixel_array)
    # storescu has released: the hint is down again, after the last instance.
    assert _wait(lambda: _row(sessions, uid).open_associations == 0)
    row = _row(sessions, uid)
    assert row.released_at is not None and row.released_at >= row.last_received_at
    # One "received" row per series (its first instance); the instance rows are the rest.
    assert _events(sessions, uid) == ["received", "released"]


# storescu option that makes it propose each syntax (None: dcmtk cannot, use pynetdicom).
STORESCU_PROPOSE: dict[UID, str | None] = {
    ImplicitVRLittleEndian: "-xi",
    ExplicitVRLittleEndian: "-xe",
    DeflatedExplicitVRLittleEndian: "-xd",
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEGLossless: None,
    JPEGLosslessSV1: "-xs",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    RLELossless: "-xr",
}


def test_every_accepted_transfer_syntax_round_trips(
    scp: ThreadedAssociationServer, settings: Settings, sessions: sessionmaker[Session], tmp_path
) -> None:
    assert set(STORESCU_PROPOSE) == set(TRANSFER_SYNTAXES) == set(MAKERS)
    # 128 x 128: Pixel Data larger than what the header parse reads (it skips it).
    originals = make_ct_series(
        len(MAKERS), 128, 128, patient_name=PATIENT_NAME, patient_id=PATIENT_ID
    )
    sources = write_series(originals, tmp_path / "in")
    # Keyed by Instance Number: dcmtk's lossy encoders assign a new SOP Instance UID.
    sent: dict[int, tuple[UID, Dataset]] = {}
    for i, (src, ts) in enumerate(zip(sources, MAKERS, strict=True)):
        f = convert(src, ts, tmp_path / "ts" / f"{i}.dcm")
        assert dcmread(f).file_meta.TransferSyntaxUID == ts
        if (flag := STORESCU_PROPOSE[ts]) is None:
            assert send_raw(settings.dicom.port, [f]) == [0]
        else:
            res = storescu(settings.dicom.port, [f], extra=["-R", flag])
            assert res.returncode == 0, f"{ts.name}: {res.stderr}"
        sent[originals[i].InstanceNumber] = (ts, originals[i])

    with sessions() as s:
        rows = s.scalars(select(Instance)).all()
    assert len(rows) == len(MAKERS)
    for row in rows:
        ts, original = sent[row.instance_number]
        assert row.transfer_syntax_uid == ts, ts.name
        got = dcmread(to_local(row.path, settings.storage.root))
        assert got.file_meta.TransferSyntaxUID == ts
        hu = apply_modality_lut(got.pixel_array, got).astype(np.float64)
        want = apply_modality_lut(original.pixel_array, original).astype(np.float64)
        if ts in LOSSY:
            assert np.abs(hu - want).mean() < 40, ts.name
        else:
            assert np.array_equal(hu, want), ts.name


def test_enhanced_ct_multiframe_with_fsync(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    storage = settings.storage.model_copy(update={"fsync": True})
    server = start_scp(settings.model_copy(update={"storage": storage}), sessions)
    frames = _series(3)
    ds = frames[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.NumberOfFrames = 3
    ds.PixelData = b"".join(f.PixelData for f in frames)
    try:
        res = storescu(settings.dicom.port, [save(ds, tmp_path / "enh.dcm")])
    finally:
        server.shutdown()
    assert res.returncode == 0, res.stderr
    with sessions() as s:
        inst = s.scalars(select(Instance)).one()
    assert inst.sop_class_uid == EnhancedCTImageStorage
    assert dcmread(to_local(inst.path, settings.storage.root)).pixel_array.shape == (3, 32, 32)


def test_duplicate_is_idempotent_and_keeps_first_copy(
    scp: ThreadedAssociationServer, settings: Settings, sessions: sessionmaker[Session], tmp_path
) -> None:
    ds = _series(1)[0]
    uid = ds.SeriesInstanceUID
    ds.SeriesDescription = "first copy"
    first = save(ds, tmp_path / "a.dcm")
    ds.SeriesDescription = "second copy"
    second = save(ds, tmp_path / "b.dcm")
    assert storescu(settings.dicom.port, [first]).returncode == 0
    res = storescu(settings.dicom.port, [second])
    assert res.returncode == 0, res.stderr
    assert send_raw(settings.dicom.port, [second, second]) == [0, 0]

    assert _count(sessions, Instance) == 1
    row = _row(sessions, uid)
    assert row.instance_count == 1
    assert row.series_description == "first copy"
    [path] = _spooled(settings)
    assert dcmread(path).SeriesDescription == "first copy"
    assert _events(sessions, uid).count("duplicate") == 3
    assert _wait(lambda: _row(sessions, uid).open_associations == 0)


def test_late_instance_reopens_series(
    scp: ThreadedAssociationServer, settings: Settings, sessions: sessionmaker[Session], tmp_path
) -> None:
    datasets = _series(3)
    uid = datasets[0].SeriesInstanceUID
    paths = write_series(datasets, tmp_path / "in")
    assert storescu(settings.dicom.port, paths[:2]).returncode == 0
    with sessions.begin() as s:
        s.execute(update(Series).where(Series.series_instance_uid == uid).values(status="scored"))

    # A duplicate does not re-open; a new instance does.
    assert storescu(settings.dicom.port, paths[:1]).returncode == 0
    assert _row(sessions, uid).status == "scored"
    assert storescu(settings.dicom.port, paths[2:]).returncode == 0
    row = _row(sessions, uid)
    assert (row.status, row.generation, row.instance_count) == ("receiving", 1, 3)
    assert _events(sessions, uid).count("reopened") == 1

    with sessions.begin() as s:
        s.execute(update(Series).where(Series.series_instance_uid == uid).values(status="failed"))
    extra = _series(1, series_uid=uid, study_uid=datasets[0].StudyInstanceUID, seed=1)
    assert storescu(settings.dicom.port, write_series(extra, tmp_path / "x")).returncode == 0
    assert (_row(sessions, uid).status, _row(sessions, uid).generation) == ("receiving", 2)


def _assoc(port: int, aet: str = "TESTSCU"):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="QGATE")
    assert assoc.is_established
    return assoc


def test_association_end_decrements_open_associations(
    scp: ThreadedAssociationServer, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    datasets = _series(4)
    uid = datasets[0].SeriesInstanceUID
    a, b = _assoc(settings.dicom.port), _assoc(settings.dicom.port)
    try:
        assert a.send_c_store(datasets[0]).Status == 0
        assert a.send_c_store(datasets[1]).Status == 0  # same association: counted once
        assert _row(sessions, uid).open_associations == 1
        assert b.send_c_store(datasets[2]).Status == 0
        assert _row(sessions, uid).open_associations == 2
        assert _row(sessions, uid).released_at is None
    finally:
        a.release()
    assert _wait(lambda: _row(sessions, uid).open_associations == 1)
    assert _row(sessions, uid).released_at is not None
    b.abort()
    assert _wait(lambda: _row(sessions, uid).open_associations == 0)
    ends = _events(sessions, uid)[-2:]
    # The abort is seen as EVT_ABORTED or, when the socket thread is first, EVT_CONN_CLOSE.
    assert sorted(ends) in (["aborted", "released"], ["closed", "released"])


def test_a_close_that_overtakes_the_release_is_recorded_as_released(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    """The peer closes once it has the A-RELEASE-RP; the DUL thread's EVT_CONN_CLOSE can
    then run before the association thread's EVT_RELEASED (forced here: EVT_RELEASED is
    held until the close has been handled). The trail still says released."""
    closed = threading.Event()
    ctx = ReceiveContext(settings=settings, sessions=sessions)
    handlers = [
        (evt.EVT_RELEASED, lambda e: closed.wait(5)),  # runs before handle_release
        *event_handlers(ctx),
        (evt.EVT_CONN_CLOSE, lambda e: closed.set()),  # after handle_release
    ]
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    server = start_server(build_ae(settings), ("127.0.0.1", settings.dicom.port), handlers)
    try:
        [ds] = _series(1)
        assoc = _assoc(settings.dicom.port)
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        assert closed.wait(5)
        assert _wait(lambda: _row(sessions, ds.SeriesInstanceUID).open_associations == 0)
    finally:
        server.shutdown()
    assert _events(sessions, ds.SeriesInstanceUID) == ["received", "released"]


def test_two_associations_send_one_series_concurrently(
    scp: ThreadedAssociationServer, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    datasets = _series(8)
    uid = datasets[0].SeriesInstanceUID
    start = threading.Barrier(2)
    statuses: list[int] = []
    lock = threading.Lock()

    def send(part: list[Dataset], aet: str) -> None:
        assoc = _assoc(settings.dicom.port, aet)
        start.wait()
        try:
            for ds in part:
                status = int(assoc.send_c_store(ds).Status)
                with lock:
                    statuses.append(status)
        finally:
            assoc.release()

    threads = [
        threading.Thread(target=send, args=(datasets[0::2], "SCU_A")),
        threading.Thread(target=send, args=(datasets[1::2], "SCU_B")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert statuses == [0] * 8
    assert _count(sessions, Instance, series_instance_uid=uid) == 8
    assert _row(sessions, uid).instance_count == 8
    assert _wait(lambda: _row(sessions, uid).open_associations == 0)
    assert _events(sessions, uid).count("released") == 2


# --- bad input --------------------------------------------------------------------------


def _bad_files(folder: Path) -> dict[str, tuple[Path, int]]:
    """Each malformed instance and the status it must get."""
    cases: dict[str, tuple[Path, int]] = {}

    def add(name: str, status: int, ds: Dataset, body: bytes | None = None) -> None:
        body = encode_body(ds) if body is None else body
        path = write_raw(
            folder / f"{name}.dcm",
            body,
            sop_class=ds.SOPClassUID,
            sop_instance=ds.SOPInstanceUID,
        )
        cases[name] = (path, status)

    def fresh() -> Dataset:
        return _series(1)[0]

    add("garbage", CANNOT_UNDERSTAND, fresh(), b"this is not a DICOM data set" * 8)
    ds = fresh()
    add("truncated", CANNOT_UNDERSTAND, ds, encode_body(ds)[:-700])
    ds = make_ct_series(1, 128, 128)[0]  # Pixel Data the header parse skips, not reads
    add("truncated_large", CANNOT_UNDERSTAND, ds, encode_body(ds)[:-700])
    ds = fresh()
    del ds.PixelData
    add("no_pixel_data", DATASET_MISMATCH, ds)
    ds = fresh()
    ds.Modality = "MR"
    add("not_ct", DATASET_MISMATCH, ds)
    ds = fresh()
    ds.Rows = 0
    add("zero_rows", DATASET_MISMATCH, ds)
    ds = fresh()
    ds.Columns = 5000
    add("huge_columns", DATASET_MISMATCH, ds)
    ds = fresh()
    ds.NumberOfFrames = 100000
    add("huge_frames", DATASET_MISMATCH, ds)
    ds = fresh()
    ds.NumberOfFrames = 2
    add("short_pixel_data", DATASET_MISMATCH, ds)
    ds = fresh()
    ds.PixelData = ds.PixelData[:-64]
    add("pixel_length", DATASET_MISMATCH, ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs
        ds = fresh()
        ds.SeriesInstanceUID = "../../../../tmp/qgate-escape"
        add("series_uid_traversal", DATASET_MISMATCH, ds)
        ds = fresh()
        ds.StudyInstanceUID = "1.2.03.4"
        add("study_uid_leading_zero", DATASET_MISMATCH, ds)
        ds = fresh()
        ds.SOPInstanceUID = "1.2.3.abc"
        add("sop_uid_letters", DATASET_MISMATCH, ds)
        ds = fresh()
        body = encode_body(ds)
        ds.SOPInstanceUID = "1.2.3.4.5"  # request and file meta differ from the dataset
        add("sop_uid_mismatch", DATASET_MISMATCH, ds, body)
    return cases


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:Expected explicit VR")
def test_bad_input_gets_a_specific_status_without_phi(
    scp: ThreadedAssociationServer,
    settings: Settings,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cases = _bad_files(tmp_path / "bad")
    good = write_series(_series(1), tmp_path / "good")
    with caplog.at_level(logging.DEBUG, logger="qgate.receive"):
        statuses = send_raw(settings.dicom.port, [p for p, _ in cases.values()] + good)
    assert dict(zip(cases, statuses, strict=False)) == {k: s for k, (_, s) in cases.items()}
    assert statuses[-1] == 0  # the same association goes on working

    assert echoscu(settings.dicom.port).returncode == 0
    assert _count(sessions, Instance) == 1
    assert len(_spooled(settings)) == 1
    assert not list(tmp_path.rglob("qgate-escape*"))
    assert not list(Path("/tmp").glob("qgate-escape*"))
    log = caplog.text
    assert "status=0xC210" in log and "status=0xA900" in log
    assert PATIENT_NAME not in log and PATIENT_ID not in log
    assert "Secret" not in log and "12345" not in log


def test_storage_failure_is_not_acknowledged(
    scp: ThreadedAssociationServer, settings: Settings, sessions: sessionmaker[Session], tmp_path
) -> None:
    ds = _series(1)[0]
    blocker = settings.spool_dir / ds.SeriesInstanceUID
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"a file where the series folder should be")
    assert send_raw(settings.dicom.port, [save(ds, tmp_path / "a.dcm")]) == [OUT_OF_RESOURCES]
    assert _count(sessions, Instance) == 0
    assert _count(sessions, Series) == 0
    assert echoscu(settings.dicom.port).returncode == 0


def test_database_failure_is_not_acknowledged(settings: Settings, tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'unmigrated.db'}")  # no tables
    server = start_scp(settings, make_session_factory(engine))
    try:
        ds = _series(1)[0]
        status = send_raw(settings.dicom.port, [save(ds, tmp_path / "a.dcm")])
        assert status == [OUT_OF_RESOURCES]
        assert _spooled(settings) == []  # neither the file nor its temporary is left
        assert echoscu(settings.dicom.port).returncode == 0
    finally:
        server.shutdown()
        engine.dispose()


def test_spool_file_without_a_row_is_recovered_at_startup(settings, sessions) -> None:  # type: ignore[no-untyped-def]
    """A power loss may drop the last SQLite commits (synchronous=NORMAL): the fsynced
    spool file is the truth, and start-up recovery records it again."""
    from qgate.core.spool import spool_path, write_atomic
    from qgate.receive.recover import recover_spool
    from qgate.synth import make_ct_series

    ds = make_ct_series(2, 64, 64, seed=9)
    for d in ds:
        path = spool_path(settings.spool_dir, d.SeriesInstanceUID, d.SOPInstanceUID)
        buf = __import__("io").BytesIO()
        d.save_as(buf, enforce_file_format=True)
        write_atomic(path, buf.getvalue(), fsync=False)
    stale_tmp = path.parent / f".{path.name}.123-456.tmp"
    stale_tmp.write_bytes(b"partial")
    stale = __import__("time").time() - 3600  # older than TMP_STALE on a shared store
    os.utime(stale_tmp, (stale, stale))
    fresh_tmp = path.parent / f".{path.name}.789-012.tmp"  # a write in progress
    fresh_tmp.write_bytes(b"partial")

    assert recover_spool(settings, sessions) == 2
    assert recover_spool(settings, sessions) == 0  # idempotent
    assert not stale_tmp.exists()
    # SQLite is one node's database: nothing else writes to its spool at start-up.
    assert fresh_tmp.exists() is settings.database.url.startswith("postgresql")
    row = _row(sessions, ds[0].SeriesInstanceUID)
    assert row.instance_count == 2 and row.status == "receiving"


def test_partial_spool_file_without_a_row_is_quarantined(settings, sessions) -> None:  # type: ignore[no-untyped-def]
    """A crash between the rename and the fsync can leave a short file under its final
    name. It was never acknowledged: recovery moves it out of the spool, keeps it under
    ``quarantine/`` and records nothing, so the sender's retry stores it cleanly."""
    import io

    from qgate.core.spool import spool_path, write_atomic
    from qgate.receive.recover import QUARANTINE, recover_spool
    from qgate.synth import make_ct_series

    (d,) = make_ct_series(1, 64, 64, seed=10)
    buf = io.BytesIO()
    d.save_as(buf, enforce_file_format=True)
    path = spool_path(settings.spool_dir, d.SeriesInstanceUID, d.SOPInstanceUID)
    write_atomic(path, buf.getvalue()[:-3000], fsync=False)  # pixel data cut short

    assert recover_spool(settings, sessions) == 0
    assert not path.exists()
    kept = settings.storage.root / QUARANTINE / path.parent.name / path.name
    assert kept.read_bytes() == buf.getvalue()[:-3000]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
