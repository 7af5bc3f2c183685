"""The low-latency acceptor loop (qgate.receive.reactor) against pynetdicom."""

from __future__ import annotations

import hashlib
import inspect
import threading

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification
from pynetdicom.transport import ThreadedAssociationServer

from qgate.receive.reactor import (
    BulkRecvSocket,
    LowLatencyAssociation,
    LowLatencyDUL,
    start_server,
)
from qgate.synth import make_ct_series
from tests.conftest import free_port

# sha256 of pynetdicom 3.0.4's Association._run_reactor source, which
# LowLatencyAssociation._run_reactor copies. A new pynetdicom that changes the loop
# fails here: compare the two loops, port the change, then update the digest.
UPSTREAM_LOOP_SHA256 = "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee"


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


def test_the_copied_loop_matches_the_installed_pynetdicom() -> None:
    src = inspect.getsource(Association._run_reactor)
    assert hashlib.sha256(src.encode()).hexdigest() == UPSTREAM_LOOP_SHA256


def test_associations_use_the_low_latency_loop_and_still_serve_and_release() -> None:
    """C-ECHO and C-STORE are served, the peer's release ends the association, and the
    acceptor is a LowLatencyAssociation with a LowLatencyDUL."""
    seen: list[tuple[type, type, type]] = []
    released = threading.Event()

    def on_store(event: evt.Event) -> int:
        seen.append((type(event.assoc), type(event.assoc.dul), type(event.assoc.dul.socket)))
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
    assert seen == [(LowLatencyAssociation, LowLatencyDUL, BulkRecvSocket)] * 3


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
    """BulkRecvSocket returns the short read, pynetdicom sees the PDU is incomplete and
    closes the association; no C-STORE reaches the handler."""
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
