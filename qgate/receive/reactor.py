"""A lower-latency acceptor loop for pynetdicom associations.

A modality waits for each C-STORE response before it sends the next instance, so every
wait between "the last PDU of a request arrived" and "the response left" is paid once per
instance. pynetdicom 3.0 has two such waits that are polls, not wake-ups:

* the association's reactor sleeps a fixed 1 ms before it looks for a decoded DIMSE
  message (``Association._run_reactor``; not configurable), which costs 0.5-1 ms per
  instance on Linux (a 1 ms sleep oversleeps);
* the DUL thread sleeps ``_run_loop_delay`` (default 1 ms) when a poll found nothing, and
  it is this thread that sends the response once the handler returned. A shorter poll
  is no cure: each wake-up takes the GIL from the C-STORE handler, and on a busy host
  the handler then waits for the poller at every system call it makes (file write,
  fsync, each SQLite statement).

:class:`LowLatencyAssociation` blocks on the DIMSE message queue instead (it wakes as
soon as a request is complete, and still runs the release/abort/timeout checks at least
every :data:`REACTOR_WAIT_SECONDS`). :class:`LowLatencyDUL` blocks in ``select`` on the
peer's socket and a wake-up socket that :meth:`~LowLatencyDUL.send_pdu` writes to, so
it sleeps while the handler runs and wakes the moment the response is queued.
:class:`LowLatencyRequestHandler` gives each accepted association both. The acceptor
loop below is pynetdicom 3.0's own with the sleep-then-poll replaced by a timed
``Queue.get``; ``tests/test_receive_reactor.py`` fails if pynetdicom's loops change, so
an upgrade is reviewed against this module.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pynetdicom import AE, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from qgate.core.config import ReceiveInternal
from qgate.receive.storersp import StoreResponseDIMSE

if TYPE_CHECKING:
    from qgate.receive.listener import LoadBoard

LOGGER = logging.getLogger("pynetdicom.assoc")

#: Longest wait for a DIMSE message before the reactor re-checks release, abort, the
#: DUL thread and the network timeout (pynetdicom polls every 1 ms).
REACTOR_WAIT_SECONDS = 0.005

#: Longest wait of the DUL thread in ``select`` before it re-checks its timers (ARTIM).
DUL_WAIT_SECONDS = 0.005

#: Longest TLS handshake of a new connection before it is dropped.
HANDSHAKE_TIMEOUT_SECONDS = 30.0

#: How long a process sharing its listening socket waits per association it already
#: serves before it accepts (:mod:`qgate.receive.listener`): an idle one accepts first.
ACCEPT_DEFER_SECONDS = 0.002

#: The pynetdicom internals this module can replace, each measured on its own by
#: ``benchmarks/receive.py --without NAME``: ``reactor`` (:class:`LowLatencyAssociation`),
#: ``dul`` (:class:`LowLatencyDUL`), ``store_response``
#: (:class:`~qgate.receive.storersp.StoreResponseDIMSE`). A bulk ``recv_into`` socket was
#: dropped (2026-12-07 19:30, benchmarks/RESULTS.md: 0.99x / 1.01x without it).
INTERNALS: tuple[ReceiveInternal, ...] = ("reactor", "dul", "store_response")


class LowLatencyAssociation(Association):
    """An acceptor :class:`~pynetdicom.association.Association` that waits on its DIMSE
    queue instead of sleeping 1 ms per loop (see the module docstring)."""

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            # pynetdicom's pause protocol: a send_*() on this association clears the
            # checkpoint and waits for _is_paused before it touches the DIMSE queue.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=REACTOR_WAIT_SECONDS)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, context_id)  # type: ignore[arg-type]
                continue  # another request may already be queued

            if self.is_established and self.acse.is_release_requested():
                # Marked released before the response goes out (pynetdicom marks it
                # after): the peer closes the connection as soon as it has the response,
                # and the DUL thread's EVT_CONN_CLOSE may then come before EVT_RELEASED.
                self.is_released = True
                self.is_established = False
                self.acse.send_release(is_response=True)
                LOGGER.info("Association Released")
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class LowLatencyDUL(DULServiceProvider):
    """A DUL provider that waits in ``select`` instead of sleeping between polls.

    pynetdicom's loop is kept; its idle sleep is set to 0 and the wait moves into
    :meth:`_is_transport_event`, which blocks only when nothing is pending anywhere
    (socket, event queue, outgoing primitives, kill flag).
    """

    def _prepare(self) -> None:
        """Called once before the thread starts (see :class:`LowLatencyRequestHandler`)."""
        # A socket pair rather than os.pipe(): a write after close raises instead of
        # landing in a recycled file descriptor.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._run_loop_delay = 0
        # Thread.__init__ bound the base class's run_reactor as the target.
        self._target = make_target(self.run_reactor)

    def _wake(self) -> None:
        # OSError: a wake-up is already pending (buffer full) or the loop has ended.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def send_pdu(self, primitive: object) -> None:  # type: ignore[override]
        super().send_pdu(primitive)  # type: ignore[arg-type]
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _is_transport_event(self) -> bool:
        if super()._is_transport_event():
            return True
        if self._kill_thread or not self.event_queue.empty() or not self.to_provider_queue.empty():
            return False
        sock = self.socket
        raw = getattr(sock, "socket", None)
        if raw is None or not getattr(sock, "_is_connected", False):
            return False
        try:
            ready, _, _ = select.select([raw, self._wake_r], [], [], DUL_WAIT_SECONDS)
        except (OSError, ValueError):  # closed under us: the next poll reports it
            return False
        if self._wake_r in ready:
            with contextlib.suppress(OSError):  # BlockingIOError once drained
                while self._wake_r.recv(4096):
                    pass
        return False

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            self._wake_r.close()
            self._wake_w.close()


#: pynetdicom's logging handlers, bound to every association by default. They format
#: each PDU and DIMSE message whether or not the lines are emitted (~0.2 ms per
#: instance), so they stay bound only while the ``pynetdicom`` logger shows INFO.
STANDARD_LOG_HANDLERS: tuple[tuple[evt.EventType, Callable[..., Any]], ...] = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


class LowLatencyRequestHandler(RequestHandler):
    """pynetdicom's request handler, whose associations use :class:`LowLatencyAssociation`,
    :class:`LowLatencyDUL` and :class:`~qgate.receive.storersp.StoreResponseDIMSE`, without
    pynetdicom's logging handlers unless the ``pynetdicom`` logger is at INFO or below.

    A TLS connection is handshaken here, on the connection's own thread (see
    :class:`DeferredHandshakeServer`); one that fails the handshake (a plain-TCP client,
    an untrusted or missing client certificate) is closed before any association exists.
    The classes above work on the TLS socket unchanged: pynetdicom's reads on an
    ``SSLSocket`` return decrypted data, and its ``ready()`` (called first in
    :meth:`LowLatencyDUL._is_transport_event`) checks ``pending()`` for bytes already
    decrypted but not yet read, which ``select`` on the raw socket would not see.
    """

    def handle(self) -> None:
        try:
            sock = self.request
            if isinstance(sock, ssl.SSLSocket) and not self._handshake(sock):
                self.server.shutdown_request(sock)
                return
            super().handle()
        finally:  # the association's own thread counts it from here on
            if isinstance(self.server, DeferredHandshakeServer):
                self.server.association_started()

    def _handshake(self, sock: ssl.SSLSocket) -> bool:
        timeout = sock.gettimeout()
        sock.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
        try:
            sock.do_handshake()
        except (OSError, ValueError) as exc:  # ssl.SSLError, reset, timeout
            LOGGER.warning("TLS handshake with %s failed: %s", self.client_address[0], exc)
            return False
        sock.settimeout(timeout)
        return True

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
            # Each Association binds these itself (``_bind_defaults``), whatever its
            # server has bound, so they are unbound here, from the association. Bound,
            # they also keep StoreResponseDIMSE from answering from its template.
            for event, handler in STANDARD_LOG_HANDLERS:
                assoc.unbind(event, handler)
        internals: frozenset[str] = getattr(self.server, "internals", frozenset(INTERNALS))
        # pynetdicom builds the acceptor and its DUL in long methods with no class
        # hook; the subclasses only override methods, so switching the classes before
        # the threads start is safe.
        if "reactor" in internals:
            assoc.__class__ = LowLatencyAssociation
        if "dul" in internals:
            assoc.dul.__class__ = LowLatencyDUL
            assoc.dul._prepare()  # type: ignore[attr-defined]
        if "store_response" in internals:
            assoc.dimse.__class__ = StoreResponseDIMSE
        return assoc


class DeferredHandshakeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, but a TLS handshake runs on the connection's thread,
    and the listening socket may be one that several receiver processes share.

    pynetdicom wraps an accepted socket with the handshake on connect, in the one thread
    that accepts every connection: a client that connects and stays silent would hold up
    all other connections for the network timeout. Here the socket is wrapped without
    the handshake, which :class:`LowLatencyRequestHandler` then performs.

    ``listen_socket`` (keyword, through ``AE.make_server``'s documented pass-through of
    extra keywords): a bound, listening, non-blocking socket to accept from instead of
    binding ``address`` (:mod:`qgate.receive.listener`). ``internals``: which of
    pynetdicom's internals :class:`LowLatencyRequestHandler` replaces
    (:data:`INTERNALS`).
    """

    def __init__(
        self,
        *args: Any,
        listen_socket: socket.socket | None = None,
        board: LoadBoard | None = None,
        internals: frozenset[str] = frozenset(INTERNALS),
        **kwargs: Any,
    ) -> None:
        self._listen_socket = listen_socket
        self._board = board
        self.internals = internals
        # Connections accepted whose association thread has not started yet.
        self._starting = 0
        self._starting_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def _serving(self, accepted: int = 0) -> int:
        with self._starting_lock:
            self._starting += accepted
            starting = self._starting
        return starting + len(self.active_associations)

    def association_started(self) -> None:
        """The request handler started a connection's association thread (or gave up)."""
        self._serving(-1)

    def service_actions(self) -> None:
        super().service_actions()
        if self._board is not None:  # at least every poll interval: counts go down too
            self._board.publish(self._serving())

    def server_bind(self) -> None:
        """socketserver's bind hook: bind ``address`` (pynetdicom), or take over the
        shared socket."""
        if self._listen_socket is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()  # the unbound socket TCPServer made
        self.socket = self._listen_socket
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """socketserver's listen hook; a shared socket listens already (with its own
        backlog, which ``listen()`` here would shrink for every process)."""
        if self._listen_socket is None:
            super().server_activate()

    def server_close(self) -> None:
        """Close the server; a shared socket is only closed in this process.

        pynetdicom's ``server_close`` calls ``shutdown()`` on the listening socket, which
        would stop it listening for every process that shares it: it is handed a fresh,
        unconnected socket to shut down (``OSError``, which it ignores) instead.
        """
        if self._listen_socket is not None:
            self.socket = socket.socket(self.address_family, socket.SOCK_STREAM)
            self._listen_socket.close()
        super().server_close()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        if self._board is not None:
            # Let a less busy receiver process take the connection (listener.py).
            serving = self._serving()
            self._board.publish(serving)
            lead = self._board.lead(serving)
            if lead > 0:
                time.sleep(min(lead, 8) * ACCEPT_DEFER_SECONDS)
        # BlockingIOError when another process accepted it first: socketserver skips it.
        client_socket, address = self.socket.accept()
        serving = self._serving(+1)
        if self._board is not None:
            self._board.publish(serving)
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address


def start_server(
    ae: AE,
    address: tuple[str, int],
    evt_handlers: list[evt.EventHandlerType],
    *,
    ssl_context: ssl.SSLContext | None = None,
    listen_socket: socket.socket | None = None,
    board: LoadBoard | None = None,
    internals: Iterable[str] = INTERNALS,
) -> ThreadedAssociationServer:
    """``ae.start_server(address, block=False, evt_handlers=..., ssl_context=...)`` with
    :class:`LowLatencyRequestHandler`; stop it with the server's ``shutdown()``.

    ``listen_socket``: accept from this shared socket instead of binding ``address``;
    ``board``: where the processes sharing it publish how busy they are.
    ``internals``: the pynetdicom internals to replace (:data:`INTERNALS`; none: the
    associations run pynetdicom's own classes).
    """
    server = ae.make_server(
        address,
        ssl_context=ssl_context,
        evt_handlers=evt_handlers,
        server_class=DeferredHandshakeServer,
        request_handler=LowLatencyRequestHandler,
        listen_socket=listen_socket,
        board=board,
        internals=frozenset(internals),
    )
    thread = threading.Thread(
        target=make_target(server.serve_forever), name=f"scp@{address[1]}", daemon=True
    )
    thread.start()
    ae._servers.append(server)  # as start_server does: server.shutdown() removes it
    return server
