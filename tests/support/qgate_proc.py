"""Run ``qgate serve`` as a real subprocess, the way an operator would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


class QgateProcess:
    """``qgate serve --config`` (or one stage: ``command="worker"`` ...) in a subprocess,
    with its log captured to a file.

    ``start`` waits until the process answers C-ECHO (``serve``, ``receive``) or logs that
    its stage runs (the other stages).
    """

    def __init__(
        self, workdir: Path, config: dict[str, Any], *, command: Sequence[str] = ("serve",)
    ) -> None:
        self.workdir = workdir
        self.command = list(command)
        workdir.mkdir(parents=True, exist_ok=True)
        # The review app would bind 8080 by default; tests that want it ask for it.
        config = {"web": {"enabled": False}, **config}
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "qgate.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = int(config["dicom"]["port"])
        self.ae_title = str(config["dicom"].get("ae_title", "QGATE"))

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "qgate.cli", "--config", str(self.config_path), *args],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args).stdout)

    def start(self, timeout: float = 60.0) -> QgateProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("QGATE_CONFIG", None)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qgate.cli", "--config", str(self.config_path), *self.command],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        listens = self.command[0] in ("serve", "receive")
        ready = f"stage {self.command[0]} running"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qgate {self.command[0]} exited: {self.log()[-3000:]}")
            if (self.echo() if listens else ready in self.log()):
                return self
            time.sleep(0.3)
        raise TimeoutError(f"qgate {self.command[0]} did not start: {self.log()[-3000:]}")

    def echo(self) -> bool:
        r = subprocess.run(
            ["echoscu", "-aec", self.ae_title, "-to", "2", "127.0.0.1", str(self.port)],
            capture_output=True,
        )
        return r.returncode == 0

    def storescu(self, files: list[Path], *extra: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TCP_NODELAY": "1"}
        return subprocess.run(
            [
                "storescu",
                "-aet",
                "MODALITY",
                "-aec",
                self.ae_title,
                *extra,
                "127.0.0.1",
                str(self.port),
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, predicate, timeout: float = 120.0, what: str = "condition"):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"qgate serve died: {self.log()[-3000:]}")
            last = predicate()
            if last:
                return last
            time.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}; last={last!r}\n{self.log()[-4000:]}")
