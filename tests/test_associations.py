"""Association policy of the SCP: called AE title, calling AE + address pairs, the
association limit and the free-space watermark, each answered with its A-ASSOCIATE-RJ.

The database is not what these tests exercise, so they run on SQLite only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import func, select

from qgate.core.config import AllowedPeer, Settings, load_settings
from qgate.core.db import Instance, make_engine, make_session_factory, upgrade
from qgate.core.diskspace import disk_space
from qgate.receive import start_scp
from qgate.receive.policy import REJECT_DISK_LOW, REJECT_PEER, peer_allowed
from qgate.synth import make_ct_series, write_series
from tests.conftest import free_port
from tests.support.dicomfiles import echoscu, storescu


def _settings(
    tmp_path: Path, *, storage: dict[str, object] | None = None, **dicom: object
) -> Settings:
    url = f"sqlite:///{tmp_path / 'qgate.db'}"
    upgrade(url)
    return load_settings(
        path=None,
        database={"url": url},
        storage={"root": tmp_path / "var", "fsync": False, "min_free_mb": 0, **(storage or {})},
        dicom={"port": free_port(), "host": "127.0.0.1", **dicom},
    )


@contextmanager
def _scp(settings: Settings) -> Iterator[int]:
    engine = make_engine(settings.database.url)
    server = start_scp(settings, make_session_factory(engine))
    try:
        yield settings.dicom.port
    finally:
        server.shutdown()
        engine.dispose()


def _associate(port: int, *, calling: str = "MODALITY", called: str = "QGATE") -> Association:
    ae = AE(calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", port, ae_title=called)


def _rejection(assoc: Association) -> tuple[int, int, int]:
    assert assoc.is_rejected, "the association was not rejected"
    rsp = assoc.acceptor.primitive
    assert rsp is not None
    return (rsp.result, rsp.result_source, rsp.diagnostic)


def test_a_wrong_called_ae_title_is_rejected(tmp_path: Path) -> None:
    with _scp(_settings(tmp_path)) as port:
        assert _rejection(_associate(port, called="NOT-QGATE")) == (0x01, 0x01, 0x07)
        assert echoscu(port).returncode == 0  # dcmtk calls QGATE
        assoc = _associate(port)
        assert assoc.is_established
        assoc.release()


def test_any_called_ae_title_when_not_required(tmp_path: Path) -> None:
    with _scp(_settings(tmp_path, require_called_aet=False)) as port:
        assoc = _associate(port, called="ANYTHING")
        assert assoc.is_established
        assoc.release()


def test_only_listed_calling_ae_and_address_pairs_associate(tmp_path: Path) -> None:
    peers = [
        {"ae_title": "MODALITY", "host": "127.0.0.1"},
        {"ae_title": "REMOTE", "host": "10.0.0.0/8"},
    ]
    with _scp(_settings(tmp_path, allowed_peers=peers)) as port:
        assoc = _associate(port, calling="MODALITY")
        assert assoc.is_established
        assoc.release()
        # Listed, but not from this address.
        assert _rejection(_associate(port, calling="REMOTE")) == REJECT_PEER
        assert _rejection(_associate(port, calling="STRANGER")) == REJECT_PEER
        assert echoscu(port, calling_aet="STRANGER").returncode != 0


def test_peer_matching() -> None:
    peers = [AllowedPeer(ae_title="CT1", host="192.168.1.0/24")]
    assert peer_allowed([], "ANY", "1.2.3.4")
    assert peer_allowed(peers, "CT1", "192.168.1.77")
    assert not peer_allowed(peers, "CT1", "192.168.2.1")
    assert not peer_allowed(peers, "CT2", "192.168.1.77")
    with pytest.raises(ValueError, match="IP address or network"):
        AllowedPeer(ae_title="CT1", host="ct1.example.org")


def test_associations_beyond_the_limit_are_rejected(tmp_path: Path) -> None:
    with _scp(_settings(tmp_path, maximum_associations=1)) as port:
        first = _associate(port)
        assert first.is_established
        # Transient, service provider (presentation), local limit exceeded.
        assert _rejection(_associate(port)) == (0x02, 0x03, 0x02)
        first.release()
        # The server's association thread ends just after it answers the release, so a
        # request sent at once may still find the slot taken (a modality retries as well);
        # the slot must be free again within a few seconds.
        deadline = time.monotonic() + 5.0
        again = _associate(port)
        while not again.is_established and time.monotonic() < deadline:
            assert _rejection(again) == (0x02, 0x03, 0x02)
            time.sleep(0.05)
            again = _associate(port)
        assert again.is_established
        again.release()


def test_below_the_free_space_watermark_new_associations_are_refused(tmp_path: Path) -> None:
    """A watermark above any real disk's free space: refused, nothing stored; back to
    normal once the watermark is lowered again (free space is read per association)."""
    settings = _settings(tmp_path, storage={"min_free_mb": 1 << 40})
    assert disk_space(settings).low
    paths = write_series(make_ct_series(2, 32, 32), tmp_path / "in")
    with _scp(settings) as port:
        assert _rejection(_associate(port)) == REJECT_DISK_LOW
        sent = storescu(port, paths, calling_aet="MODALITY")
        assert sent.returncode != 0
        assert "Local Limit Exceeded" in sent.stderr
        engine = make_engine(settings.database.url)
        with make_session_factory(engine)() as s:
            assert s.scalar(select(func.count(Instance.id))) == 0
        engine.dispose()
        settings.storage.min_free_mb = 1  # the same Settings object the SCP holds
        assoc = _associate(port)
        assert assoc.is_established
        assoc.release()
