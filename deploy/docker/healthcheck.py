"""Container health check for ``qgate serve``: exit 0 when it answers, 1 when it does not.

The Dockerfiles' HEALTHCHECK runs this with the service's own settings (``QGATE_CONFIG``
and the ``QGATE_*`` environment), so it probes what the service really listens on:

* the review app's ``/healthz`` (200 only while the database answers), when
  ``web.enabled``;
* the DICOM SCP: an association request from 127.0.0.1. An accepted association is
  released after a C-ECHO; a rejection also counts as alive, because a whitelist
  (``dicom.allowed_calling_aets``) or a full-disk refusal is the SCP answering by policy.
  No answer (refused connection, timeout, abort) is unhealthy. With ``dicom.tls`` on,
  plain TCP would be refused by design, so only the TCP listener is checked there.

Nothing is printed on success; on failure one line says which probe failed.
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from qgate.core.config import Settings, load_settings

LOCALHOST = "127.0.0.1"
TIMEOUT = 5.0


def check_web(settings: Settings) -> str | None:
    """None when ``/healthz`` answers 200, else why not."""
    url = f"http://{LOCALHOST}:{settings.web.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code} {exc.read(200).decode(errors='replace')}"
    except OSError as exc:
        return f"{url}: {exc}"
    return None if status == 200 else f"{url}: HTTP {status}"


def check_dicom(settings: Settings) -> str | None:
    """None when the SCP answers an association request (accepted or rejected)."""
    port = settings.dicom.port
    if settings.dicom.tls.enabled:
        try:
            socket.create_connection((LOCALHOST, port), timeout=TIMEOUT).close()
        except OSError as exc:
            return f"DICOM TLS port {port}: {exc}"
        return None
    ae = AE(ae_title="HEALTHCHECK")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.connection_timeout = TIMEOUT
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOCALHOST, port, ae_title=settings.dicom.ae_title)
    if assoc.is_rejected:
        return None
    if not assoc.is_established:
        return f"DICOM port {port}: no answer to an association request"
    status = assoc.send_c_echo()
    assoc.release()
    if status is None or int(status.Status) != 0:
        return f"DICOM port {port}: C-ECHO failed"
    return None


def main() -> int:
    settings = load_settings()
    failures = [check_dicom(settings)]
    if settings.web.enabled and settings.web.port:
        failures.append(check_web(settings))
    problems = [f for f in failures if f]
    for problem in problems:
        print(f"unhealthy: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
