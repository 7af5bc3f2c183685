"""The low-latency acceptor loop (qgate.receive.reactor) against pynetdicom."""

from __future__ import annotations

import logging
import threading

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from qgate.receive import storersp
from qgate.receive.reactor import (
    STANDARD_LOG_HANDLERS,
    LowLatencyAssociation,
    LowLatencyDUL,
    start_server,
)
from qgate.receive.storersp import StoreResponseDIMSE
from qgate.synth import make_ct_series
from tests.conftest import free_port


def _ae(title: str) -> AE:
    """An AE for Verification and CT Image Storage (both roles' contexts)."""
    ae = AE(title)
    ae.maximum_pdu_size = 0
    for cx in (Verification, CTImageStorage):
        ae.add_supported_context(cx)
        ae.add_requested_context(cx)
    return ae


def _serve(handlers: list[evt.EventHandlerType]) -> tuple[ThreadedAssociationServer, int]:
    port = free_port()
    return start_server(_ae("SCP"), ("127.0.0.1", port), handlers), port


def test_associations_use_the_low_latency_loop_and_still_serve_and_release() -> None:
    """C-ECHO and C-STORE are served, the peer's release ends the association, and the
    acceptor is a LowLatencyAssociation with a LowLatencyDUL."""
    seen: list[tuple[type, ...]] = []
    released = threading.Event()

    def on_store(event: evt.Event) -> int:
        a = event.assoc
        seen.append((type(a), type(a.dul), type(a.dul.socket), type(a.dimse)))
        return 0x0000

    server, port = _serve(
        [(evt.EVT_C_STORE, on_store), (evt.EVT_RELEASED, lambda e: released.set())]
    )
    try:
        assoc = _ae("SCU").associate("127.0.0.1", port)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        for ds in make_ct_series(3, 32, 32, seed=1):
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        assert released.wait(5)
    finally:
        server.shutdown()
    types = (LowLatencyAssociation, LowLatencyDUL, AssociationSocket, StoreResponseDIMSE)
    assert seen == [types] * 3


@pytest.mark.parametrize("level", [logging.WARNING, logging.INFO])
def test_pynetdicom_log_handlers_are_bound_only_while_its_logger_shows_info(
    level: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each Association binds pynetdicom's logging handlers itself; below INFO the
    acceptor has none of them, so C-STORE responses come from the template."""
    caplog.set_level(level, logger="pynetdicom")
    bound: list[list[object]] = []
    templated: list[bool] = []
    encode = storersp.encode_store_response

    def spy(*args: object) -> bytes:
        templated.append(True)
        return encode(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(storersp, "encode_store_response", spy)

    def on_store(event: evt.Event) -> int:
        bound.append([h for e, h in STANDARD_LOG_HANDLERS if event.assoc.get_handlers(e)])
        return 0x0000

    server, port = _serve([(evt.EVT_C_STORE, on_store)])
    try:
        assoc = _ae("SCU").associate("127.0.0.1", port)
        for ds in make_ct_series(2, 16, 16, seed=3):
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    if level == logging.INFO:
        assert bound == [[h for _, h in STANDARD_LOG_HANDLERS]] * 2
        assert templated == []
    else:
        assert bound == [[], []]
        assert templated == [True, True]


@pytest.mark.parametrize("listen_to_sent", [False, True])
def test_store_responses_reach_the_peer_intact(listen_to_sent: bool) -> None:
    """Responses from the template (or, while something listens to EVT_DIMSE_SENT, from
    pynetdicom) carry the status and identify the instance they answer."""
    expected = [0x0000, 0xA900, 0xC211, 0x0000]
    statuses = iter(expected)
    sent: list[object] = []
    handlers: list[evt.EventHandlerType] = [(evt.EVT_C_STORE, lambda e: next(statuses))]
    if listen_to_sent:
        handlers.append((evt.EVT_DIMSE_SENT, lambda e: sent.append(e.message)))
    server, port = _serve(handlers)
    answers = []

    def on_response(event: evt.Event) -> None:
        cs = event.message.command_set
        answers.append((cs.Status, cs.AffectedSOPInstanceUID, cs.MessageIDBeingRespondedTo))

    try:
        ae = _ae("SCU")
        assoc = ae.associate("127.0.0.1", port, evt_handlers=[(evt.EVT_DIMSE_RECV, on_response)])
        datasets = make_ct_series(4, 16, 16, seed=2)
        for n, ds in enumerate(datasets, start=7):
            assoc.send_c_store(ds, msg_id=n)
        assoc.release()
    finally:
        server.shutdown()
    assert answers == [
        (status, ds.SOPInstanceUID, n)
        for n, (status, ds) in enumerate(zip(expected, datasets, strict=True), 7)
    ]
    assert len(sent) == (4 if listen_to_sent else 0)


def test_a_peer_abort_ends_the_association() -> None:
    aborted = threading.Event()
    server, port = _serve([(evt.EVT_ABORTED, lambda e: aborted.set())])
    try:
        assoc = _ae("SCU").associate("127.0.0.1", port)
        assert assoc.is_established
        assoc.abort()
        assert aborted.wait(5)
    finally:
        server.shutdown()


def test_a_connection_cut_inside_a_pdu_stores_nothing_and_the_server_stays_up() -> None:
    """The socket returns the short read, pynetdicom sees the PDU is incomplete and closes
    the association; no C-STORE reaches the handler."""
    import struct

    stored: list[object] = []
    closed = threading.Event()
    server, port = _serve(
        [
            (evt.EVT_C_STORE, lambda e: stored.append(e) or 0x0000),
            (evt.EVT_CONN_CLOSE, lambda e: closed.set()),
        ]
    )
    try:
        scu = _ae("SCU")
        assoc = scu.associate("127.0.0.1", port)
        assert assoc.is_established
        raw = assoc.dul.socket.socket
        # A P-DATA-TF PDU header announcing 200 000 bytes, then 1 000 of them.
        raw.sendall(struct.pack(">BBL", 0x04, 0, 200_000) + b"\x00" * 1000)
        raw.shutdown(2)
        assert closed.wait(5)
        assoc.abort()

        again = scu.associate("127.0.0.1", port)
        assert again.is_established
        assert again.send_c_echo().Status == 0x0000
        again.release()
    finally:
        server.shutdown()
    assert stored == []


def test_associations_leave_no_file_descriptors_or_threads_behind() -> None:
    """Each LowLatencyDUL opens a wake-up socket pair; it is closed when the loop ends."""
    import os
    import time

    server, port = _serve([])
    scu = _ae("SCU")
    try:

        def one() -> None:
            assoc = scu.associate("127.0.0.1", port)
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()

        one()
        time.sleep(0.3)
        fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
        for _ in range(20):
            one()
        deadline = time.monotonic() + 5
        while threading.active_count() > threads and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(os.listdir("/proc/self/fd")) <= fds
        assert threading.active_count() <= threads
    finally:
        server.shutdown()
