"""Login throttling, disabling users, password resets and unlocks (web, API and CLI), each
audited; ``/healthz`` and ``/metrics`` on the free-space watermark. SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qgate.cli import main
from qgate.core.config import Settings, StorageConfig, WebConfig
from qgate.core.db.models import AuditEntry
from qgate.web.app import create_app
from tests.support.web import PASSWORD, add_user, csrf_from, login

WEB = WebConfig(login_max_failures=3, login_max_failures_per_address=8, login_window_minutes=10)


@pytest.fixture
def web_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"web": WEB})


@pytest.fixture
def client(web_settings: Settings, sessions: sessionmaker[Session]) -> Iterator[TestClient]:
    add_user(sessions, "rad", "radiologist")
    add_user(sessions, "boss", "admin")
    with TestClient(create_app(web_settings, sessions)) as c:
        yield c


def _try_login(client: TestClient, username: str, password: str) -> int:
    token = csrf_from(client.get("/login").text)
    r = client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": token, "next": "/"},
        follow_redirects=False,
    )
    if r.status_code == 303:
        client.post("/logout", data={"csrf_token": client.get("/api/me").json()["csrf_token"]})
    return r.status_code


def _actions(sessions: sessionmaker[Session], *actions: str) -> list[AuditEntry]:
    with sessions() as s:
        q = select(AuditEntry).where(AuditEntry.action.in_(actions)).order_by(AuditEntry.id)
        return list(s.scalars(q))


def test_failed_logins_lock_the_user_name_until_the_window_passes(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    for _ in range(WEB.login_max_failures):
        assert _try_login(client, "rad", "wrong password") == 401
    # Locked: even the right password is refused, without a password check.
    token = csrf_from(client.get("/login").text)
    r = client.post(
        "/login",
        data={"username": "RAD", "password": PASSWORD, "csrf_token": token, "next": "/"},
        follow_redirects=False,
    )
    assert r.status_code == 429
    assert "Too many failed logins" in r.text
    assert 0 < int(r.headers["retry-after"]) <= 10 * 60 + 1
    throttled = _actions(sessions, "login_throttled")
    assert [(a.username, a.detail["scope"]) for a in throttled] == [("RAD", "user")]
    # Another user name is not affected.
    assert _try_login(client, "boss", PASSWORD) == 303
    # Once the failures are older than the window, the right password works again.
    with sessions.begin() as s:
        for row in s.scalars(select(AuditEntry).where(AuditEntry.action == "login_failed")):
            row.at -= dt.timedelta(minutes=11)
    assert _try_login(client, "rad", PASSWORD) == 303


def test_unknown_names_are_throttled_like_known_ones(client: TestClient) -> None:
    for _ in range(WEB.login_max_failures):
        assert _try_login(client, "nobody", "whatever1") == 401
    assert _try_login(client, "nobody", "whatever1") == 429


def test_failed_logins_from_one_address_are_throttled_across_names(client: TestClient) -> None:
    names = [f"guess{i}" for i in range(WEB.login_max_failures_per_address)]
    for name in names:
        assert _try_login(client, name, "wrong password") == 401
    assert _try_login(client, "rad", PASSWORD) == 429


def test_a_successful_login_resets_the_count(client: TestClient) -> None:
    for _ in range(WEB.login_max_failures - 1):
        assert _try_login(client, "rad", "wrong password") == 401
    assert _try_login(client, "rad", PASSWORD) == 303
    for _ in range(WEB.login_max_failures - 1):
        assert _try_login(client, "rad", "wrong password") == 401
    assert _try_login(client, "rad", PASSWORD) == 303


def test_admin_disables_enables_unlocks_and_resets_passwords_audited(
    client: TestClient, web_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    rad = TestClient(create_app(web_settings, sessions))
    login(rad, "rad")
    assert rad.get("/api/me").status_code == 200

    csrf = login(client, "boss")
    h = {"X-CSRF-Token": csrf}
    r = client.post("/api/users/rad/disable", headers=h)
    assert r.status_code == 200 and r.json()["active"] is False
    assert rad.get("/api/me").status_code == 401  # the open session ended
    assert _try_login(TestClient(create_app(web_settings, sessions)), "rad", PASSWORD) == 401
    assert client.post("/api/users/rad/disable", headers=h).status_code == 409
    assert client.post("/api/users/boss/disable", headers=h).status_code == 409  # last admin
    assert client.post("/api/users/ghost/disable", headers=h).status_code == 404
    assert client.post("/api/users/rad/enable", headers=h).json()["active"] is True

    # Locked out, then unlocked by the admin page.
    other = TestClient(create_app(web_settings, sessions))
    for _ in range(WEB.login_max_failures):
        assert _try_login(other, "rad", "wrong password") == 401
    assert _try_login(other, "rad", PASSWORD) == 429
    page = client.get("/admin/users")
    assert "/admin/users/rad/unlock" in page.text
    r = client.post(
        "/admin/users/rad/unlock", data={"csrf_token": csrf_from(page.text)}, follow_redirects=False
    )
    assert r.status_code == 303
    assert _try_login(other, "rad", PASSWORD) == 303

    # A reset ends the user's sessions; the old password stops working.
    login(rad, "rad")
    weak = client.post("/api/users/rad/password", headers=h, json={"password": "short"})
    assert weak.status_code == 422
    r = client.post(
        "/api/users/rad/password", headers=h, json={"password": "a new long passphrase"}
    )
    assert r.status_code == 200
    assert rad.get("/api/me").status_code == 401
    assert _try_login(other, "rad", PASSWORD) == 401
    assert _try_login(other, "rad", "a new long passphrase") == 303

    # Radiologists cannot do any of it.
    rad_csrf = login(rad, "rad", "a new long passphrase")
    assert rad.post("/api/users/boss/password", headers={"X-CSRF-Token": rad_csrf},
                    json={"password": "x" * 12}).status_code == 403  # fmt: skip

    rows = _actions(sessions, "user_disable", "user_enable", "user_unlock", "password_reset")
    assert [(a.action, a.username, a.detail["username"]) for a in rows] == [
        ("user_disable", "boss", "rad"),
        ("user_enable", "boss", "rad"),
        ("user_unlock", "boss", "rad"),
        ("password_reset", "boss", "rad"),
    ]
    assert all("password" not in json.dumps(a.detail) for a in rows)


def test_cli_disable_enable_password_unlock(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    add_user(sessions, "rad", "radiologist")
    config = tmp_path / "qgate.yaml"
    config.write_text(json.dumps({"database": {"url": settings.database.url}}))
    runner = CliRunner()

    def run(*args: str, stdin: str | None = None) -> str:
        r = runner.invoke(main, ["user", *args, "--config", str(config)], input=stdin)
        assert r.exit_code == 0, r.output
        return r.output

    assert "disabled" in run("disable", "rad")
    failed = runner.invoke(main, ["user", "disable", "rad", "--config", str(config)])
    assert failed.exit_code != 0 and "already disabled" in failed.output
    assert "enabled" in run("enable", "rad")
    assert "unlocked" in run("unlock", "rad")
    assert "reset" in run("password", "rad", stdin="another long passphrase\n")
    rows = _actions(sessions, "user_disable", "user_enable", "user_unlock", "password_reset")
    assert [(a.action, a.username) for a in rows] == [
        ("user_disable", "cli"),
        ("user_enable", "cli"),
        ("user_unlock", "cli"),
        ("password_reset", "cli"),
    ]


def test_healthz_and_metrics_report_the_free_space_watermark(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    with TestClient(create_app(settings, sessions)) as c:
        ok = c.get("/healthz")
        assert ok.status_code == 200 and ok.json()["disk"] == "ok"
    low = settings.model_copy(
        update={"storage": StorageConfig(root=settings.storage.root, min_free_mb=1 << 40)}
    )
    with TestClient(create_app(low, sessions)) as c:
        r = c.get("/healthz")
        assert r.status_code == 503
        assert r.json()["status"] == "error" and r.json()["database"] == "ok"
        assert "below storage.min_free_mb" in r.json()["disk"]
        families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    refusing = families["qgate_receive_refusing_associations"].samples
    assert [(s.labels["reason"], s.value) for s in refusing] == [("disk_low", 1.0)]
    free = families["qgate_storage_free_bytes"].samples[0].value
    assert 0 < free < families["qgate_storage_min_free_bytes"].samples[0].value
