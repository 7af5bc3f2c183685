"""Several receiver processes on one port (dicom.receivers), against real DICOM peers."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import create_engine, select

from qgate.core.db.models import Instance
from qgate.synth import make_ct_series, write_series
from tests.conftest import free_port
from tests.support.qgate_proc import QgateProcess


def _config(tmp_path: Path, **dicom: Any) -> dict[str, Any]:
    return {
        "dicom": {"ae_title": "QGATE", "host": "127.0.0.1", "port": free_port(), **dicom},
        "series": {"stable_seconds": 3600, "release_grace_seconds": 3600},
        "database": {"url": f"sqlite:///{tmp_path / 'qgate.db'}"},
        "storage": {"root": str(tmp_path / "var"), "fsync": False, "min_free_mb": 0},
    }


@pytest.fixture
def receivers(tmp_path: Path) -> Iterator[QgateProcess]:
    """``qgate receive`` with two receiver processes."""
    q = QgateProcess(tmp_path / "q", _config(tmp_path, receivers=2), command=["receive"])
    q.cli("db", "upgrade")
    q.start()
    try:
        yield q
    finally:
        q.stop()


def _listeners(q: QgateProcess, started: int = 1, *, stage: int | None = None) -> list[int]:
    """The listener processes of the receive stage (``q`` itself, or its child ``stage``),
    once ``started`` of them (killed ones included) have logged that they run."""
    assert q.proc is not None
    pid = stage or q.proc.pid
    deadline = time.monotonic() + 30
    while True:
        # Listeners are children of the stage's supervising thread, not its main thread.
        children = [
            int(c)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()
        ]
        running = q.log().count("stage receive running") - 1  # less the stage's own line
        if (children and running >= started) or time.monotonic() > deadline:
            return children
        time.sleep(0.1)


def _owner(pids: list[int], peer_port: int) -> int | None:
    """Which of ``pids`` holds the server side of the connection from ``peer_port``."""
    inodes: dict[str, str] = {}  # socket inode -> remote port (hex)
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            inodes[fields[9]] = fields[2].rsplit(":", 1)[1]
    want = f"{peer_port:04X}"
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and inodes.get(target[8:-1]) == want:
                return pid
    return None


def _scu() -> AE:
    ae = AE("MODALITY")
    ae.add_requested_context(CTImageStorage)
    return ae


def _associate(q: QgateProcess) -> tuple[Association, int]:
    port = free_port()
    assoc = _scu().associate("127.0.0.1", q.port, ae_title=q.ae_title, bind_address=("", port))
    return assoc, port


def _owned_by_each(q: QgateProcess, pids: list[int]) -> list[tuple[Association, int]]:
    """Open associations until every one of ``pids`` serves at least one."""
    held: list[tuple[Association, int]] = []
    owners: set[int] = set()
    for _ in range(12):
        assoc, port = _associate(q)
        assert assoc.is_established
        deadline = time.monotonic() + 5
        while (owner := _owner(pids, port)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert owner is not None
        held.append((assoc, owner))
        owners.add(owner)
        if owners == set(pids):
            return held
    raise AssertionError(f"associations went to {owners} only, of {pids}")


def _recorded(tmp_path: Path) -> list[tuple[str, str]]:
    engine = create_engine(f"sqlite:///{tmp_path / 'qgate.db'}")
    with engine.connect() as conn:
        rows = conn.execute(select(Instance.sop_instance_uid, Instance.path)).all()
    engine.dispose()
    return [(str(u), str(p)) for u, p in rows]


def test_two_receiver_processes_share_the_port_and_lose_nothing(
    receivers: QgateProcess, tmp_path: Path
) -> None:
    q = receivers
    pids = [q.proc.pid, *_listeners(q)]  # type: ignore[union-attr]
    assert len(pids) == 2
    held = _owned_by_each(q, pids)

    # Every held association (on both processes) sends its own series, all at once,
    # beside a dcmtk storescu association.
    series = [make_ct_series(6, 64, 64, seed=k) for k in range(len(held) + 1)]
    files = write_series(series[-1], tmp_path / "storescu")
    statuses: list[int] = []

    def send(assoc: Association, datasets: list[Dataset]) -> None:
        statuses.extend(int(assoc.send_c_store(ds).Status) for ds in datasets)
        assoc.release()

    threads = [
        threading.Thread(target=send, args=(assoc, ds))
        for (assoc, _), ds in zip(held, series, strict=False)
    ]
    for t in threads:
        t.start()
    r = q.storescu(files)
    for t in threads:
        t.join(60)
    assert r.returncode == 0, r.stderr
    assert statuses == [0] * (6 * len(held))

    sent = {str(ds.SOPInstanceUID) for s in series for ds in s}
    rows = _recorded(tmp_path)
    assert sorted(u for u, _ in rows) == sorted(sent)  # each exactly once
    root = tmp_path / "var"
    assert all((root / path).is_file() for _, path in rows)
    assert {p.stem for p in (root / "spool").rglob("*.dcm")} == sent


def test_maximum_associations_holds_across_the_processes(tmp_path: Path) -> None:
    cfg = _config(tmp_path, receivers=2, maximum_associations=2)
    q = QgateProcess(tmp_path / "q", cfg, command=["receive"])
    q.cli("db", "upgrade")
    q.start()
    try:
        pids = [q.proc.pid, *_listeners(q)]  # type: ignore[union-attr]
        held = _owned_by_each(q, pids)
        assert len(held) == 2  # one in each process: the node's limit is reached
        for _ in range(4):  # wherever a third lands, it is refused
            extra, _port = _associate(q)
            assert extra.is_rejected
        held[0][0].release()
        deadline = time.monotonic() + 5
        while True:  # the slot is free once the acceptor has seen the release
            again, _port = _associate(q)
            if again.is_established or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert again.is_established
        again.release()
        held[1][0].release()
    finally:
        q.stop()


def test_a_killed_receiver_process_is_replaced(receivers: QgateProcess) -> None:
    q = receivers
    [listener] = _listeners(q)
    os.kill(listener, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while _listeners(q) == [listener] and time.monotonic() < deadline:
        time.sleep(0.2)
    [replacement] = _listeners(q, started=2)
    assert replacement != listener
    held = _owned_by_each(q, [q.proc.pid, replacement])  # type: ignore[union-attr]
    for assoc, _ in held:
        assoc.release()
    assert q.echo()


def test_serve_runs_the_configured_receiver_processes(tmp_path: Path) -> None:
    cfg = {
        **_config(tmp_path, receivers=3),
        "scoring": {"scorers": ["noise", "snr"]},
        "retrain": {"enabled": False},
    }
    q = QgateProcess(tmp_path / "q", cfg).start()  # qgate serve
    try:
        assert q.proc is not None
        serve = q.proc.pid
        [receive] = [
            int(c)
            for c in Path(f"/proc/{serve}/task/{serve}/children").read_text().split()
            if Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0")[-2] == b"receive"
        ]
        listeners = _listeners(q, started=2, stage=receive)
        assert len(listeners) == 2
        assert q.echo()
    finally:
        q.stop()
    # The stop is logged per process, with how each ended; the receive stage stopping its
    # listener processes is not the service stopping.
    log = q.log()
    for pid in listeners:
        assert re.search(
            rf"receiver process \d of stage receive \(pid {pid}\) stopped: exit status 0", log
        )
    assert log.count("the listener processes of stage receive stopped") == 1
    assert f"stage receive (pid {receive}) stopped: exit status 0" in log
    assert log.count("qgate serve stopped") == 1 and "qgate stopped" not in log
    assert log.rstrip().endswith("qgate serve stopped")


def test_a_slot_folder_is_removed_once_its_owner_is_gone(tmp_path: Path) -> None:
    """A folder whose stage process was killed goes at the next start; a live owner's
    folder, and a folder still being created (no owner.lock yet), stay."""
    import subprocess
    import sys

    from qgate.receive.listener import OWNER_LOCK, SLOTS_PREFIX, SlotFolder

    code = (
        "import sys, time; from pathlib import Path; "
        "from qgate.receive.listener import SlotFolder; "
        "print(SlotFolder.create(Path(sys.argv[1])).path, flush=True); time.sleep(60)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    killed = Path(child.stdout.readline().strip())
    assert (killed / OWNER_LOCK).exists()
    live = SlotFolder.create(tmp_path)
    assert SlotFolder.remove_stale(tmp_path) == []  # the child still holds its lock
    child.kill()
    child.wait()
    creating = tmp_path / f"{SLOTS_PREFIX}creating"
    creating.mkdir()

    fresh = SlotFolder.create(tmp_path)  # removes the killed child's folder
    assert not killed.exists()
    assert live.path.is_dir() and creating.is_dir() and fresh.path.is_dir()
    fresh.remove()
    live.remove()
    assert not live.path.exists()
    assert sorted(tmp_path.iterdir()) == [creating]


def test_a_stage_killed_with_its_slot_folder_leaves_none_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kill -9`` of a receive stage with two processes leaves its folder in $TMPDIR;
    the next stage started there removes it."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    q = QgateProcess(tmp_path / "q", _config(tmp_path, receivers=2), command=["receive"])
    q.cli("db", "upgrade")
    try:
        q.start()
        [first] = list(tmpdir.glob("qgate-receive-slots-*"))
        q.stop(kill=True)
        assert first.is_dir()
        q.start()
        [second] = list(tmpdir.glob("qgate-receive-slots-*"))
        assert second != first
        q.stop()
        assert list(tmpdir.glob("qgate-receive-slots-*")) == []
    finally:
        q.stop(kill=True)
