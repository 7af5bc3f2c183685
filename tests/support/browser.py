"""Headless Chromium (Debian's, via Playwright) against the review app on a live server.

Never runs ``playwright install``: the browser is ``/usr/bin/chromium`` (Debian's package,
installed by ``.ci/run``). A missing browser fails the tests; they are never skipped.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return shutil.which(CHROMIUM) is not None


def expect(target: Any) -> Any:
    """Playwright's retrying assertions (``expect(locator).to_have_count(3)``)."""
    from playwright.sync_api import expect as pw_expect

    return pw_expect(target)


@contextmanager
def chromium() -> Iterator[Any]:
    """A Playwright ``Browser`` on the system Chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
