"""The deployment files under ``deploy/``, checked with the tools that run here.

Images cannot be built or run on these machines (no container registry is reachable), so
the Dockerfiles are linted by hadolint and parsed by BuildKit's own parser (the
``dockerfile`` package); the compose files are validated against the Compose
Specification's JSON schema (``tests/support/compose-spec.json``, compose-spec/compose-spec
at 170098ba, Apache-2.0) and their ``QGATE_*`` variables against :class:`Settings`; the
systemd files go through ``systemd-analyze verify``, ``systemd-analyze security`` and
``systemd-sysusers`` against a scratch root that holds the paths the unit names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from qgate.core.config import HOME_ENV, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
COMPOSE = DEPLOY / "compose"
COMPOSE_FILES = ("compose.yaml", "compose.gpu.yaml", "compose.tls.yaml")
SYSTEMD = DEPLOY / "systemd"
UNIT = SYSTEMD / "qgate.service"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


# -- Dockerfiles ------------------------------------------------------------------------------


def test_there_is_a_cpu_and_a_cuda_dockerfile() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path: Path) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or "hadolint"
    out = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def _final_stage(path: Path) -> list[dockerfile.Command]:
    commands = list(dockerfile.parse_file(str(path)))
    starts = [i for i, c in enumerate(commands) if c.cmd == "FROM"]
    assert starts, f"{path.name} has no FROM"
    return commands[starts[-1] :]


def _env(stage: list[dockerfile.Command]) -> dict[str, str]:
    env: dict[str, str] = {}
    for c in stage:
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2], strict=True))
    return env


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_its_own_user_with_a_health_check(path: Path) -> None:
    stage = _final_stage(path)
    users = [c.value[0] for c in stage if c.cmd == "USER"]
    assert users, "the final stage never leaves root"
    uid = users[-1].split(":")[0]
    assert uid not in {"root", "0"}
    # The uid is the one the image creates, without a login shell.
    created = " ".join(c.value[0] for c in stage if c.cmd == "RUN")
    assert re.search(rf"useradd [^&]*--uid {uid} [^&]*--shell /usr/sbin/nologin", created)

    checks = [c for c in stage if c.cmd == "HEALTHCHECK"]
    assert len(checks) == 1 and checks[0].value[0] == "CMD"
    copied = {c.value[-1]: c.value[0] for c in stage if c.cmd == "COPY" and not c.flags}
    script = checks[0].value[-1]
    assert copied.get(script) == "deploy/docker/healthcheck.py"

    env = _env(stage)
    assert env[HOME_ENV] == "/var/lib/qgate"
    volumes = [v for c in stage if c.cmd == "VOLUME" for v in c.value]
    assert volumes == [env[HOME_ENV]]
    assert copied.get(env["QGATE_CONFIG"]) == "deploy/config.yaml"
    assert [c.value for c in stage if c.cmd == "CMD"][-1] == ("qgate", "serve")


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex on a path."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):  # "**/x" also matches "x"
                out = out[:-2] + "(?:.*/)?"
                i += 1
            continue
        ch = pattern[i]
        out += "[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch)
        i += 1
    return re.compile(out + r"\Z")


def _in_build_context(relpath: str, ignore_lines: list[str]) -> bool:
    """Whether Docker sends ``relpath`` with the context: the last matching pattern wins,
    and a pattern that matches a parent folder applies to what is inside it."""
    parts = relpath.split("/")
    candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    included = True
    for line in ignore_lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = _ignore_regex(pattern)
        if any(regex.match(c) for c in candidates):
            included = negate
    return included


def _tracked(path: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--", path], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return [f for f in out.stdout.splitlines() if (ROOT / f).exists()]


def test_dockerignore_matcher_follows_docker_rules() -> None:
    rules = ["*", "!qgate/", "**/__pycache__", "!deploy/config.yaml"]
    assert _in_build_context("qgate/cli.py", rules)
    assert not _in_build_context("qgate/__pycache__/cli.cpython-311.pyc", rules)
    assert not _in_build_context(".venv/bin/python", rules)
    assert _in_build_context("deploy/config.yaml", rules)
    assert not _in_build_context("deploy/compose/compose.yaml", rules)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_what_the_build_context_holds(path: Path) -> None:
    """Every COPY source exists in the repository and survives .dockerignore, so a build
    from the repository root cannot fail on a missing file."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    sources = [
        src
        for c in dockerfile.parse_file(str(path))
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags)
        for src in c.value[:-1]
    ]
    assert "migrations/" in sources and "qgate/" in sources
    for src in sources:
        files = _tracked(src.rstrip("/"))
        assert files, f"COPY {src}: nothing tracked there"
        dropped = [f for f in files if not _in_build_context(f, ignore)]
        assert not dropped, f"COPY {src}: .dockerignore drops {dropped[:5]}"


# -- compose ----------------------------------------------------------------------------------


def _compose(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((COMPOSE / name).read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_follows_the_compose_specification(name: str) -> None:
    schema = json.loads((ROOT / "tests" / "support" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(_compose(name))
    ]
    assert errors == []
    # The schema is strict enough to notice a misspelt key.
    broken = _compose(name)
    next(iter(broken["services"].values()))["prots"] = ["11112:11112"]
    assert list(validator.iter_errors(broken))


def test_compose_stack_has_database_archive_and_qgate() -> None:
    base = _compose("compose.yaml")
    services = base["services"]
    assert set(services) == {"postgres", "orthanc", "qgate-migrate", "qgate"}
    assert services["qgate"]["command"] == ["qgate", "serve"]
    assert services["qgate-migrate"]["command"] == ["qgate", "db", "upgrade"]
    assert services["qgate"]["depends_on"]["qgate-migrate"] == {
        "condition": "service_completed_successfully"
    }
    assert services["qgate-migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert "11112:11112" in services["qgate"]["ports"]

    named = {
        m.split(":")[0]
        for s in services.values()
        for m in s.get("volumes", [])
        if not m.startswith((".", "/"))
    }
    assert named == set(base["volumes"]) == {"postgres-data", "orthanc-data", "qgate-data"}
    # qgate's data volume is where the image keeps its data folder.
    env = _env(_final_stage(DEPLOY / "docker" / "Dockerfile.cpu"))
    assert f"qgate-data:{env[HOME_ENV]}" in services["qgate"]["volumes"]

    for name in COMPOSE_FILES:
        for svc in _compose(name)["services"].values():
            build = svc.get("build")
            if build:
                context = (COMPOSE / build["context"]).resolve()
                assert context == ROOT and (context / build["dockerfile"]).is_file()
    gpu = _compose("compose.gpu.yaml")["services"]["qgate"]
    assert gpu["build"]["dockerfile"].endswith("Dockerfile.cuda")
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[?-][^}]*)?\}")


def _merged_qgate_env(*names: str) -> dict[str, str]:
    """The qgate service's environment after the overlays, with ${VAR...} filled in."""
    env: dict[str, str] = {}
    for name in names:
        env.update(_compose(name)["services"]["qgate"].get("environment", {}))
    return {k: _INTERPOLATION.sub("secret", str(v)) for k, v in env.items()}


def _field_path_exists(model: type[BaseModel], path: list[str]) -> bool:
    field = model.model_fields.get(path[0])
    if field is None:
        return False
    if len(path) == 1:
        return True
    sub = field.annotation
    return (
        isinstance(sub, type) and issubclass(sub, BaseModel) and _field_path_exists(sub, path[1:])
    )


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for key in list(os.environ):
        if key.startswith("QGATE_"):
            monkeypatch.delenv(key)
    yield monkeypatch


def test_compose_environment_names_real_settings(clean_env: pytest.MonkeyPatch) -> None:
    """Nested QGATE_ variables that name no setting are ignored silently by the settings
    loader, so a typo would switch nothing on: each one must name a field."""
    env = _merged_qgate_env(*COMPOSE_FILES)
    for key in env:
        path = key.removeprefix("QGATE_").lower().split("__")
        assert _field_path_exists(Settings, path), f"{key} names no setting"
    assert _field_path_exists(Settings, ["dicom", "tls", "enabled"])
    assert not _field_path_exists(Settings, ["dicom", "tsl", "enabled"])

    clean_env.setenv(HOME_ENV, "/var/lib/qgate")
    for key, value in env.items():
        clean_env.setenv(key, value)
    settings = load_settings(DEPLOY / "config.yaml")
    assert settings.database.url.startswith("postgresql+psycopg://qgate:secret@postgres:5432/")
    assert (settings.archive.host, settings.archive.port) == ("orthanc", 4242)
    for side in (settings.dicom.tls, settings.archive.tls):
        assert side.enabled and side.require_client_certificate
        assert side.ca_bundle == Path("/etc/qgate/tls/ca.crt")
    assert settings.storage.root == Path("/var/lib/qgate")


def test_installed_config_follows_qgate_home(clean_env: pytest.MonkeyPatch) -> None:
    settings = load_settings(DEPLOY / "config.yaml")
    assert settings.storage.root == Path("var")  # relative: the checkout's embedded default
    clean_env.setenv(HOME_ENV, "/var/lib/qgate")
    settings = load_settings(DEPLOY / "config.yaml")
    assert settings.storage.root == Path("/var/lib/qgate")
    assert settings.database.url == "sqlite:////var/lib/qgate/qgate.db"
    clean_env.setenv(HOME_ENV, "var/lib/qgate")
    with pytest.raises(ValueError, match="QGATE_HOME must be an absolute path"):
        load_settings(DEPLOY / "config.yaml")


# -- systemd ----------------------------------------------------------------------------------


def _unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> values of a unit file (keys may repeat, so not configparser)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A scratch root with the system's units, the unit, and the executable it names."""
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    exe = Path(_unit_settings(UNIT)["ExecStart"][0].split()[0])
    (root / exe.relative_to("/")).parent.mkdir(parents=True)
    (root / exe.relative_to("/")).write_text("#!/bin/sh\n")
    (root / exe.relative_to("/")).chmod(0o755)
    return root


def _systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120)


def test_unit_has_absolute_paths_a_dedicated_user_and_hardening() -> None:
    unit = _unit_settings(UNIT)
    exec_start = unit["ExecStart"][0].split()
    assert exec_start[0] == "/opt/qgate/bin/qgate" and exec_start[-1] == "serve"
    config = exec_start[exec_start.index("--config") + 1]
    assert config == "/etc/qgate/config.yaml"
    assert unit["User"] == ["qgate"] and unit["Group"] == ["qgate"]
    assert unit["Environment"] == [f"{HOME_ENV}=/var/lib/qgate"]
    assert unit["StateDirectory"] == ["qgate"] and unit["ReadWritePaths"] == ["/var/lib/qgate"]
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert unit[key] == [value], key


def test_unit_passes_systemd_analyze_verify(unit_root: Path) -> None:
    out = _systemd_analyze("verify", f"--root={unit_root}", "--man=no", UNIT.name)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")
    # With the GPU drop-in too; and verify does report a misspelt key.
    dropins = unit_root / "etc/systemd/system" / f"{UNIT.name}.d"
    dropins.mkdir()
    shutil.copy(SYSTEMD / f"{UNIT.name}.d" / "gpu.conf", dropins / "gpu.conf")
    out = _systemd_analyze("verify", f"--root={unit_root}", "--man=no", UNIT.name)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")
    (dropins / "typo.conf").write_text("[Service]\nProtectSytem=strict\n")
    out = _systemd_analyze("verify", f"--root={unit_root}", "--man=no", UNIT.name)
    assert "Unknown key 'ProtectSytem'" in out.stderr


def test_unit_exposure_is_low(unit_root: Path) -> None:
    """systemd's own exposure score (0 best, 10 worst) stays at or below 2.5, "OK"."""
    out = _systemd_analyze(
        "security",
        "--offline=yes",
        f"--root={unit_root}",
        "--threshold=25",
        "--no-pager",
        UNIT.name,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr
    level = re.search(r"Overall exposure level for qgate.service: ([\d.]+)", out.stdout)
    assert level and float(level.group(1)) <= 2.5


def test_sysusers_creates_the_qgate_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    out = subprocess.run(
        [
            "systemd-sysusers",
            f"--root={tmp_path}",
            "--dry-run",
            str(SYSTEMD / "qgate-sysusers.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    log = out.stdout + out.stderr
    assert "Creating group 'qgate'" in log and "Creating user 'qgate'" in log


# -- the conformance statement ------------------------------------------------------------------


def test_conformance_statement_lists_what_the_code_negotiates() -> None:
    """docs/conformance.md names every SOP class and transfer syntax the SCP accepts, the
    statuses the SCU counts as stored, and the transfer syntax of the quality maps."""
    from pydicom.uid import RLELossless

    from qgate.dispatch.scu import STORED_STATUSES
    from qgate.receive.handlers import CT_STORAGE_SOP_CLASSES
    from qgate.receive.scp import TRANSFER_SYNTAXES, build_ae

    text = (ROOT / "docs" / "conformance.md").read_text()
    ae = build_ae(load_settings(None))
    negotiated = {str(cx.abstract_syntax) for cx in ae.supported_contexts}
    assert negotiated == {"1.2.840.10008.1.1", *map(str, CT_STORAGE_SOP_CLASSES)}
    for uid in negotiated | {str(ts) for cx in ae.supported_contexts for ts in cx.transfer_syntax}:
        assert uid in text, uid
    assert {str(ts) for ts in TRANSFER_SYNTAXES} <= set(re.findall(r"1\.2\.840\.10008[\d.]+", text))
    for status in STORED_STATUSES - {0}:
        assert f"0x{status:04X}" in text
    assert str(RLELossless) in text
