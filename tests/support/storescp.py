"""dcmtk's ``storescp`` as an archive for the send tests (plain TCP or TLS)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.support.dicomfiles import DCMTK_ENV


@contextmanager
def storescp(
    port: int, out: Path, *, ae_title: str = "ARCHIVE", extra: Sequence[str] = ()
) -> Iterator[Path]:
    """Run ``storescp`` on ``port`` writing into ``out`` until the block ends."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = ["storescp", "-aet", ae_title, "-od", str(out), *extra, str(port)]
    proc = subprocess.Popen(cmd, env=DCMTK_ENV, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("storescp did not start")
            time.sleep(0.05)
        yield out
    finally:
        proc.terminate()
        proc.wait(timeout=10)
