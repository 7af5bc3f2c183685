"""Several receiver processes on one port: a shared listening socket and a node-wide limit.

A modality waits for each C-STORE response, so one association is served by one thread,
and parallel associations in one process share its interpreter lock. With
``dicom.receivers: N`` the receive stage binds and listens on ``dicom.host:port`` once
(:func:`listen_socket`), then starts ``N - 1`` listener processes (``qgate receive
--listen-fd``) that inherit that socket (:class:`ListenerSupervisor`); every process
accepts associations from it and serves them on its own cores, each with its own
database connections, writing to the same spool. This is the pre-fork model of
``storescp --fork``'s parent, without a process per association.

Why one inherited socket rather than ``SO_REUSEPORT``: a port shared with
``SO_REUSEPORT`` also admits any other process of the same user that binds it with the
option (a second qgate left running would silently take part of the traffic), and the
connections queued on a listener that dies are reset. An inherited socket has one
backlog, owned by the stage, which outlives any one listener.

Balancing: the kernel hands a new connection to whichever process accepts first. Each
process publishes how many connections it serves on a :class:`LoadBoard`, and one that
serves more than the least busy waits :data:`~qgate.receive.reactor.ACCEPT_DEFER_SECONDS`
per connection of difference before it accepts
(:meth:`qgate.receive.reactor.DeferredHandshakeServer.get_request`), so the least busy
process is first in line and parallel associations spread evenly over the processes.

``dicom.maximum_associations`` holds for the node, all processes together
(:class:`AssociationSlots`); the free-space watermark is a ``statvfs`` of the shared
spool at every association request, so it holds across processes as it is.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qgate.core.service import Child, Supervisor

log = logging.getLogger(__name__)

#: Connections the shared socket queues before the kernel refuses more.
LISTEN_BACKLOG = 64

_PR_SET_PDEATHSIG = 1


def listen_socket(host: str, port: int, *, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when ``host`` has a colon).

    Non-blocking: every receiver process polls it and a process that loses the race for a
    connection gets ``BlockingIOError`` instead of waiting in ``accept``.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # "::" takes IPv4 connections too, as pynetdicom's own socket does on Linux.
    dualstack = host == "::" and socket.has_dualstack_ipv6()
    sock = socket.create_server(
        (host, port), family=family, backlog=backlog, dualstack_ipv6=dualstack
    )
    sock.setblocking(False)
    return sock


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when ``parent`` dies (``PR_SET_PDEATHSIG``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


#: The receive stage's slot folders in the temporary directory start with this.
SLOTS_PREFIX = "qgate-receive-slots-"

#: In a slot folder: the file its stage process holds an exclusive ``flock`` on while it
#: lives. Created under a temporary name and renamed once locked, so a folder whose
#: ``owner.lock`` can be locked by another process has lost its owner.
OWNER_LOCK = "owner.lock"


class SlotFolder:
    """The folder of a receive stage's :class:`AssociationSlots` and :class:`LoadBoard`.

    The stage process holds a lock on the folder's :data:`OWNER_LOCK` for as long as it
    lives (the file is not inherited by the listener processes), so the kernel drops the
    lock when the stage exits, ``kill -9`` included. :meth:`remove_stale` removes the
    folders whose owner is gone; :meth:`create` calls it first.

    Parameters
    ----------
    path : pathlib.Path
        The folder.
    owner_fd : int
        The open, locked :data:`OWNER_LOCK` in it.
    """

    def __init__(self, path: Path, owner_fd: int) -> None:
        self.path = path
        self._owner_fd: int | None = owner_fd

    @classmethod
    def create(cls, parent: Path | None = None) -> SlotFolder:
        """A new slot folder in ``parent`` (default: the temporary directory), owned by
        this process, after removing the stale ones there."""
        parent = Path(parent or tempfile.gettempdir())
        cls.remove_stale(parent)
        path = Path(tempfile.mkdtemp(prefix=SLOTS_PREFIX, dir=parent))
        staging = path / f".{OWNER_LOCK}"
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(staging, path / OWNER_LOCK)
        except BaseException:
            os.close(fd)
            shutil.rmtree(path, ignore_errors=True)
            raise
        return cls(path, fd)

    @staticmethod
    def remove_stale(parent: Path) -> list[Path]:
        """Remove the slot folders in ``parent`` whose owner process has exited; the ones
        removed. A folder without :data:`OWNER_LOCK` (still being created) is kept."""
        removed = []
        for path in sorted(parent.glob(f"{SLOTS_PREFIX}*")):
            try:
                fd = os.open(path / OWNER_LOCK, os.O_RDWR | os.O_CLOEXEC)
            except OSError:  # not there (yet), or not ours to open
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # BlockingIOError: its owner lives
                continue
            else:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            finally:
                os.close(fd)
        if removed:
            log.info("removed %d stale association slot folder(s) in %s", len(removed), parent)
        return removed

    def remove(self) -> None:
        """Remove the folder and give up its ownership (safe to call repeatedly)."""
        if self._owner_fd is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._owner_fd)
        self._owner_fd = None


class AssociationSlots:
    """At most ``maximum`` associations at once across the processes of one node.

    One lock file per slot in ``folder`` (a local folder the receive stage creates). An
    association holds an exclusive ``flock`` on a file of its own opening; a lock is
    per open file, so it excludes other threads and processes alike, and the kernel
    drops it when the holder closes the file or dies, so a crashed process frees its
    slots.
    """

    def __init__(self, folder: Path, maximum: int) -> None:
        self.folder = folder
        self.maximum = maximum
        self._lock = threading.Lock()
        self._held: weakref.WeakKeyDictionary[object, weakref.finalize[..., None]] = (
            weakref.WeakKeyDictionary()
        )

    def _path(self, k: int) -> Path:
        return self.folder / f"slot-{k:04d}.lock"

    def acquire(self, owner: object) -> bool:
        """Take a free slot for ``owner`` (an association); ``False`` if none is free.

        The slot is released by :meth:`release`, or when ``owner`` is garbage-collected.

        Raises
        ------
        OSError
            The folder cannot be read or written (the caller refuses the association).
        """
        for k in range(self.maximum):
            fd = os.open(self._path(k), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            with self._lock:
                self._held[owner] = weakref.finalize(owner, os.close, fd)
            return True
        return False

    def release(self, owner: object) -> None:
        """Free ``owner``'s slot; nothing if it holds none (safe to call repeatedly)."""
        with self._lock:
            fin = self._held.pop(owner, None)
        if fin is not None:
            fin()

    def __len__(self) -> int:
        """Slots this process holds."""
        with self._lock:
            return len(self._held)


class LoadBoard:
    """How many connections each receiver process of a node serves: one 4-byte cell per
    process in a file all of them map (``board`` in the slot folder). A process writes
    only its own cell; a stale cell (a process that died) is rewritten by its
    replacement, and costs at most a few milliseconds of deferral meanwhile."""

    def __init__(self, folder: Path, index: int, size: int) -> None:
        self.index = index
        fd = os.open(folder / "board", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < 4 * size:
                os.ftruncate(fd, 4 * size)
            self._map = mmap.mmap(fd, 4 * size)
        finally:
            os.close(fd)
        self._cells = memoryview(self._map).cast("i")
        self._cells[index] = 0

    def publish(self, serving: int) -> None:
        """Set this process's count."""
        self._cells[self.index] = serving

    def lead(self, serving: int) -> int:
        """How many connections more than the least busy process this one serves."""
        return serving - min(self._cells)


@dataclass
class ListenerChild(Child):
    """One listener process: ``argv`` inherits ``pass_fds`` (the listening socket)."""

    pass_fds: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return f"receiver process {self.argv[-1]} of stage receive"

    def start(self) -> None:
        # No preexec_fn: this process has threads. The child asks for PR_SET_PDEATHSIG
        # itself (die_with_parent, given this pid), before it accepts anything.
        self.proc = subprocess.Popen(self.argv, pass_fds=self.pass_fds)
        self.started_at = time.monotonic()
        log.info("%s started (pid %d)", self.label, self.proc.pid)


@dataclass
class ListenerSupervisor(Supervisor):
    """Runs ``count`` listener processes (``qgate receive --listen-fd``) until
    :meth:`run`'s event is set, restarting one that exits (``qgate serve``'s backoff).

    Run it on a thread that lives as long as its children: ``PR_SET_PDEATHSIG`` fires
    when the thread that started a child ends.
    """

    title: str = "the listener processes of stage receive"
    sock: socket.socket | None = None
    slots: Path | None = None
    count: int = 0
    receive_argv: Sequence[str] = field(default_factory=list)

    def start(self) -> None:
        assert self.sock is not None and self.slots is not None
        fd = self.sock.fileno()
        self.children = [
            ListenerChild(
                "receive",
                [
                    *self.receive_argv,
                    "--listen-fd",
                    str(fd),
                    "--slots",
                    str(self.slots),
                    "--parent",
                    str(os.getpid()),
                    "--listener",
                    str(k),
                ],
                pass_fds=(fd,),
            )
            for k in range(1, self.count + 1)
        ]
        for child in self.children:
            child.start()


def receive_argv(cli_args: Sequence[str]) -> list[str]:
    """The command of a listener process, before its ``--listen-fd`` options."""
    return [sys.executable, "-m", "qgate.cli", *cli_args, "receive"]


def inherited_socket(fd: int) -> socket.socket:
    """The listening socket a listener process inherited as ``fd`` (non-blocking)."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock
