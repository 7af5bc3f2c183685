"""Nightly retraining on tiny data: labels in, candidate trained and compared, promoted or
rejected, rolled back, and picked up by the worker between jobs."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qgate.assemble.completion import queue_complete_series
from qgate.cli import main
from qgate.core.config import RetrainConfig, ScoringConfig, Settings, SliceScorerConfig
from qgate.core.db.models import ModelVersion, Result, TrainingRun, User, Verdict, utcnow
from qgate.core.registry import activate, active_weights, local_weights_path, sha256_file
from qgate.retrain import decide, reviewed_labels, run_retrain, split_groups
from qgate.retrain.labels import series_paths
from qgate.score.worker import Worker
from qgate.web.app import create_app
from tests.support.web import add_user, login, scored_series, spool_series


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite only: the retraining's SQL is the registry's and the verdicts', tested on both."""
    return f"sqlite:///{tmp_path / 'qgate.db'}"


def _settings(settings: Settings, *, margin: float, scorers: list[str]) -> Settings:
    return settings.model_copy(
        update={
            "scoring": ScoringConfig(
                scorers=scorers, device="cpu", mdiqa=SliceScorerConfig(max_slices=3)
            ),
            "retrain": RetrainConfig(
                margin=margin,
                min_reviewed=2,
                held_out_fraction=0.34,
                slices_per_series=3,
                epochs=8,
                batch_size=9,
                learning_rate=5e-4,
                refit_chestiqa=False,
            ),
        }
    )


def _reviewed(settings: Settings, sessions: sessionmaker[Session]) -> None:
    """Four reviewed series (one patient each) scored by physics: less noise, higher score,
    and one recent unreviewed series for the pseudo-labels."""
    add_user(sessions, "rad", "radiologist")
    cheap = settings.model_copy(update={"scoring": ScoringConfig(scorers=["noise"])})
    for k, (noise, score) in enumerate([(3.0, 4), (10.0, 4), (20.0, 3), (35.0, 3)]):
        uid = scored_series(cheap, sessions, n=4, noise_hu=noise, seed=k, patient_id=f"P{k}")
        with sessions.begin() as s:
            result = s.scalar(select(Result).where(Result.series_instance_uid == uid))
            user = s.scalar(select(User))
            assert result is not None and user is not None
            for v in (0, score):  # the newest verdict is the label
                s.add(
                    Verdict(
                        series_instance_uid=uid,
                        result_id=result.id,
                        decision=result.decision,
                        user_id=user.id,
                        agrees=True,
                        score=v,
                    )
                )
    scored_series(cheap, sessions, n=4, noise_hu=15.0, seed=9, patient_id="U1")


def _score_one(
    worker: Worker, settings: Settings, sessions: sessionmaker[Session], seed: int
) -> str:
    uid = spool_series(settings, sessions, n=4, seed=seed, patient_id=f"W{seed}")
    queue_complete_series(sessions, settings.series, now=utcnow() + dt.timedelta(days=1))
    assert worker.step() == "scored"
    with sessions() as s:
        versions = s.scalar(select(Result.scorer_versions).where(Result.series_instance_uid == uid))
    assert versions is not None
    return str(versions["mdiqa"])


def test_promote_hot_reload_and_rollback(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    settings = _settings(settings, margin=0.0, scorers=["mdiqa"])
    _reviewed(settings, sessions)
    worker = Worker(settings, sessions, owner="test/retrain")
    assert worker.serving == {"mdiqa": "mdiqa-shipped"}
    shipped_tag = _score_one(worker, settings, sessions, seed=20)

    outcome = run_retrain(settings, sessions, trigger="cli")
    out = json.loads(json.dumps(outcome.to_json(), allow_nan=False))
    assert out["promoted"] is True, out
    assert out["current"]["n"] == out["candidate"]["n"] == 2
    assert out["candidate"]["mae"] < out["current"]["mae"]
    assert out["data"]["train_series"] == 2 and out["data"]["unlabelled_series"] == 2  # U1, W20
    with sessions() as s:
        run = s.get(TrainingRun, out["run_id"])
        assert run is not None and run.status == "promoted" and run.promoted
        assert run.promoted_models == out["promoted_models"] == ["mdiqa"]
        assert run.metrics["candidate"]["mae"] == out["candidate"]["mae"]
        serving = active_weights(s, root=settings.storage.root)["mdiqa"]
        assert serving.version == out["candidate_version"]
        assert serving.path.parent == settings.storage.root / "models" / f"run-{run.id}"
        parent = s.scalar(select(ModelVersion).where(ModelVersion.version == run.current_version))
        assert parent is not None and not parent.active  # the shipped weights, registered

    # The worker serves the new version from the next job on.
    new_tag = _score_one(worker, settings, sessions, seed=21)
    assert worker.serving == {"mdiqa": out["candidate_version"]}
    assert new_tag == f"1.0.0+{sha256_file(serving.path)[:12]}" != shipped_tag

    # Rollback: activate the parent; the worker follows between jobs.
    with sessions() as s:
        activate(s, out["current_version"], root=settings.storage.root)
    assert _score_one(worker, settings, sessions, seed=22) == shipped_tag
    assert worker.serving == {"mdiqa": out["current_version"]}


def test_rejected_below_margin_and_not_enough_data(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = _settings(settings, margin=100.0, scorers=["noise"])
    settings.retrain.epochs = 1
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"database": {"url": settings.database.url}, "storage": {"root": str(tmp_path)}}
        )
    )
    cli = CliRunner().invoke(main, ["--config", str(cfg), "retrain", "--now", "--json"])
    assert cli.exit_code == 0, cli.output
    first = json.loads(cli.stdout)
    assert (first["promoted"], first["candidate_version"]) == (False, None)
    assert "0 reviewed series" in first["reason"]
    assert set(first) >= {"promoted", "candidate", "current", "reason", "run_id"}

    _reviewed(settings, sessions)
    outcome = run_retrain(settings, sessions, trigger="schedule")
    assert (outcome.status, outcome.promoted) == ("rejected", False)
    assert "not better by more than the margin 100" in outcome.reason
    with sessions() as s:
        cand = s.scalar(
            select(ModelVersion).where(ModelVersion.version == outcome.candidate_version)
        )
        assert cand is not None and not cand.active
        assert active_weights(s, root=settings.storage.root)["mdiqa"].version == "mdiqa-shipped"
        runs = s.scalars(select(TrainingRun).order_by(TrainingRun.id)).all()
        assert [r.status for r in runs] == ["rejected", "rejected"]

    add_user(sessions, "boss", "admin")
    with TestClient(create_app(settings, sessions)) as client:
        login(client, "boss")
        page = client.get("/training").text
    assert outcome.candidate_version in page and "margin 100" in page
    assert page.count("<b>rejected</b>") == 2


def test_hold_out_and_decision_rules() -> None:
    groups = [f"P{i}" for i in range(10)]
    held = split_groups(groups, 0.25, seed=0)
    assert len(held) == 3 and held == split_groups(list(reversed(groups)), 0.25, seed=0)
    assert split_groups(["P0"], 0.5, seed=0) == set()
    assert len(split_groups(["P0", "P1"], 0.9, seed=0)) == 1
    assert decide({"n": 3, "mae": 0.5}, {"n": 3, "mae": 0.8}, 0.1)[:2] == (True, "mae")
    assert decide({"n": 3, "mae": 0.75}, {"n": 3, "mae": 0.8}, 0.1)[0] is False
    both = {"n": 9, "mae": 1.0}
    assert decide({**both, "overall": 2.5}, {**both, "overall": 2.0}, 0.2)[:2] == (True, "overall")


def _simulated(root: Path) -> tuple[Path, dict[str, int]]:
    """A tiny MD-IQA folder from the physics simulator (what `qgate-train data build` makes)."""
    from training.datasets.common import SourceConfig
    from training.datasets.mdiqa import MdiqaConfig, build_mdiqa

    cfg = MdiqaConfig(n=12, size=64, pixel_mm=5.6, seed=1, fast=True)
    build_mdiqa(root, cfg, SourceConfig(diffdrr=False, phantoms=6), device="cpu")
    splits = json.loads((root / "splits.json").read_text())
    labels = json.loads((root / "train.json").read_text())
    return root, {k: sum(n in labels for n in splits[k]) for k in ("train", "test")}


def test_chest_refit_and_simulated_data_are_trained_recorded_and_plotted(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Reviewed scores refit Chest CT-IQA's linear quality fit (stored with its metrics in
    the registry, and active only with a promotion it does not make worse), the simulated
    folder joins training and held-out sets, and the training-runs page plots the run."""
    from qgate.models import predict_chestiqa
    from qgate.score.scorers.learned import load_model
    from training.retrain import load_slices

    sim, counts = _simulated(tmp_path / "sim")
    assert counts["train"] > 0 and counts["test"] > 0
    settings = _settings(settings, margin=0.0, scorers=["noise"])
    settings.retrain.refit_chestiqa = True
    settings.retrain.simulated_dir = sim
    settings.retrain.epochs = 2
    _reviewed(settings, sessions)

    out = run_retrain(settings, sessions, trigger="cli").to_json()
    assert out["status"] in ("promoted", "rejected"), out["reason"]
    # The simulated path: its labelled train split trains, its test split is held out.
    assert out["data"]["simulated"] == {"dir": str(sim), **counts}
    assert out["candidate"]["n"] == out["current"]["n"] == 2 + counts["test"]
    curve = out["candidate"]["loss_curve"]
    steps = 2 * -(-(out["data"]["train_slices"] + counts["train"]) // 9)  # epochs x batches
    assert curve["steps"] == len(curve["sup"]) == len(curve["pseudo"]) == steps

    # The chest refit: 1-10 labels of the two training series, metrics of both fits.
    cand, cur = out["candidate"]["chestiqa"], out["current"]["chestiqa"]
    assert cand["n"] == cur["n"] == 2 and len(cand["coef"]) == 4
    with sessions() as s:
        chest = s.scalar(
            select(ModelVersion).where(
                ModelVersion.model == "chestiqa", ModelVersion.parent.is_not(None)
            )
        )
        assert chest is not None and chest.metrics["candidate"] == cand
        assert (
            chest.metrics["current"] == cur
            and chest.data_snapshot["simulated"]["test"] == counts["test"]
        )
        serving = active_weights(s, root=settings.storage.root)["chestiqa"]
        labels = reviewed_labels(s)
        held = {
            uid: load_slices(series_paths(s, uid, settings.storage.root), 3, keep_full=True)[1:]
            for uid in out["data"]["held_out_series"]
        }
    chest_should_serve = out["promoted"] and cand["mae"] <= cur["mae"]
    assert (serving.version == chest.version) is chest_should_serve
    assert ("Chest CT-IQA refit promoted too" in out["reason"]) is chest_should_serve
    assert ("chestiqa" in out["promoted_models"]) is chest_should_serve

    # The stored weights carry the refit exactly, and reproduce the held-out MAE.
    model = load_model("chestiqa", local_weights_path(chest.path, settings.storage.root))
    assert model.quality.coef.tolist() == pytest.approx(cand["coef"], abs=1e-5)
    assert float(model.quality.intercept) == pytest.approx(cand["intercept"], abs=1e-5)
    errors = [
        abs(
            predict_chestiqa(model, hu, pixel_mm=px, amp=False).score  # type: ignore[arg-type]
            - (1 + 9 * labels[uid][0] / 4)
        )
        for uid, (hu, px) in held.items()
    ]
    assert float(np.mean(errors)) == pytest.approx(cand["mae"], abs=2e-3)

    # The training-runs page: the metrics, the comparison plots and the run's loss curve.
    add_user(sessions, "rad2", "radiologist")
    with TestClient(create_app(settings, sessions)) as client:
        login(client, "rad2")
        page = client.get("/training").text
    charts = re.findall(r'<svg class="chart"[^>]*data-chart="comparison".*?</svg>', page, re.S)
    assert len(charts) == 2, page[page.find("<main") :][:3000]  # MD-IQA and the chest fit
    assert any("Chest CT-IQA" in c for c in re.findall(r'aria-label="([^"]+)"', page))
    for c in charts:
        assert f"run {out['run_id']}, candidate:" in c and f"run {out['run_id']}, current:" in c
    cell = re.search(rf'<td class="loss-cell" data-run="{out["run_id"]}">(.*?)</td>', page, re.S)
    assert cell is not None
    polylines = re.findall(r'<polyline points="([^"]+)"', cell.group(1))
    assert [len(p.split()) for p in polylines] == [steps, steps]


def test_the_training_runs_as_a_child_process_whose_failure_fails_only_the_run(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    """The service exports the labels (the held-out split is its own) and runs
    ``retrain.command``; a training process that dies, or leaves no result file, fails
    the run with its last words, and nothing is registered."""
    import sys

    from qgate.retrain.contract import LABELS_FILE, TrainRequest

    settings = _settings(settings, margin=0.0, scorers=["noise"])
    _reviewed(settings, sessions)
    crash = "import sys; print('RuntimeError: CUDA out of memory'); sys.exit(3)"
    settings.retrain.command = [sys.executable, "-c", crash]
    outcome = run_retrain(settings, sessions, trigger="cli")
    assert (outcome.status, outcome.promoted, outcome.candidate_version) == ("failed", False, None)
    assert "exited with status 3: RuntimeError: CUDA out of memory" in outcome.reason

    run_dir = settings.storage.root / "models" / f"run-{outcome.run_id}"
    request = TrainRequest.model_validate_json((run_dir / LABELS_FILE).read_text())
    assert request.run_id == outcome.run_id and request.chestiqa is None
    assert len(request.train) == 2 and len(request.held_out) == 2  # 4 patients, 0.34 held
    assert {r.uid for r in request.held_out}.isdisjoint(r.uid for r in request.train)
    assert all(p.is_absolute() and p.is_file() for r in request.train for p in r.paths)

    settings.retrain.command = [sys.executable, "-c", "pass"]  # exits 0, writes nothing
    silent = run_retrain(settings, sessions, trigger="cli")
    assert silent.status == "failed" and "no valid result.json" in silent.reason
    with sessions() as s:
        runs = s.scalars(select(TrainingRun).order_by(TrainingRun.id)).all()
        assert [(r.status, r.promoted_models) for r in runs] == [("failed", []), ("failed", [])]
        assert runs[0].artifacts_dir == f"models/run-{runs[0].id}"  # relative to the root
        assert s.scalar(select(ModelVersion).where(ModelVersion.parent.is_not(None))) is None


@pytest.mark.parametrize("threads", [1, None])
def test_the_training_process_uses_the_threads_retrain_threads_allows(
    settings: Settings, sessions: sessionmaker[Session], threads: int | None
) -> None:
    """``retrain.threads`` (unset: half the cores) reaches the training process: OpenMP,
    MKL and OpenBLAS through their variables, torch's intra- and inter-op pools through
    the training's own entry (``training.retrain.limit_threads``)."""
    import os
    import sys

    settings = _settings(settings, margin=0.0, scorers=["noise"])
    _reviewed(settings, sessions)
    settings.retrain.threads = threads
    report = (
        "import os, sys\n"
        "from training.retrain import limit_threads\n"
        "limit_threads()\n"
        "import torch\n"
        "env = [os.environ[v] for v in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', "
        "'OPENBLAS_NUM_THREADS')]\n"
        "print('threads', torch.get_num_threads(), torch.get_num_interop_threads(), *env)\n"
        "sys.exit(3)\n"
    )
    settings.retrain.command = [sys.executable, "-c", report]
    outcome = run_retrain(settings, sessions, trigger="cli")
    n = threads or max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"exited with status 3: threads {n} {n} {n} {n} {n}" in outcome.reason


def test_the_training_stops_when_the_service_that_started_it_dies(tmp_path: Path) -> None:
    """A training process outlives no crashed service: it is stopped with its parent."""
    import os
    import subprocess
    import sys
    import time

    from qgate.retrain.contract import PARENT_PID_ENV

    pid_file = tmp_path / "training.pid"
    child = (
        "import os, time\n"
        "from training.retrain import stop_with_parent\n"
        "stop_with_parent()\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(120)\n"
    )
    service = (
        "import os, subprocess, sys, time\n"
        f"env = {{**os.environ, {PARENT_PID_ENV!r}: str(os.getpid())}}\n"
        f"subprocess.Popen([sys.executable, '-c', {child!r}], env=env)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", service])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the training process did not start"
            time.sleep(0.1)
        pid = int(pid_file.read_text())
    finally:
        parent.kill()  # the service dies (SIGKILL: no clean-up of its own)
        parent.wait()

    def running() -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            return False
        return state != "Z"

    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = running()
    if alive:
        os.kill(pid, 9)
    assert not alive, "the training process outlived the service that started it"
