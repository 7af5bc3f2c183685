"""The ``qgate`` command line.

``qgate score`` and ``qgate serve`` run as an operator runs them, ``python -m qgate.cli`` in
a subprocess; the other commands run in-process through click's runner (same ``main``,
same parsing and exit codes, without paying the interpreter start-up per call). Output is
parsed as strict JSON (no NaN/Infinity). Configuration is selected by ``--config``, by
``QGATE_CONFIG`` and by ``./config.yaml``, with ``QGATE_*`` overrides; the database each
command opened (or the port ``qgate serve`` listens on) shows which one won.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner, Result
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session, sessionmaker

from qgate.cli import main
from qgate.core.config import Settings
from qgate.core.db import OutboxItem, Series, make_engine, make_session_factory
from qgate.dispatch import Destination, enqueue, run_once
from qgate.synth import make_ct_series, write_series
from tests.conftest import free_port
from tests.support.dicomfiles import storescu
from tests.support.qgate_proc import QgateProcess

RESULT_KEYS = {
    "series_instance_uid",
    "study_instance_uid",
    "status",
    "decision",
    "reasons",
    "scores",
}


def qgate_process(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m qgate.cli ARGS`` in ``cwd``, without any ``QGATE_*`` variable."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "qgate.cli", *args],
        cwd=cwd,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def qgate(*args: str, env: dict[str, str] | None = None) -> Result:
    """``qgate ARGS`` in-process, with no ``QGATE_*`` variable but those in ``env``."""
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("QGATE_")}
    return CliRunner().invoke(
        main, list(args), env={**unset, **(env or {})}, catch_exceptions=False
    )


def ok(out: Result) -> Result:
    assert out.exit_code == 0, f"exit {out.exit_code}\n{out.stdout}\n{out.stderr}"
    return out


def strict_json(text: str) -> Any:
    def no_constants(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=no_constants)


def write_config(path: Path, **sections: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(sections))
    return path


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


# -- qgate score -------------------------------------------------------------------------------


def test_score_json_one_strict_object_per_series_offline(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    clean = make_ct_series(3, 128, 128, noise_hu=10.0, seed=1)
    noisy = make_ct_series(4, 128, 128, noise_hu=60.0, seed=2)
    # One slice of nothing but air: its per-slice measures are undefined (must be null).
    noisy[3].PixelData = np.full((128, 128), 24, np.uint16).tobytes()
    write_series(clean, folder / "clean")
    write_series(noisy, folder / "noisy" / "deeper")
    (folder / "README.txt").write_text("not DICOM\n")
    (folder / "noisy" / "junk.dcm").write_bytes(b"\x00\x01 not a dataset")
    # No network and no database: the configured database cannot even be created.
    cfg = write_config(
        tmp_path / "config.yaml",
        database={"url": sqlite_url(tmp_path / "missing" / "dir" / "q.db")},
        archive={"host": "127.0.0.1", "port": free_port()},
    )

    out = qgate_process("--config", str(cfg), "score", str(folder), "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    results = strict_json(out.stdout)
    assert isinstance(results, list) and len(results) == 2
    by_uid = {r["series_instance_uid"]: r for r in results}
    assert set(by_uid) == {clean[0].SeriesInstanceUID, noisy[0].SeriesInstanceUID}
    for r in results:
        assert set(r) >= RESULT_KEYS
        assert r["status"] == "scored"
        assert set(r["scores"]) == {"noise", "snr", "mdiqa", "n2q", "chestiqa"}  # the defaults
        assert all(isinstance(s["version"], str) for s in r["scores"].values())
    assert not (tmp_path / "missing").exists()

    good = by_uid[clean[0].SeriesInstanceUID]
    assert good["study_instance_uid"] == clean[0].StudyInstanceUID
    assert (good["decision"], good["reasons"]) == ("pass", [])
    assert 8.0 < good["scores"]["noise"]["noise_sigma_hu"] < 12.0
    assert len(good["scores"]["noise"]["slices"]["noise_sigma_hu"]) == 3

    bad = by_uid[noisy[0].SeriesInstanceUID]
    assert bad["decision"] == "flag"
    assert bad["scores"]["noise"]["noise_sigma_hu"] > 45.0
    per_slice = bad["scores"]["noise"]["slices"]["noise_sigma_hu"]
    assert len(per_slice) == 4 and per_slice.count(None) == 1  # the air slice: null, not NaN
    [noise_reason] = [r for r in bad["reasons"] if r.startswith("noise:")]
    assert "noise_sigma_hu" in noise_reason and "HU is above the limit 30 HU" in noise_reason


# -- database, results, outbox -------------------------------------------------------------------


def test_db_upgrade_then_empty_results_and_outbox(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "fresh.db")
    cfg = write_config(tmp_path / "config.yaml", database={"url": url})
    assert not (tmp_path / "fresh.db").exists()

    assert ok(qgate("--config", str(cfg), "db", "upgrade")).stdout.strip() == ("database at head")
    assert tables(url) >= {"series", "instances", "jobs", "results", "outbox", "events"}
    assert "alembic_version" in tables(url)
    ok(qgate("--config", str(cfg), "db", "upgrade"))  # idempotent

    assert strict_json(ok(qgate("--config", str(cfg), "results", "--json")).stdout) == []
    assert strict_json(ok(qgate("--config", str(cfg), "outbox", "list", "--json")).stdout) == []
    missing = qgate("--config", str(cfg), "results", "--series", "1.2.3", "--json")
    assert (missing.exit_code, missing.stdout) == (1, "")
    assert "no such series: 1.2.3" in missing.stderr


def test_commands_on_a_database_without_schema_say_so(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "never-migrated.db")
    cfg = write_config(tmp_path / "config.yaml", database={"url": url})
    commands = (
        ["results", "--json"],
        ["outbox", "list"],
        ["jobs", "list"],
        ["release", "1.2"],
        *([stage] for stage in ("receive", "worker", "dispatch", "web")),  # they never migrate
    )
    for args in commands:
        out = qgate("--config", str(cfg), *args)
        assert (out.exit_code, out.stdout) == (1, ""), args
        assert "has no qgate schema; run `qgate db upgrade` first" in out.stderr


def test_outbox_list_and_retry_dead_letters(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    dead_port = free_port()  # nobody listens: every send fails
    cfg = settings.model_copy(
        update={
            "archive": settings.archive.model_copy(update={"port": dead_port, "timeout": 2}),
            "dispatch": settings.dispatch.model_copy(update={"max_attempts": 1}),
        }
    )
    files = [str(p) for p in write_series(make_ct_series(2, 16, 16), tmp_path / "s")]
    dest = Destination.from_settings(cfg.archive)
    with sessions() as s:
        ids = [
            enqueue(
                s, series_uid=f"1.2.826.0.1.3680043.10.{k}", kind="results", paths=files, dest=dest
            ).id
            for k in (1, 2)
        ]
        s.commit()
    assert run_once(cfg, sessions, owner="test/dispatch") == 2
    config = write_config(
        tmp_path / "cli" / "config.yaml",
        database={"url": cfg.database.url},
        archive={"host": "127.0.0.1", "port": dead_port},
    )

    def listed(*extra: str) -> list[dict[str, Any]]:
        out = ok(qgate("--config", str(config), "outbox", "list", *extra, "--json"))
        return strict_json(out.stdout)  # type: ignore[no-any-return]

    dead = listed("--state", "dead")
    assert [r["id"] for r in dead] == ids
    for r in dead:
        assert (r["state"], r["kind"], r["files"], r["attempts"]) == ("dead", "results", 2, 1)
        assert r["destination"] == f"ARCHIVE@127.0.0.1:{dead_port}"
        assert "could not associate" in r["last_error"]

    out = ok(qgate("--config", str(config), "outbox", "retry", str(ids[1])))
    assert out.stdout.strip() == "resubmitted 1 send(s)"
    assert [(r["id"], r["state"], r["attempts"]) for r in listed()] == [
        (ids[0], "dead", 1),
        (ids[1], "pending", 0),
    ]
    out = ok(qgate("--config", str(config), "outbox", "retry"))
    assert out.stdout.strip() == "resubmitted 1 send(s)"
    assert listed("--state", "dead") == []
    with sessions() as s:
        assert [i.state for i in s.scalars(select(OutboxItem).order_by(OutboxItem.id))] == [
            "pending",
            "pending",
        ]


# -- configuration -------------------------------------------------------------------------------


def test_config_selection_and_environment_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    def config(name: str) -> Path:
        return write_config(
            tmp_path / f"{name}.yaml", database={"url": sqlite_url(tmp_path / f"{name}.db")}
        )

    default = write_config(
        tmp_path / "config.yaml", database={"url": sqlite_url(tmp_path / "cwd.db")}
    )
    flag, env = config("flag"), config("env")
    assert default.exists()

    def created(*args: str, **env_vars: str) -> set[str]:
        before = {p.name for p in tmp_path.glob("*.db")}
        ok(qgate(*args, "db", "upgrade", env=env_vars))
        return {p.name for p in tmp_path.glob("*.db")} - before

    assert created() == {"cwd.db"}  # ./config.yaml when nothing else is said
    assert created(QGATE_CONFIG=str(env)) == {"env.db"}
    assert created("--config", str(flag), QGATE_CONFIG=str(env)) == {"flag.db"}  # flag wins
    override = sqlite_url(tmp_path / "override.db")
    assert created("--config", str(flag), QGATE_DATABASE__URL=override) == {"override.db"}

    for args, env_vars in [
        (["--config", str(tmp_path / "nope.yaml")], {}),
        ([], {"QGATE_CONFIG": str(tmp_path / "nope.yaml")}),
    ]:
        out = qgate(*args, "results", "--json", env=env_vars)
        assert (out.exit_code, out.stdout) == (1, "")
        assert f"Error: config file not found: {tmp_path / 'nope.yaml'}" in out.stderr
    bad = write_config(tmp_path / "bad.yaml", dicom={"port": "not-a-port"})
    out = qgate("--config", str(bad), "results", "--json")
    assert out.exit_code == 1 and "dicom.port" in out.stderr


# -- qgate serve stays up --------------------------------------------------------------------------


def test_serve_refuses_bad_instances_and_keeps_scoring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = sqlite_url(tmp_path / "serve.db")
    file_port, env_port = free_port(), free_port()
    q = QgateProcess(
        tmp_path,
        {
            "dicom": {"ae_title": "QGATE", "host": "127.0.0.1", "port": file_port},
            "archive": {"host": "127.0.0.1", "port": free_port(), "timeout": 2},
            "series": {"stable_seconds": 30, "release_grace_seconds": 0.3, "poll_seconds": 0.2},
            "database": {"url": url},
            "storage": {"root": str(tmp_path / "var"), "fsync": False},
            "queue": {"poll_seconds": 0.2},
        },
    )
    # QGATE_DICOM__PORT overrides the file's port for `qgate serve`.
    monkeypatch.setenv("QGATE_DICOM__PORT", str(env_port))
    q.port = env_port
    q.start()
    try:
        assert q.echo()
        q.port = file_port
        assert not q.echo()  # nothing listens on the file's port
        q.port = env_port

        mr = make_ct_series(1, 64, 64, seed=3, modality="MR")
        no_pixels = make_ct_series(1, 64, 64, seed=4)
        del no_pixels[0].PixelData
        bad = write_series(mr, tmp_path / "bad" / "mr") + write_series(
            no_pixels, tmp_path / "bad" / "nopix"
        )
        refused = storescu(env_port, bad, extra=["-v", "--no-halt"])
        answer = "Received Store Response (Error: DataSetDoesNotMatchSOPClass)"
        assert refused.stderr.count(answer) == 2, refused.stderr

        good = make_ct_series(3, 128, 128, noise_hu=10.0, seed=5)
        uid = good[0].SeriesInstanceUID
        sent = storescu(env_port, write_series(good, tmp_path / "good"), extra=["-v"])
        assert sent.returncode == 0, sent.stderr
        assert sent.stderr.count("Received Store Response (Success)") == 3, sent.stderr

        engine = make_engine(url)
        sessions = make_session_factory(engine)

        def status() -> str | None:
            with sessions() as s:
                row = s.get(Series, uid)
                return row.status if row is not None else None

        deadline = time.monotonic() + 60
        while status() != "scored":
            assert q.proc is not None and q.proc.poll() is None, q.log()[-3000:]
            assert time.monotonic() < deadline, f"not scored: {status()}\n{q.log()[-3000:]}"
            time.sleep(0.2)
        with sessions() as s:
            assert list(s.scalars(select(Series.series_instance_uid))) == [uid]
        engine.dispose()
        assert q.echo()
    finally:
        q.stop()
    assert q.proc is not None and q.proc.returncode == 0, q.log()[-3000:]

    res = strict_json(ok(qgate("--config", str(q.config_path), "results", "--json")).stdout)
    assert [
        (r["series_instance_uid"], r["status"], r["decision"], r["instances"]) for r in res
    ] == [
        (uid, "scored", "pass", 3)  # the refused instances left no series behind
    ]
    log = q.log()
    assert "status=0xA900" in log and "modality MR is not CT" in log and "no Pixel Data" in log
    assert "Traceback" not in log
