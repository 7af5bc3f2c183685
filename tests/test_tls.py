"""DICOM TLS against dcmtk: ``storescu``/``echoscu +tls`` into qgate, qgate into ``storescp
+tls``; plain-TCP clients and untrusted or missing certificates refused.

The database is not what these tests exercise, so they run on SQLite only.
"""

from __future__ import annotations

import hashlib
import inspect
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from pynetdicom.transport import AssociationServer
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings, TLSConfig, load_settings
from qgate.core.db import Instance, make_engine, make_session_factory, upgrade
from qgate.core.tls import TLSConfigError, client_context, server_context
from qgate.dispatch.scu import Destination, send_files
from qgate.receive import start_scp
from qgate.synth import make_ct_series, write_series
from tests.conftest import free_port
from tests.support.dicomfiles import DCMTK_ENV
from tests.support.storescp import storescp
from tests.support.tls import PKI, make_pki

# sha256 of pynetdicom 3.0.4's AssociationServer.get_request, which
# qgate.receive.reactor.DeferredHandshakeServer.get_request repeats without the handshake.
UPSTREAM_GET_REQUEST_SHA256 = "925a4f3a3042f6e4b944505d06dc19c41e10ff7dec5385c794d62d31fd000300"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _settings(tmp_path: Path, **dicom: object) -> Settings:
    url = f"sqlite:///{tmp_path / 'qgate.db'}"
    upgrade(url)
    return load_settings(
        path=None,
        database={"url": url},
        storage={"root": tmp_path / "var", "fsync": False, "min_free_mb": 0},
        dicom={"port": free_port(), "host": "127.0.0.1", **dicom},
    )


@pytest.fixture
def tls_scp(tmp_path: Path, pki: PKI) -> Iterator[tuple[Settings, sessionmaker[Session]]]:
    """qgate's SCP with TLS on, client certificates required and checked against the CA."""
    settings = _settings(
        tmp_path,
        tls={
            "enabled": True,
            "certificate": pki.server.certificate,
            "private_key": pki.server.private_key,
            "ca_bundle": pki.ca,
            "require_client_certificate": True,
        },
    )
    engine = make_engine(settings.database.url)
    sessions = make_session_factory(engine)
    server = start_scp(settings, sessions)
    yield settings, sessions
    server.shutdown()
    engine.dispose()


def _files(folder: Path, n: int = 3) -> list[Path]:
    return write_series(make_ct_series(n, 32, 32, seed=3), folder)


def _stored(sessions: sessionmaker[Session]) -> int:
    with sessions() as s:
        return int(s.scalar(select(func.count(Instance.id))) or 0)


def _trusted(pki: PKI) -> list[str]:
    """dcmtk's TLS options for a client with a certificate qgate trusts."""
    return ["+tls", str(pki.client.private_key), str(pki.client.certificate), "+cf", str(pki.ca)]


def _dcmtk(
    tool: str, port: int, tls: list[str], paths: Sequence[Path] = ()
) -> subprocess.CompletedProcess[str]:
    cmd = [tool, "-aet", "MODALITY", "-aec", "QGATE", *tls, "127.0.0.1", str(port)]
    return subprocess.run(
        [*cmd, *map(str, paths)], capture_output=True, text=True, env=DCMTK_ENV, timeout=60
    )


def test_storescu_and_echoscu_over_tls_are_served(
    tls_scp: tuple[Settings, sessionmaker[Session]], pki: PKI, tmp_path: Path
) -> None:
    settings, sessions = tls_scp
    tls = _trusted(pki)
    echo = _dcmtk("echoscu", settings.dicom.port, tls)
    assert echo.returncode == 0, echo.stderr
    paths = _files(tmp_path / "in", 3)
    sent = _dcmtk("storescu", settings.dicom.port, tls, paths)
    assert sent.returncode == 0, sent.stderr
    assert _stored(sessions) == 3


@pytest.mark.parametrize("who", ["plain-tcp", "untrusted-certificate", "no-certificate"])
def test_clients_without_a_trusted_certificate_are_refused(
    tls_scp: tuple[Settings, sessionmaker[Session]], pki: PKI, tmp_path: Path, who: str
) -> None:
    settings, sessions = tls_scp
    tls = {
        "plain-tcp": [],
        # A well-formed certificate from a CA qgate does not trust.
        "untrusted-certificate": [
            "+tls", str(pki.rogue_client.private_key), str(pki.rogue_client.certificate),
            "+cf", str(pki.ca),
        ],
        # TLS without a client certificate, while one is required.
        "no-certificate": ["+tla", "+cf", str(pki.ca)],
    }[who]  # fmt: skip
    paths = _files(tmp_path / "in", 2)
    sent = _dcmtk("storescu", settings.dicom.port, tls, paths)
    assert sent.returncode != 0
    assert _stored(sessions) == 0
    # The server still serves a trusted client afterwards.
    assert _dcmtk("echoscu", settings.dicom.port, _trusted(pki)).returncode == 0


def test_a_silent_connection_does_not_hold_up_the_next_handshake(
    tls_scp: tuple[Settings, sessionmaker[Session]], pki: PKI
) -> None:
    """The handshake runs on the connection's thread, not the accepting one."""
    settings, _ = tls_scp
    with socket.create_connection(("127.0.0.1", settings.dicom.port)):
        time.sleep(0.2)  # connected, says nothing
        started = time.monotonic()
        echo = _dcmtk("echoscu", settings.dicom.port, _trusted(pki))
        assert echo.returncode == 0, echo.stderr
        assert time.monotonic() - started < 10


@pytest.fixture
def tls_archive(tmp_path: Path, pki: PKI) -> Iterator[tuple[Destination, Path]]:
    """storescp with TLS, requiring a client certificate from the test CA (-rc)."""
    port = free_port()
    tls = [
        "+tls", str(pki.server.private_key), str(pki.server.certificate),
        "+cf", str(pki.ca), "-rc",
    ]  # fmt: skip
    with storescp(port, tmp_path / "archive", extra=tls) as out:
        yield Destination("ARCHIVE", "127.0.0.1", port), out


def _archive_tls(pki: PKI, **kw: object) -> TLSConfig:
    fields: dict[str, object] = {
        "enabled": True,
        "certificate": pki.client.certificate,
        "private_key": pki.client.private_key,
        "ca_bundle": pki.ca,
    }
    fields.update(kw)
    return TLSConfig.model_validate(fields)


def test_qgate_sends_to_storescp_over_tls(
    tls_archive: tuple[Destination, Path], pki: PKI, tmp_path: Path
) -> None:
    dest, out = tls_archive
    paths = _files(tmp_path / "send", 3)
    result = send_files(
        paths, dest, calling_aet="QGATE", timeout=20, tls=client_context(_archive_tls(pki))
    )
    assert result.ok, result.summary()
    assert len(list(out.iterdir())) == 3


@pytest.mark.parametrize("wrong", ["archive-not-trusted", "no-client-certificate", "plain-tcp"])
def test_sending_fails_without_mutual_trust(
    tls_archive: tuple[Destination, Path], pki: PKI, tmp_path: Path, wrong: str
) -> None:
    dest, out = tls_archive
    tls: ssl.SSLContext | None = {
        # qgate trusts only the rogue CA, so the archive's certificate does not verify.
        "archive-not-trusted": client_context(_archive_tls(pki, ca_bundle=pki.rogue_ca)),
        # the archive requires a client certificate; qgate presents none.
        "no-client-certificate": client_context(
            _archive_tls(pki, certificate=None, private_key=None)
        ),
        "plain-tcp": None,
    }[wrong]
    paths = _files(tmp_path / "send", 2)
    result = send_files(paths, dest, calling_aet="QGATE", timeout=10, tls=tls)
    assert not result.ok
    assert result.stored_count == 0
    assert not any(out.iterdir())


def test_server_hostname_is_checked(
    tls_archive: tuple[Destination, Path], pki: PKI, tmp_path: Path
) -> None:
    """The archive's certificate names localhost and 127.0.0.1, nothing else."""
    dest, _ = tls_archive
    paths = _files(tmp_path / "send", 1)
    ctx = client_context(_archive_tls(pki))
    wrong = send_files(
        paths, dest, calling_aet="QGATE", timeout=10, tls=ctx, server_hostname="pacs"
    )
    assert not wrong.ok
    right = send_files(
        paths, dest, calling_aet="QGATE", timeout=10, tls=ctx, server_hostname="localhost"
    )
    assert right.ok, right.summary()


def test_contexts_are_tls12_or_newer_and_bad_files_stop_start_up(pki: PKI, tmp_path: Path) -> None:
    server = server_context(
        TLSConfig(
            enabled=True, certificate=pki.server.certificate, private_key=pki.server.private_key
        )
    )
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_NONE
    assert client_context(_archive_tls(pki)).minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(TLSConfigError, match="not a file"):
        server_context(
            TLSConfig(enabled=True, certificate=tmp_path / "x.crt", private_key=tmp_path / "x.key")
        )
    with pytest.raises(TLSConfigError, match="do not load"):  # key of another certificate
        server_context(
            TLSConfig(
                enabled=True, certificate=pki.server.certificate, private_key=pki.client.private_key
            )
        )
    with pytest.raises(ValueError, match="set together"):
        TLSConfig(enabled=True, certificate=pki.server.certificate)


def test_the_replaced_get_request_matches_the_installed_pynetdicom() -> None:
    src = inspect.getsource(AssociationServer.get_request)
    assert hashlib.sha256(src.encode()).hexdigest() == UPSTREAM_GET_REQUEST_SHA256
