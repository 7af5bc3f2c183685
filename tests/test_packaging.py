"""A wheel built from a clean checkout runs outside the repository.

The wheel is built from a copy of the files a commit would hold (what a ``git clone``
holds: nothing git ignores, no virtual environment, no editable-install finder) and
installed non-editable into a fresh virtual environment. Its dependencies are borrowed
from this interpreter's site-packages through a ``.pth`` line instead of being
downloaded again (torch alone is gigabytes); ``.pth`` files inside a borrowed folder are
not run, so the checkout's editable finder stays out and ``import qgate`` must resolve to
the installed wheel, which the test checks. From another working directory the installed
``qgate`` migrates its database (the migrations ship inside the wheel), puts its data
under ``$QGATE_HOME``, answers C-ECHO under ``qgate serve --config PATH``, and the
container health check reports it healthy, then unhealthy once it has stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from qgate.cli import main
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"


def _tracked(*paths: str) -> list[str]:
    """The files a commit of the work tree would hold (under ``paths``): tracked ones it
    still has, and new ones git does not ignore. In CI's clone that is the checkout."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *paths],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [rel for rel in out.split("\0") if rel and (ROOT / rel).is_file()]


def _copy_tracked_files(dest: Path) -> None:
    for rel in _tracked():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)


def _build_wheel(tmp_path: Path) -> Path:
    src, dist = tmp_path / "checkout", tmp_path / "dist"
    _copy_tracked_files(src)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--wheel-dir",
            str(dist),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("qgate-*.whl")
    return wheel


def _venv_with_wheel(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "borrowed_dependencies.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return venv


def _echo(port: int) -> bool:
    out = subprocess.run(
        ["echoscu", "-aec", "QGATE", "-to", "2", "127.0.0.1", str(port)], capture_output=True
    )
    return out.returncode == 0


@pytest.mark.slow
def test_wheel_installed_elsewhere_migrates_and_answers_echo(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = _tracked("migrations")
    assert {m for m in migrations if m.endswith(".py")} <= names
    assert {"migrations/script.py.mako", "qgate/weights/mdiqa.safetensors"} <= names
    assert not any(n.startswith(("tests/", "deploy/")) for n in names)

    venv = _venv_with_wheel(tmp_path, wheel)
    elsewhere, home = tmp_path / "elsewhere", tmp_path / "home"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QGATE_") and k != "PYTHONPATH"}
    env["QGATE_HOME"] = str(home)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
        )

    where = run(
        str(venv / "bin" / "python"),
        "-c",
        "import qgate, migrations; print(qgate.__file__); print(migrations.__file__)",
    )
    assert where.returncode == 0, where.stderr
    for line in where.stdout.splitlines():
        assert Path(line).is_relative_to(venv), line  # the wheel, not the checkout

    upgraded = run(str(venv / "bin" / "qgate"), "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr[-3000:]
    assert upgraded.stdout.strip() == "database at head"
    with sqlite3.connect(home / "qgate.db") as db:  # the default database under QGATE_HOME
        (version,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
    revisions = sorted(Path(m).name for m in migrations if m.startswith("migrations/versions/0"))
    assert revisions[-1].startswith(version)
    assert not (elsewhere / "var").exists()

    dicom_port, web_port = free_port(), free_port()
    config = elsewhere / "qgate.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dicom": {"host": "127.0.0.1", "port": dicom_port},
                "web": {"host": "127.0.0.1", "port": web_port},
                "scoring": {"scorers": ["noise", "snr"]},
                "retrain": {"enabled": False},
            }
        )
    )
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen(
        [str(venv / "bin" / "qgate"), "serve", "--config", str(config)],
        cwd=elsewhere,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    health_env = {**env, "QGATE_CONFIG": str(config)}
    healthcheck = [str(venv / "bin" / "python"), str(HEALTHCHECK)]
    try:
        deadline = time.monotonic() + 120
        while not _echo(dicom_port):
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "qgate serve never answered C-ECHO"
            time.sleep(0.5)
        assert (home / "spool").is_dir()  # storage.root follows QGATE_HOME too

        healthy = subprocess.run(
            healthcheck, cwd=elsewhere, env=health_env, capture_output=True, text=True
        )
        for _ in range(20):  # the review app may come up a moment after the SCP
            if healthy.returncode == 0:
                break
            time.sleep(0.5)
            healthy = subprocess.run(
                healthcheck, cwd=elsewhere, env=health_env, capture_output=True, text=True
            )
        assert (healthy.returncode, healthy.stderr) == (0, "")
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        log.close()
    stopped = subprocess.run(
        healthcheck, cwd=elsewhere, env=health_env, capture_output=True, text=True
    )
    assert stopped.returncode == 1
    assert f"DICOM port {dicom_port}" in stopped.stderr and f":{web_port}/healthz" in stopped.stderr


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*prefix, name))
    return out


def test_every_command_takes_config_before_or_after_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = _commands(main)
    assert ("serve",) in commands and ("db", "upgrade") in commands
    for path in commands:
        cmd: click.Command = main
        for name in path:
            assert isinstance(cmd, click.Group)
            cmd = cmd.commands[name]
        assert "--config" in [o for p in cmd.params for o in p.opts], path

    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith("QGATE_"):
            monkeypatch.delenv(key)

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"database": {"url": f"sqlite:///{tmp_path / name}.db"}}))
        return path

    a, b, c = config("a"), config("b"), config("c")
    runner = CliRunner()
    for args, made in [
        (["db", "upgrade", "--config", str(a)], "a.db"),
        (["db", "--config", str(b), "upgrade"], "b.db"),
        (["--config", str(c), "db", "upgrade", "--config", str(c)], "c.db"),
    ]:
        result = runner.invoke(main, args)
        assert (result.exit_code, result.output.strip()) == (0, "database at head"), args
        assert (tmp_path / made).is_file()
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["a.db", "b.db", "c.db"]

    both = runner.invoke(main, ["--config", str(a), "results", "--config", str(b)])
    assert both.exit_code == 2
    assert f"--config given twice, as {a} and as {b}" in both.output
    missing = runner.invoke(main, ["results", "--json", "--config", str(tmp_path / "no.yaml")])
    assert missing.exit_code == 1 and "config file not found" in missing.output
