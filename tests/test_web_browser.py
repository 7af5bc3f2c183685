"""The review app in headless Chromium (Playwright on Debian's /usr/bin/chromium).

One live server (the same WebServer ``qgate serve`` runs) on SQLite with really scored
series; the tests run in order on one browser. Screenshots of the worklist and the series
page go to ``$QGATE_SCREENSHOTS`` when set (``QGATE_SCREENSHOTS=docs/screenshots``),
else to the test's temporary folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import load_settings
from qgate.core.db import make_engine, make_session_factory, upgrade
from qgate.core.db.models import AuditEntry, Verdict, utcnow
from qgate.web.server import WebServer, start_web
from tests.support.browser import chromium, chromium_available, expect
from tests.support.web import PASSWORD, add_user, score_pending, spool_series

pytestmark = [pytest.mark.slow]


def test_browser_is_installed() -> None:
    """CI installs Debian's chromium and the playwright package; never skip without them."""
    assert chromium_available(), "install chromium (apt) and playwright (pip) for these tests"


def wait_until(page: Any, script: str, timeout: float = 15.0) -> None:
    """Poll ``script`` until it is true. (``page.wait_for_function`` evaluates strings with
    eval, which the app's Content-Security-Policy rightly blocks.)"""
    deadline = time.monotonic() + timeout
    while not page.evaluate(script):
        if time.monotonic() > deadline:
            raise TimeoutError(f"still false after {timeout}s: {script}")
        time.sleep(0.05)


@dataclass
class Site:
    server: WebServer
    sessions: sessionmaker[Session]
    flagged: str
    passed: str
    shots: Path

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    import datetime as dt

    root = tmp_path_factory.mktemp("web")
    url = f"sqlite:///{root / 'qgate.db'}"
    upgrade(url)
    settings = load_settings(
        path=None,
        database={"url": url},
        storage={"root": root / "var", "fsync": False},
        gate={"mode": "gate"},
        web={"port": 0},
    )
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    now = utcnow()
    older = spool_series(
        settings,
        sessions,
        n=8,
        size=192,
        noise_hu=38.0,
        seed=2,
        calling_aet="CT_ER",
        patient_name="Okafor^Daniel",
        patient_id="P-100245",
        received_at=now - dt.timedelta(minutes=40),
    )
    passed = spool_series(
        settings,
        sessions,
        n=6,
        size=128,
        noise_hu=12.0,
        seed=3,
        calling_aet="CT_ROOM_A",
        patient_name="Lindqvist^Anna",
        patient_id="P-100267",
        received_at=now - dt.timedelta(minutes=20),
    )
    flagged = spool_series(
        settings,
        sessions,
        n=12,
        size=256,
        noise_hu=55.0,
        seed=1,
        calling_aet="CT_ROOM_B",
        patient_name="Novak^Eva",
        patient_id="P-100322",
        received_at=now - dt.timedelta(minutes=5),
    )
    assert score_pending(settings, sessions) == ["scored"] * 3
    assert older
    add_user(sessions, "dr.weber", "radiologist")
    shots = Path(os.environ.get("QGATE_SCREENSHOTS") or root / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    server = start_web(settings, sessions)
    try:
        yield Site(server, sessions, flagged, passed, shots)
    finally:
        server.stop()
        engine.dispose()


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def page(browser: Any) -> Iterator[Any]:
    """One logged-in tab, shared by the tests below in order."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    p = context.new_page()
    p.set_default_timeout(15_000)
    yield p
    context.close()


def test_unauthenticated_access_is_refused(site: Site, browser: Any) -> None:
    context = browser.new_context()
    p = context.new_page()
    p.goto(f"{site.url}/series/{site.flagged}")
    assert p.url.startswith(f"{site.url}/login?next=")
    assert p.locator("input[name=password]").is_visible()
    api = p.request.get(f"{site.url}/api/series")
    assert api.status == 401
    p.fill("input[name=username]", "dr.weber")
    p.fill("input[name=password]", "not the password")
    p.click("button[type=submit]")
    expect(p.locator(".flash-error")).to_contain_text("wrong password")
    assert p.request.get(f"{site.url}/api/series").status == 401
    context.close()


def test_log_in_and_see_the_flagged_worklist(site: Site, page: Any) -> None:
    page.goto(f"{site.url}/")
    page.fill("input[name=username]", "dr.weber")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{site.url}/")
    rows = page.locator("table.worklist tbody tr")
    expect(rows).to_have_count(2)  # the flagged ones; the passed series is not on the default list
    assert rows.nth(0).locator(".patient").inner_text() == "Novak, Eva"  # newest first
    assert "Flagged" in rows.nth(0).inner_text() and "Held" in rows.nth(0).inner_text()

    page.click(".tabs >> text=All series")
    page.wait_for_url("**/?decision=all")
    expect(page.locator("table.worklist tbody tr")).to_have_count(3)
    page.select_option("select[name=calling_aet]", "CT_ROOM_A")
    page.click("button:has-text('Apply')")
    page.wait_for_url("**calling_aet=CT_ROOM_A**")
    expect(page.locator("table.worklist tbody tr")).to_have_count(1)
    expect(page.locator("table.worklist tbody")).to_contain_text("Lindqvist")


def test_open_a_flagged_series_and_see_its_maps(site: Site, page: Any) -> None:
    page.goto(f"{site.url}/")
    page.locator("table.worklist tbody tr").nth(0).locator("td").nth(0).click()  # a row click
    page.wait_for_url(f"{site.url}/series/{site.flagged}?back=*")
    assert "Novak, Eva" in page.locator("h1").inner_text()
    loaded = "i => i.complete && i.naturalWidth > 0"
    wait_until(page, f"() => ({loaded})(document.getElementById('map-image'))")
    thumbs = page.locator(".thumb img")
    assert thumbs.count() == 12
    wait_until(
        page,
        f"() => Array.from(document.querySelectorAll('.thumb img')).slice(0, 4).every({loaded})",
    )
    assert page.locator(".reasons-list li").count() >= 1
    assert page.locator("svg[data-strip]").count() >= 1
    assert page.locator("svg[data-strip] rect.bar.bad").count() >= 1

    # Scroll through slices: keys, a thumbnail, a bar of the strip plot.
    label = page.locator("#slice-label")
    expect(label).to_have_text("Slice 1 / 12")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    expect(label).to_have_text("Slice 3 / 12")
    assert page.locator("#map-image").get_attribute("src").endswith("/maps/2.png")
    page.locator(".thumb").nth(9).click()
    expect(label).to_have_text("Slice 10 / 12")
    page.locator("svg[data-strip] rect.bar").nth(5).click()
    expect(label).to_have_text("Slice 6 / 12")
    wait_until(page, f"() => ({loaded})(document.getElementById('map-image'))")
    page.screenshot(path=str(site.shots / "series.png"), full_page=True)


def test_submit_a_verdict_and_see_it_recorded(site: Site, page: Any) -> None:
    page.goto(f"{site.url}/series/{site.flagged}")
    page.check("input[name=agrees][value=yes]")
    page.click(".segments label:has-text('Poor')")
    page.fill("textarea[name=comment]", "Noise obscures the liver lesion margins.")
    page.click("button[value=save]")
    expect(page.locator(".flash-ok")).to_contain_text("Verdict saved")
    item = page.locator("#verdicts .verdict-item").nth(0)
    assert "Agrees" in item.inner_text() and "score 1" in item.inner_text()
    assert "dr.weber" in item.inner_text() and "liver lesion" in item.inner_text()
    with site.sessions() as s:
        (verdict,) = s.scalars(select(Verdict).where(Verdict.series_instance_uid == site.flagged))
        assert (verdict.agrees, verdict.score) == (True, 1)
        audited = s.scalars(select(AuditEntry).where(AuditEntry.action == "verdict")).all()
        assert [(a.username, a.detail["score"]) for a in audited] == [("dr.weber", 1)]

    page.goto(f"{site.url}/?review=done")
    expect(page.locator("table.worklist tbody tr")).to_have_count(1)
    assert "Agrees · 1" in page.locator("table.worklist tbody tr").inner_text()
    page.goto(f"{site.url}/?decision=all")
    expect(page.locator("table.worklist tbody tr")).to_have_count(3)
    page.screenshot(path=str(site.shots / "worklist.png"))


def test_api_docs_render_offline_under_the_strict_policy(site: Site, browser: Any) -> None:
    """/docs (Swagger UI) draws the API from local files only: any request off this site
    is refused and recorded, and the page's CSP (no inline script) is never violated."""
    context = browser.new_context()
    outside: list[str] = []

    def only_this_site(route: Any) -> None:
        if route.request.url.startswith(site.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_this_site)
    p = context.new_page()
    p.set_default_timeout(15_000)
    console: list[str] = []
    p.on("console", lambda m: console.append(m.text))
    p.on("pageerror", lambda e: console.append(str(e)))
    p.goto(f"{site.url}/docs")
    p.fill("input[name=username]", "dr.weber")
    p.fill("input[name=password]", PASSWORD)
    p.click("button[type=submit]")
    p.wait_for_url(f"{site.url}/docs")
    expect(p.locator(".opblock").first).to_be_visible()
    expect(p.locator(".opblock-summary-path", has_text="/api/series").first).to_be_visible()
    assert p.locator(".opblock").count() >= 5

    # "Try it out" on a POST sends the session's CSRF token: a 404, not the 403 without it.
    op = p.locator(".opblock-post").filter(has_text="/release").first
    op.locator(".opblock-summary").click()
    op.locator("button.try-out__btn").click()
    op.locator("input[placeholder=series_uid]").fill("1.2.3")
    with p.expect_response(lambda r: r.url.endswith("/api/series/1.2.3/release")) as sent:
        op.locator("button.execute").click()
    assert sent.value.status == 404 and "no such series" in sent.value.text()
    assert outside == []
    assert not [m for m in console if "Content Security Policy" in m or "Error" in m], console
    context.close()
