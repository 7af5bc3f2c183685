"""The review app through its HTTP interface (FastAPI TestClient), on SQLite and PostgreSQL.

Series are scored for real (synthetic CT -> spool -> assembler -> worker), so the pages
and the API show genuine results, SR and quality-map files.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qgate.cli import main
from qgate.core.config import GateConfig, Settings, WebConfig, load_settings
from qgate.core.db.models import (
    AuditEntry,
    Event,
    OutboxItem,
    Result,
    Series,
    User,
    Verdict,
    utcnow,
)
from qgate.score.results import result_object
from qgate.web.app import create_app
from qgate.web.security import SECRET_FILE, load_secret_key, local_path
from qgate.web.server import start_web
from qgate.web.stage import WebStage
from tests.conftest import free_port
from tests.support.web import PASSWORD, add_user, csrf_from, login, scored_series, spool_series

GATE = GateConfig(mode="gate")


@pytest.fixture
def gate_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"gate": GATE})


@pytest.fixture
def client(gate_settings: Settings, sessions: sessionmaker[Session]) -> Iterator[TestClient]:
    add_user(sessions, "rad", "radiologist")
    add_user(sessions, "boss", "admin")
    with TestClient(create_app(gate_settings, sessions)) as c:
        yield c


def _audit(sessions: sessionmaker[Session], action: str) -> list[AuditEntry]:
    with sessions() as s:
        q = select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.id)
        return list(s.scalars(q))


# -- authentication, CSRF, roles ---------------------------------------------------------------


def test_login_is_required_everywhere_but_healthz_and_metrics(client: TestClient) -> None:
    for path in ("/", "/series/1.2.3", "/training", "/admin/users", "/admin/audit", "/docs"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303, path
        assert r.headers["location"].startswith("/login?next="), path
    for path in ("/api/series", "/api/series/1.2.3", "/api/me", "/api/users", "/openapi.json"):
        r = client.get(path)
        assert r.status_code == 401, path
    r = client.get("/api/series/1.2.3/results/1/maps/0.png")
    assert r.status_code == 401

    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "database": "ok", "disk": "ok"}
    assert client.get("/metrics").status_code == 200

    # The session cookie is HttpOnly and SameSite; the pages carry no-store and a CSP.
    page = client.get("/login")
    cookie = page.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    assert page.headers["cache-control"] == "no-store"
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_login_logout_and_failed_logins_are_audited(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    token = csrf_from(client.get("/login").text)
    bad = client.post(
        "/login", data={"username": "rad", "password": "wrong password", "csrf_token": token}
    )
    assert bad.status_code == 401 and "wrong password" in bad.text
    assert client.get("/api/me").status_code == 401

    login(client, "rad")
    me = client.get("/api/me").json()
    assert me["username"] == "rad" and me["role"] == "radiologist"
    # A new session at login: the pre-login CSRF token is dead.
    assert me["csrf_token"] != token
    assert client.get("/").status_code == 200

    # Only local paths are followed after login, or linked back to from a series page.
    for evil in ("//evil.example/x", "https://evil.example/", "javascript:alert(1)"):
        r = client.get("/login", params={"next": evil}, follow_redirects=False)
        assert r.headers["location"] == "/"
        assert local_path(evil) == "/"
    assert local_path("/?decision=all&page=2") == "/?decision=all&page=2"
    out = client.post("/logout", data={"csrf_token": me["csrf_token"]}, follow_redirects=False)
    assert out.status_code == 303
    assert client.get("/api/me").status_code == 401

    assert [a.username for a in _audit(sessions, "login_failed")] == ["rad"]
    assert [a.username for a in _audit(sessions, "login")] == ["rad"]
    assert [a.username for a in _audit(sessions, "logout")] == ["rad"]
    with sessions() as s:
        user = s.scalar(select(User).where(User.username == "rad"))
        assert user is not None and user.last_login_at is not None


def test_every_unsafe_request_needs_the_session_csrf_token(client: TestClient) -> None:
    login_page = client.get("/login")
    assert "csrf_token" in login_page.text
    no_token = client.post("/login", data={"username": "rad", "password": PASSWORD})
    assert no_token.status_code == 403

    token = login(client, "rad")
    uid = "1.2.826.0.1.3680043.10.99"
    posts = [
        (f"/series/{uid}/verdict", {"agrees": "yes", "score": "2"}),
        (f"/series/{uid}/release", {}),
        ("/admin/users", {"username": "x", "password": PASSWORD, "role": "admin"}),
        ("/logout", {}),
    ]
    for path, form in posts:
        assert client.post(path, data=form).status_code == 403, path
        wrong = client.post(path, data={**form, "csrf_token": token[::-1]})
        assert wrong.status_code == 403, path
    api_posts = [
        (f"/api/series/{uid}/verdicts", {"agrees": True, "score": 2}),
        (f"/api/series/{uid}/release", None),
        ("/api/users", {"username": "x", "password": PASSWORD, "role": "admin"}),
    ]
    for path, body in api_posts:
        assert client.post(path, json=body).status_code == 403, path
        assert client.post(path, json=body, headers={"X-CSRF-Token": "nope"}).status_code == 403
    # With the token the request gets through to the handler (no such series: 404).
    ok = client.post(
        f"/api/series/{uid}/verdicts",
        json={"agrees": True, "score": 2},
        headers={"X-CSRF-Token": token},
    )
    assert ok.status_code == 404
    # Still logged in: the rejected /logout did nothing.
    assert client.get("/api/me").status_code == 200


def test_roles(client: TestClient, sessions: sessionmaker[Session]) -> None:
    token = login(client, "rad")
    assert client.get("/admin/users").status_code == 403
    assert client.get("/api/users").status_code == 403
    assert client.get("/api/audit").status_code == 403
    created = client.post(
        "/api/users",
        json={"username": "eve", "password": PASSWORD, "role": "admin"},
        headers={"X-CSRF-Token": token},
    )
    assert created.status_code == 403

    client.cookies.clear()
    token = login(client, "boss")
    assert client.get("/admin/users").status_code == 200
    created = client.post(
        "/api/users",
        json={"username": "dr.new", "password": PASSWORD, "role": "radiologist"},
        headers={"X-CSRF-Token": token},
    )
    assert created.status_code == 201, created.text
    assert created.json()["role"] == "radiologist" and "password" not in created.text
    dup = client.post(
        "/api/users",
        json={"username": "DR.NEW", "password": PASSWORD, "role": "radiologist"},
        headers={"X-CSRF-Token": token},
    )
    assert dup.status_code == 409
    # Admins manage; verdicts are the radiologists' (they become training labels).
    verdict = client.post(
        "/api/series/1.2.3/verdicts",
        json={"agrees": True, "score": 3},
        headers={"X-CSRF-Token": token},
    )
    assert verdict.status_code == 403
    assert [a.detail["username"] for a in _audit(sessions, "user_add")][-1] == "dr.new"
    assert _audit(sessions, "user_add")[-1].username == "boss"
    assert client.get("/api/audit?action=user_add").json()["total"] == 3


# -- verdicts and release ----------------------------------------------------------------------


def test_verdict_is_recorded_and_audited_and_release_forwards_a_held_series(
    client: TestClient, gate_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    uid = scored_series(gate_settings, sessions, n=5, noise_hu=60.0, seed=4)
    with sessions() as s:
        series = s.get(Series, uid)
        assert series is not None and series.decision == "flag" and series.held
    token = login(client, "rad")

    page = client.get(f"/series/{uid}")
    assert page.status_code == 200
    assert "Save and release to archive" in page.text  # held: the form offers the release
    assert page.text.count('role="listitem"') == 5
    assert "<svg" in page.text and 'class="bar bad"' in page.text  # the strip plot

    # A verdict through the form (POST-redirect-GET), without release.
    form = {"agrees": "no", "score": "3", "comment": "acceptable for a follow-up", "action": "save"}
    r = client.post(f"/series/{uid}/verdict", data={**form, "csrf_token": token})
    assert r.status_code == 200 and "Verdict saved" in r.text
    assert "acceptable for a follow-up" in r.text

    with sessions() as s:
        (verdict,) = s.scalars(select(Verdict))
        result = s.scalar(select(Result).where(Result.series_instance_uid == uid))
        assert result is not None
        assert (verdict.agrees, verdict.score, verdict.decision) == (False, 3, "flag")
        assert verdict.result_id == result.id and verdict.comment == "acceptable for a follow-up"
        assert s.get(Series, uid).held  # type: ignore[union-attr]
    (entry,) = _audit(sessions, "verdict")
    assert entry.username == "rad" and entry.series_instance_uid == uid
    assert entry.detail == {
        "verdict_id": verdict.id,
        "result_id": result.id,
        "decision": "flag",
        "agrees": False,
        "score": 3,
        "comment": "acceptable for a follow-up",
    }
    assert abs((utcnow() - entry.at).total_seconds()) < 60

    # Out-of-range scores are refused, nothing stored.
    bad = client.post(
        f"/api/series/{uid}/verdicts",
        json={"agrees": True, "score": 5},
        headers={"X-CSRF-Token": token},
    )
    assert bad.status_code == 422

    # A second verdict through the API, releasing the held series.
    r = client.post(
        f"/api/series/{uid}/verdicts",
        json={"agrees": True, "score": 1, "comment": "noisy", "release": True},
        headers={"X-CSRF-Token": token},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["released_instances"] == 5 and body["verdict"]["username"] == "rad"
    with sessions() as s:
        assert not s.get(Series, uid).held  # type: ignore[union-attr]
        forwards = s.scalars(select(OutboxItem).where(OutboxItem.kind == "forward")).all()
        assert len(forwards) == 1 and len(forwards[0].paths) == 5
        released = s.scalars(select(Event).where(Event.event == "released")).all()
        assert [e.detail for e in released] == ["by rad"]
    (rel,) = _audit(sessions, "release")
    assert rel.username == "rad" and rel.detail["instances"] == 5
    assert rel.detail["verdict_id"] == body["verdict"]["id"]

    # Released once: a second release is a conflict, and its verdict is not stored.
    again = client.post(f"/api/series/{uid}/release", headers={"X-CSRF-Token": token})
    assert again.status_code == 409
    refused = client.post(
        f"/api/series/{uid}/verdicts",
        json={"agrees": True, "score": 1, "release": True},
        headers={"X-CSRF-Token": token},
    )
    assert refused.status_code == 409
    verdicts = client.get(f"/api/series/{uid}/verdicts").json()
    assert [(v["agrees"], v["score"]) for v in verdicts] == [(True, 1), (False, 3)]
    assert "Save and release to archive" not in client.get(f"/series/{uid}").text


def test_series_api_and_map_images(
    client: TestClient, gate_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    uid = scored_series(gate_settings, sessions, n=4, noise_hu=12.0, seed=5)
    login(client, "rad")
    detail = client.get(f"/api/series/{uid}").json()
    with sessions() as s:
        series = s.get(Series, uid)
        assert series is not None
        expected = result_object(s, series)
    # The same data as `qgate results --json`.
    assert detail["decision"] == expected["decision"] == "pass"
    assert detail["result"]["scores"] == expected["scores"]
    assert detail["reasons"] == expected["reasons"]
    assert detail["patient_name"] == "Test^Phantom" and detail["calling_aet"] == "CT_SCANNER_1"
    maps = detail["result"]["maps"]
    assert [m["slice"] for m in maps] == [0, 1, 2, 3]

    full = client.get(maps[1]["url"])
    assert full.status_code == 200 and full.headers["content-type"] == "image/png"
    assert "private" in full.headers["cache-control"]
    thumb = client.get(maps[1]["thumb_url"])
    big, small = Image.open(io.BytesIO(full.content)), Image.open(io.BytesIO(thumb.content))
    assert big.mode == "RGB" and big.size[0] > big.size[1]  # map plus the side panel
    assert small.size[1] == 112 and small.size[0] < big.size[0]
    assert client.get(maps[0]["url"].replace("/0.png", "/4.png")).status_code == 404
    assert client.get(f"/api/series/{uid}/results/999/maps/0.png").status_code == 404
    assert client.get("/api/series/1.2.3").status_code == 404

    page = client.get(f"/series/{uid}").text
    for text in ("Test, Phantom", "Image noise (robust SD)", "Signal-to-noise ratio", "noise"):
        assert text in page
    assert "Save and release to archive" not in page  # a passed series is not held
    back = client.get(f"/series/{uid}", params={"back": "javascript:alert(1)"}).text
    assert 'class="back" href="/"' in back
    back = client.get(f"/series/{uid}", params={"back": "/?decision=pass"}).text
    assert 'class="back" href="/?decision=pass"' in back

    schema = client.get("/openapi.json").json()
    assert "/api/series/{series_uid}/verdicts" in schema["paths"]
    assert "/login" not in schema["paths"]
    assert "swagger" in client.get("/docs").text.lower()


def test_api_docs_are_served_from_local_files(client: TestClient) -> None:
    """/docs needs the login and references only this site's files (offline networks)."""
    assert client.get("/docs", follow_redirects=False).status_code == 303
    login(client, "rad")
    page = client.get("/docs")
    assert page.status_code == 200 and 'id="swagger-ui"' in page.text
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs and all(r.startswith("/") and not r.startswith("//") for r in refs), refs
    kinds = {}
    for ref in refs:
        r = client.get(ref)
        assert r.status_code == 200, ref
        kinds[ref.rsplit(".", 1)[-1]] = (r.headers["content-type"], len(r.content))
    assert kinds["js"][0].startswith(("text/javascript", "application/javascript"))
    assert kinds["css"][0].startswith("text/css") and kinds["css"][1] > 10_000
    bundle = client.get(next(r for r in refs if r.endswith("swagger-ui-bundle.js")))
    assert "SwaggerUIBundle" in bundle.text and len(bundle.content) > 500_000
    # The page's policy allows no script or style from elsewhere, and no inline script.
    csp = page.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "http" not in csp and "<script>" not in page.text
    assert client.get("/redoc").status_code == 404


# -- worklist ----------------------------------------------------------------------------------


def test_worklist_filters_pagination_and_metrics(
    client: TestClient, gate_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    now = utcnow()
    flagged = scored_series(
        gate_settings,
        sessions,
        n=4,
        noise_hu=60.0,
        seed=1,
        calling_aet="CT_ER",
        received_at=now - dt.timedelta(days=2),
    )
    passed = scored_series(gate_settings, sessions, n=4, noise_hu=12.0, seed=2)
    waiting = [
        spool_series(
            gate_settings, sessions, n=1, seed=10 + k, received_at=now - dt.timedelta(hours=k)
        )
        for k in range(1, 4)
    ]
    token = login(client, "rad")

    def uids(**params: object) -> list[str]:
        r = client.get("/api/series", params=params)
        assert r.status_code == 200, r.text
        return [i["series_instance_uid"] for i in r.json()["items"]]

    assert uids() == [flagged]  # flagged only, by default
    assert uids(decision="pass") == [passed]
    # All of them, newest first.
    assert uids(decision="all") == [passed, *waiting, flagged]
    page = client.get("/api/series", params={"decision": "all", "per_page": 2, "page": 2}).json()
    assert page["total"] == 5 and page["pages"] == 3
    assert [i["series_instance_uid"] for i in page["items"]] == waiting[1:]
    assert uids(decision="all", calling_aet="CT_ER") == [flagged]
    yesterday = (now - dt.timedelta(days=1)).date().isoformat()
    assert flagged not in uids(decision="all", date_from=yesterday)
    assert uids(decision="all", date_to=(now - dt.timedelta(days=2)).date().isoformat()) == [
        flagged
    ]
    assert uids(decision="all", score="noise.noise_sigma_hu", score_min=40) == [flagged]
    assert uids(decision="all", score="noise.noise_sigma_hu", score_max=20) == [passed]
    assert uids(decision="all", score="snr.snr", score_min=1e6) == []
    assert client.get("/api/series", params={"score": "bad key'--"}).status_code == 422

    r = client.post(
        f"/api/series/{passed}/verdicts",
        json={"agrees": True, "score": 4},
        headers={"X-CSRF-Token": token},
    )
    assert r.status_code == 201
    assert uids(decision="all", review="done") == [passed]
    assert passed not in uids(decision="all", review="pending")
    item = client.get("/api/series", params={"decision": "pass"}).json()["items"][0]
    assert item["latest_verdict"]["score"] == 4 and "slices" not in item["scores"]["noise"]

    # The HTML worklist: same filters from the form (empty fields mean "any").
    html = client.get(
        "/", params={"decision": "all", "date_from": "", "calling_aet": "CT_ER", "score": ""}
    ).text
    assert flagged in html and passed not in html
    assert "Showing 1–1 of 1 series" in html
    html = client.get("/", params={"decision": "all", "per_page": 2}).text
    assert 'rel="next"' in html and "of 5 series" in html
    assert client.get("/", params={"date_from": "yesterday"}).status_code == 400

    # /metrics: Prometheus text format, computed from SQL.
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}

    def value(name: str, **labels: str) -> float:
        for sample in families[name].samples:
            if sample.name in (name, f"{name}_total") and sample.labels == labels:
                return sample.value
        raise AssertionError(f"no sample {name} {labels}")

    assert value("qgate_received_instances") == 11
    assert value("qgate_series_by_decision", decision="flag") == 1
    assert value("qgate_series_by_decision", decision="pass") == 1
    assert value("qgate_series_by_decision", decision="none") == 3
    assert value("qgate_queue_depth") == 0
    assert value("qgate_series_held") == 1
    assert value("qgate_outbox_failures") == 0
    assert value("qgate_verdicts") == 1
    latency = {s.labels.get("le"): s.value for s in families["qgate_scoring_seconds"].samples}
    assert latency["+Inf"] == 2 and families["qgate_scoring_seconds"].type == "histogram"


# -- configuration, CLI, service ---------------------------------------------------------------


def test_session_key_is_generated_once_and_kept_private(tmp_path: Path) -> None:
    settings = load_settings(
        path=None,
        storage={"root": tmp_path / "var"},
        database={"url": f"sqlite:///{tmp_path / 'qgate.db'}"},
    )
    key = load_secret_key(settings)
    path = tmp_path / "var" / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret_key(settings) == key and len(key) >= 32
    configured = settings.model_copy(update={"web": WebConfig(secret_key="k" * 40)})
    assert load_secret_key(configured) == "k" * 40
    with pytest.raises(ValueError, match="at least 32"):
        load_secret_key(settings.model_copy(update={"web": WebConfig(secret_key="short")}))
    secure = settings.model_copy(update={"web": WebConfig(secure_cookies=True)})
    with TestClient(create_app(secure), base_url="https://testserver") as c:
        assert "secure" in c.get("/login").headers["set-cookie"].lower()


def test_user_add_reads_the_password_from_stdin(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    config = tmp_path / "cli.yaml"
    config.write_text(
        yaml.safe_dump(
            {"database": {"url": settings.database.url}, "storage": {"root": str(tmp_path)}}
        )
    )
    runner = CliRunner()
    args = ["--config", str(config), "user", "add", "dr.cli", "--role", "radiologist"]
    out = runner.invoke(main, args, input=f"{PASSWORD}\n")
    assert out.exit_code == 0, out.output
    again = runner.invoke(main, args, input=f"{PASSWORD}\n")
    assert again.exit_code != 0 and "already exists" in again.output
    weak = runner.invoke(main, [*args[:4], "dr.weak", "--role", "admin"], input="short\n")
    assert weak.exit_code != 0 and "at least 8" in weak.output
    with sessions() as s:
        user = s.scalar(select(User).where(User.username == "dr.cli"))
        assert user is not None and user.role == "radiologist"
        assert user.password_hash.startswith("$argon2id$") and PASSWORD not in user.password_hash
    with TestClient(create_app(settings, sessions)) as c:
        login(c, "dr.cli")
        assert c.get("/api/me").json()["username"] == "dr.cli"


def test_the_web_stage_runs_the_web_app_and_stops_it(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    port = free_port()
    service = WebStage(settings.model_copy(update={"web": WebConfig(port=port)}))
    service.start()
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 303
        # The port is taken now: a second app refuses to start with a plain OSError.
        with pytest.raises(OSError):
            start_web(settings.model_copy(update={"web": WebConfig(port=port)}), sessions)
    finally:
        service.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    assert os.path.exists(settings.storage.root / SECRET_FILE)
