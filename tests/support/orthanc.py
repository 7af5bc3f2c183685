"""A real archive for tests and benchmarks: the Debian Orthanc, private and on loopback.

``start_orthanc`` writes a minimal configuration into ``workdir`` (its own storage and index
folders, no plugins, no authentication, HTTP reachable from loopback only, any calling AE
accepted, the called AE not checked), starts ``/usr/sbin/Orthanc`` with ``TCP_NODELAY=1``
(without it every C-STORE to a DCMTK peer stalls ~40 ms on Nagle + delayed ACK) and waits
until both the REST API and the DICOM port answer.

Orthanc 1.10 has no DICOM bind address: the DICOM port listens on every interface, but
only for as long as the test runs.

Usage::

    with start_orthanc(tmp_path / "orthanc", dicom_port=p1, http_port=p2) as archive:
        ...
        assert archive.get("/statistics")["CountInstances"] == 8

or the function-scoped pytest fixture ``orthanc`` (import it into the test module).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import requests

ORTHANC_BIN = "/usr/sbin/Orthanc"


def orthanc_available() -> bool:
    """True if the Orthanc binary is installed (tests that need it fail without it)."""
    return Path(ORTHANC_BIN).is_file() or shutil.which("Orthanc") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancError(RuntimeError):
    """Orthanc did not start, or stopped unexpectedly."""


class Orthanc:
    """One Orthanc process with its own configuration and storage under ``workdir``.

    Parameters
    ----------
    workdir : Path
        Folder for ``orthanc.json``, ``storage/``, ``index/`` and ``orthanc.log``.
    dicom_port, http_port : int
        Loopback ports for the DICOM and REST servers.
    aet : str
        Orthanc's own (called) AE title; not checked against what callers ask for.
    verbose : bool
        Start with ``--verbose`` (association-level log lines in ``log_path``).
    extra_config : dict, optional
        Keys merged over the generated configuration (e.g. ``{"SyncStorageArea": False}``).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        dicom_port: int,
        http_port: int,
        aet: str = "ARCHIVE",
        verbose: bool = False,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.aet = aet
        self.host = "127.0.0.1"
        self.verbose = verbose
        self.url = f"http://{self.host}:{http_port}"
        self.config_path = self.workdir / "orthanc.json"
        # One log per start (Orthanc truncates its log file): orthanc-1.log, orthanc-2.log...
        self.log_path = self.workdir / "orthanc-1.log"
        self._starts = 0
        self._extra = dict(extra_config or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._http = requests.Session()

    # -- lifecycle ---------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The configuration written to ``orthanc.json``."""
        cfg: dict[str, Any] = {
            "Name": f"qgate-test-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [],
            "LuaScripts": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # REST from loopback only
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "HttpThreadsCount": 8,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,  # unknown calling AEs may store
            "DicomCheckModalityHost": False,
            "DicomModalities": {},
            "UnknownSopClassAccepted": True,
            "TcpNoDelay": True,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "StableAge": 1,
        }
        cfg.update(self._extra)
        return cfg

    def start(self, timeout: float = 30.0) -> Orthanc:
        """Write the configuration, start the process and wait until it answers."""
        if self.running:
            return self
        if not orthanc_available():
            raise OrthancError(
                f"Orthanc is not installed ({ORTHANC_BIN}): the tests need the real archive; "
                "install it with `apt-get install orthanc` (see README)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        self._starts += 1
        self.log_path = self.workdir / f"orthanc-{self._starts}.log"
        env = dict(os.environ, TCP_NODELAY="1")
        args = [ORTHANC_BIN, f"--logfile={self.log_path}", str(self.config_path)]
        if self.verbose:
            args.insert(1, "--verbose")
        self._proc = subprocess.Popen(
            args,
            env=env,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise OrthancError(f"Orthanc exited during start-up:\n{self.log_tail()}")
            # The DICOM server starts before the HTTP server; the log line confirms it
            # without opening a probe association (which Orthanc would log and count).
            if self._answers_http() and "DICOM server listening" in self.log_tail(None):
                return
            if time.monotonic() > deadline:
                raise OrthancError(f"Orthanc not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _answers_http(self) -> bool:
        try:
            return self._http.get(f"{self.url}/system", timeout=1.0).status_code == 200
        except requests.RequestException:
            return False

    def stop(self, timeout: float = 15.0, *, kill: bool = False) -> None:
        """Stop the process: SIGTERM (a clean shutdown takes a few seconds), or SIGKILL.

        Storage is kept either way, for ``restart``.
        """
        proc, self._proc = self._proc, None
        self._http.close()  # an idle keep-alive connection slows the HTTP server's shutdown
        if proc is None:
            return
        if proc.poll() is None:
            if kill:
                proc.kill()
            else:
                proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)

    def restart(self, timeout: float = 30.0) -> Orthanc:
        """Stop and start again on the same ports and storage."""
        self.stop()
        return self.start(timeout)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, n_chars: int | None = 4000) -> str:
        """The end of the current process's log (all of it for ``None``)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text if n_chars is None else text[-n_chars:]

    def log_text(self) -> str:
        """The logs of every start so far, oldest first."""
        parts = []
        for i in range(1, self._starts + 1):
            path = self.workdir / f"orthanc-{i}.log"
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def associations_received(self) -> int:
        """DICOM associations Orthanc logged (needs ``verbose=True``)."""
        if not self.verbose:
            raise RuntimeError("start Orthanc with verbose=True to log associations")
        return self.log_text().count("Association Received")

    def __enter__(self) -> Orthanc:
        return self.start() if not self.running else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._http.close()

    # -- REST ---------------------------------------------------------------------------

    def get(self, path: str, **params: Any) -> Any:
        """GET ``path`` (e.g. ``/statistics``) and return the decoded JSON."""
        r = self._http.get(f"{self.url}{path}", params=params or None, timeout=30)
        r.raise_for_status()
        return r.json()

    def get_bytes(self, path: str) -> bytes:
        """GET ``path`` (e.g. ``/instances/ID/file``) and return the raw body."""
        r = self._http.get(f"{self.url}{path}", timeout=60)
        r.raise_for_status()
        return r.content

    def post(self, path: str, body: Any = None) -> Any:
        """POST JSON ``body`` to ``path`` and return the decoded JSON (or None)."""
        r = self._http.post(f"{self.url}{path}", json=body, timeout=60)
        r.raise_for_status()
        return r.json() if r.content else None

    def delete(self, path: str) -> None:
        self._http.delete(f"{self.url}{path}", timeout=30).raise_for_status()

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def sop_instance_uids(self, series_uid: str | None = None) -> set[str]:
        """SOP Instance UIDs stored, optionally only those of one series."""
        query = {"SeriesInstanceUID": series_uid} if series_uid else {}
        found = self.post(
            "/tools/find",
            {"Level": "Instance", "Query": query, "Expand": True},
        )
        return {inst["MainDicomTags"]["SOPInstanceUID"] for inst in found}

    def find_series(self, series_uid: str) -> list[str]:
        """Orthanc IDs of the series with this Series Instance UID (0 or 1 entries)."""
        r = self._http.post(f"{self.url}/tools/lookup", data=series_uid, timeout=30)
        r.raise_for_status()
        return [hit["ID"] for hit in r.json() if hit.get("Type") == "Series"]

    def wipe(self) -> None:
        """Delete every patient (and so every instance) stored."""
        for pid in self.get("/patients"):
            self.delete(f"/patients/{pid}")


def start_orthanc(
    workdir: Path,
    *,
    dicom_port: int,
    http_port: int,
    aet: str = "ARCHIVE",
    verbose: bool = False,
    extra_config: dict[str, Any] | None = None,
    timeout: float = 30.0,
) -> Orthanc:
    """Start Orthanc in ``workdir`` on loopback ports; returns it running (stop it after)."""
    return Orthanc(
        workdir,
        dicom_port=dicom_port,
        http_port=http_port,
        aet=aet,
        verbose=verbose,
        extra_config=extra_config,
    ).start(timeout)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A running Orthanc (AE ``ARCHIVE``, verbose log) on free loopback ports, killed after."""
    with start_orthanc(
        tmp_path / "orthanc", dicom_port=_free_port(), http_port=_free_port(), verbose=True
    ) as archive:
        yield archive
        archive.stop(kill=True)  # a clean shutdown takes ~3 s; this storage is thrown away
