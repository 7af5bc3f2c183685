"""Run the training process of a retraining run and read its result file.

The service never imports ``training/``: the training runs in a child process
(``retrain.command``, by default ``python -m training.cli retrain``, the ``qgate-train
retrain`` command) with the contract of :mod:`qgate.retrain.contract`. A crash, an
out-of-memory kill or a hang of the training cannot take the serving process down; the
run is recorded failed with the last line the child wrote (its whole output stays in
``<run dir>/train.log``). The child uses ``retrain.threads`` threads
(:func:`training_threads`), so a node that also scores keeps cores for its workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pydantic import ValidationError

from qgate.core.config import RetrainConfig
from qgate.retrain.contract import (
    LABELS_FILE,
    LOG_FILE,
    PARENT_PID_ENV,
    RESULT_FILE,
    THREADS_ENV,
    TrainRequest,
    TrainResult,
)


class TrainingFailed(RuntimeError):
    """The training process failed, ran too long, or wrote no valid result file."""


def train_command(cfg: RetrainConfig) -> list[str]:
    """The command that runs the training (before ``--labels`` and ``--out``)."""
    if cfg.command:
        return list(cfg.command)
    return [sys.executable, "-m", "training.cli", "retrain"]


def training_threads(cfg: RetrainConfig) -> int:
    """``retrain.threads``, or half the cores this process may run on (at least 1)."""
    if cfg.threads is not None:
        return cfg.threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 2
    return max(1, cores // 2)


def training_env(cfg: RetrainConfig) -> dict[str, str]:
    """The training process's environment: this one's, the parent's process ID
    (:data:`PARENT_PID_ENV`) and its thread limit in every variable that sets one."""
    threads = str(training_threads(cfg))
    return {
        **os.environ,
        PARENT_PID_ENV: str(os.getpid()),
        THREADS_ENV: threads,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
    }


def _last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no output"
    return lines[-1][:500] if lines else "no output"


def run_training(request: TrainRequest, run_dir: Path, cfg: RetrainConfig) -> TrainResult:
    """Write ``request`` to ``run_dir``'s label file, run the training there, return its
    result.

    Raises
    ------
    TrainingFailed
        The process could not start, exited non-zero, ran past ``retrain.timeout_hours``
        (it is killed), or left no valid result file for this run.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    labels, result_file, log = run_dir / LABELS_FILE, run_dir / RESULT_FILE, run_dir / LOG_FILE
    labels.write_text(request.model_dump_json(by_alias=True, indent=1))
    result_file.unlink(missing_ok=True)
    cmd = [*train_command(cfg), "--labels", str(labels), "--out", str(run_dir)]
    with log.open("wb") as out:
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=training_env(cfg),
                timeout=cfg.timeout_hours * 3600,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise TrainingFailed(
                f"the training process ran longer than retrain.timeout_hours="
                f"{cfg.timeout_hours:g} and was stopped (output: {log})"
            ) from None
        except OSError as exc:
            raise TrainingFailed(f"could not start the training ({cmd[0]}): {exc}") from exc
    if proc.returncode != 0:
        raise TrainingFailed(
            f"the training process exited with status {proc.returncode}: "
            f"{_last_line(log)} (output: {log})"
        )
    try:
        result = TrainResult.model_validate_json(result_file.read_text())
    except (OSError, ValidationError) as exc:
        raise TrainingFailed(f"no valid {RESULT_FILE} from the training process: {exc}") from exc
    if result.run_id != request.run_id:
        raise TrainingFailed(f"{result_file} is of run {result.run_id}, not {request.run_id}")
    return result
