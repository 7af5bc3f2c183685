"""``qgate serve``: every stage as a child process on this machine, supervised.

receive (SCP + assembly) -> worker (scoring + scheduled housekeeping) -> dispatch, and the
review app (web). Stages talk only through the SQL store and the storage root, so each
runs in its own process (``qgate receive``, ``qgate worker``, ``qgate dispatch``,
``qgate web``), and any of them can run on other machines too.

The supervisor migrates the database, then starts one process per stage with the same
configuration (the same ``--config`` and environment). A child that exits is started
again after a backoff (1 s, doubling to 30 s while it keeps failing within a minute of
its start; a child whose worker slot is restarted requeues the jobs it held). SIGTERM or
SIGINT stops every child with SIGTERM (each finishes the item in hand) and waits for them;
one that has not exited after ``STOP_TIMEOUT`` seconds is killed. Each exit is logged with
the child it was and how it ended (:func:`describe_exit`); "qgate serve stopped" only when
the supervisor itself has stopped all of them. Should the supervisor
itself die, the kernel kills its children (``PR_SET_PDEATHSIG``): a crash of the service
stays one crash, with nothing left bound to its ports.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qgate.core.config import Settings
from qgate.core.db import upgrade
from qgate.core.stage import STAGE_NAMES, StageName

log = logging.getLogger(__name__)

#: Seconds a stopping child gets before it is killed (a scoring job in hand finishes).
STOP_TIMEOUT = 90.0
#: Restart backoff: first delay, cap, and how long a child must run to reset it.
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET = 1.0, 30.0, 60.0
_PR_SET_PDEATHSIG = 1


def stages_for(settings: Settings) -> tuple[StageName, ...]:
    """The stages ``qgate serve`` runs: all of them, the review app only when enabled."""
    return tuple(s for s in STAGE_NAMES if s != "web" or settings.web.enabled)


def describe_exit(returncode: int) -> str:
    """How a child process ended, for the logs: "exit status 0", "killed by SIGKILL"."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


def _die_with_parent(parent: int) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl
            os._exit(1)

    return preexec


@dataclass
class Child:
    """One supervised stage process."""

    stage: StageName
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    delay: float = BACKOFF_FIRST
    due_at: float = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def label(self) -> str:
        """How the logs name this child."""
        return f"stage {self.stage}"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, preexec_fn=_die_with_parent(os.getpid()))
        self.started_at = time.monotonic()
        log.info("%s started (pid %d)", self.label, self.proc.pid)


@dataclass
class Supervisor:
    """Runs ``stages`` as ``qgate <stage>`` children until :meth:`run`'s event is set.

    ``cli_args`` go before the stage name of every child (``--config PATH``, ``-v``), so
    each reads the configuration the supervisor read; the environment is inherited.
    """

    settings: Settings
    cli_args: Sequence[str] = ()
    stages: Sequence[StageName] | None = None
    children: list[Child] = field(default_factory=list)
    #: What the logs call this supervisor and all its children together.
    title: str = "qgate serve"

    def _argv(self, stage: StageName) -> list[str]:
        return [sys.executable, "-m", "qgate.cli", *self.cli_args, stage]

    def start(self) -> None:
        s = self.settings
        s.spool_dir.mkdir(parents=True, exist_ok=True)
        s.outgoing_dir.mkdir(parents=True, exist_ok=True)
        upgrade(s.database.url, storage_root=s.storage.root)
        stages = self.stages if self.stages is not None else stages_for(s)
        self.children = [Child(stage, self._argv(stage)) for stage in stages]
        for child in self.children:
            child.start()
        log.info(
            "qgate serving %s on %s:%d (mode %s): %s",
            s.dicom.ae_title,
            s.dicom.host,
            s.dicom.port,
            s.gate.mode,
            ", ".join(f"{c.stage} (pid {c.pid})" for c in self.children),
        )

    def poll(self) -> None:
        """Restart the children that exited, each after its backoff."""
        now = time.monotonic()
        for child in self.children:
            proc = child.proc
            if proc is not None and proc.poll() is None:
                continue
            if proc is not None:  # it just exited: schedule its restart
                ran = now - child.started_at
                child.delay = BACKOFF_FIRST if ran >= BACKOFF_RESET else child.delay
                child.due_at = now + child.delay
                log.error(
                    "%s (pid %d) exited unasked (%s) after %.0f s; restarting it in %.0f s",
                    child.label,
                    proc.pid,
                    describe_exit(proc.returncode),
                    ran,
                    child.delay,
                )
                child.delay = min(child.delay * 2, BACKOFF_MAX)
                child.proc = None
            if now >= child.due_at:
                child.restarts += 1
                child.start()

    def stop(self) -> None:
        """SIGTERM every child, wait for them, kill what is left after STOP_TIMEOUT; log
        how each ended."""
        running = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        log.info("%s stopping: SIGTERM to %d process(es)", self.title, len(running))
        for child in running:
            assert child.proc is not None
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in running:
            proc = child.proc
            assert proc is not None
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error(
                    "%s (pid %d) did not stop within %.0f s of SIGTERM: killed",
                    child.label,
                    proc.pid,
                    STOP_TIMEOUT,
                )
                proc.kill()
                proc.wait()
                continue
            log.info(
                "%s (pid %d) stopped: %s", child.label, proc.pid, describe_exit(proc.returncode)
            )
        log.info("%s stopped", self.title)

    def run(self, stop: threading.Event, *, interval: float = 0.5) -> None:
        """Start, supervise until ``stop`` is set, then stop."""
        self.start()
        try:
            while not stop.wait(interval):
                self.poll()
        finally:
            self.stop()


def config_args(config_path: Path | None, *, verbose: bool) -> list[str]:
    """The options a child needs to read the configuration its supervisor read."""
    args = ["--config", str(Path(config_path).absolute())] if config_path is not None else []
    return [*args, "-v"] if verbose else args
