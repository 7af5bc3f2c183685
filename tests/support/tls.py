"""Throwaway X.509 material for the DICOM TLS tests, made with the ``openssl`` command.

:func:`make_pki` writes a CA, a server certificate for ``localhost``/127.0.0.1 and a client
certificate signed by it, plus a second, untrusted CA with its own client certificate.
Keys are unencrypted EC P-256 (quick to make); every certificate lives a day.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class PKI:
    ca: Path  # the trusted CA certificate (the ca_bundle)
    server: Pair
    client: Pair
    rogue_ca: Path
    rogue_client: Pair  # signed by rogue_ca: a valid certificate nobody trusts


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _key(path: Path) -> Path:
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(path))
    return path


def _ca(folder: Path, name: str) -> Pair:
    key = _key(folder / f"{name}.key")
    cert = folder / f"{name}.crt"
    _openssl(
        "req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", "1",
        "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return Pair(cert, key)


def _leaf(folder: Path, name: str, ca: Pair, *, server: bool) -> Pair:
    key = _key(folder / f"{name}.key")
    csr, cert, ext = folder / f"{name}.csr", folder / f"{name}.crt", folder / f"{name}.ext"
    usage = "serverAuth" if server else "clientAuth"
    lines = ["basicConstraints=CA:FALSE", f"extendedKeyUsage={usage}"]
    if server:
        lines.append("subjectAltName=DNS:localhost,IP:127.0.0.1")
    ext.write_text("\n".join(lines) + "\n")
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.certificate), "-CAkey",
        str(ca.private_key), "-CAcreateserial", "-out", str(cert), "-days", "1",
        "-extfile", str(ext),
    )  # fmt: skip
    return Pair(cert, key)


def make_pki(folder: Path) -> PKI:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    rogue = _ca(folder, "rogue-ca")
    return PKI(
        ca=ca.certificate,
        server=_leaf(folder, "server", ca, server=True),
        client=_leaf(folder, "client", ca, server=False),
        rogue_ca=rogue.certificate,
        rogue_client=_leaf(folder, "rogue-client", rogue, server=False),
    )
