"""DICOM TLS contexts (PS3.15 Annex B, BCP 195 profile: TLS 1.2 or newer) from ``TLSConfig``.

:func:`server_context` is handed to pynetdicom's server (``ssl_context``) and
:func:`client_context` to ``AE.associate(tls_args=...)``. The files are read when the
context is built, at start-up, so a missing or mismatched certificate stops the service
with a clear message instead of failing association by association.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from qgate.core.config import TLSConfig


class TLSConfigError(ValueError):
    """A TLS setting names a file that is missing or does not fit (key vs certificate)."""


def _file(path: Path | None, key: str) -> str:
    if path is None:
        raise TLSConfigError(f"{key} is not set")
    if not path.is_file():
        raise TLSConfigError(f"{key} {path} is not a file")
    return str(path)


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    # BCP 195: no SSL 3.0, TLS 1.0 or 1.1; Python's defaults already drop weak ciphers.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def _load_chain(ctx: ssl.SSLContext, cfg: TLSConfig, where: str) -> None:
    cert = _file(cfg.certificate, f"{where}.certificate")
    key = _file(cfg.private_key, f"{where}.private_key")
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{where}: certificate and private key do not load: {exc}") from exc


def server_context(cfg: TLSConfig, *, where: str = "dicom.tls") -> ssl.SSLContext:
    """The SCP's context: qgate's certificate; clients verified against ``ca_bundle``.

    With ``require_client_certificate`` a client without a certificate trusted by
    ``ca_bundle`` fails the handshake; without it a client may present none, but one it
    does present must still be trusted (``CERT_OPTIONAL``) when ``ca_bundle`` is set.
    """
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(ctx, cfg, where)
    if cfg.ca_bundle is not None:
        ctx.load_verify_locations(cafile=_file(cfg.ca_bundle, f"{where}.ca_bundle"))
    if cfg.require_client_certificate:
        if cfg.ca_bundle is None:
            raise TLSConfigError(f"{where}.require_client_certificate needs {where}.ca_bundle")
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif cfg.ca_bundle is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(cfg: TLSConfig, *, where: str = "archive.tls") -> ssl.SSLContext:
    """The SCU's context: the peer is verified (chain and host name) against
    ``ca_bundle``, or the system's CAs when it is unset; our certificate goes along when
    one is configured."""
    cafile = _file(cfg.ca_bundle, f"{where}.ca_bundle") if cfg.ca_bundle is not None else None
    ctx = _harden(ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile))
    if cfg.certificate is not None:
        _load_chain(ctx, cfg, where)
    return ctx
