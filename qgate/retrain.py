"""Nightly retraining: fine-tune MD-IQA on the radiologists' scores and promote it only if
it beats the serving model on held-out series (issue 5).

One run (:func:`run_retrain`, from the scheduler in :mod:`qgate.service` or
``qgate retrain --now``):

1. **Data.** Labelled: every reviewed series, labelled with its newest verdict's score
   (0-4, MD-IQA's scale), ``retrain.slices_per_series`` evenly spaced slices each, read
   from the spool. A deterministic hold-out by patient (SHA-256 of the patient ID, the
   series UID when there is none; ``retrain.held_out_fraction`` of the patients, at least
   one, never all) is kept for the comparison. Optionally the simulated MD-IQA folder
   (``retrain.simulated_dir``): train split to training, test split to the held-out set.
   Unlabelled: series scored in the last ``retrain.recent_unreviewed_days`` with no
   verdict, pseudo-labelled by an ensemble of the serving model on the slice and its
   mirror image (MD-IQA's ensemble pseudo-labels, kept light: one model, two views).
2. **Candidate.** The serving MD-IQA weights fine-tuned for ``retrain.epochs`` epochs with
   the paper's supervised loss (L2 + beta KL) on the labels plus
   ``retrain.pseudo_label_weight`` x the same loss on the pseudo-labels (the EMA
   consistency term is left out: a few steps are too short for a teacher to matter).
   Chest CT-IQA's linear quality module is refit (:meth:`QualityFit.refit`, ridge 1) on
   the training series' scores mapped to the paper's 1-10 scale: ``1 + 9 * score / 4``.
3. **Comparison** on the held-out set, one item per held-out series (its mean slice
   score) and one per simulated test slice. With at least ``retrain.min_correlation_items``
   items and non-constant labels the metric is Overall = |PLCC| + |SROCC| + |KROCC|
   (LDCTIQAC2023, higher is better), else MAE (lower is better). The candidate is promoted
   only if it is better by more than ``retrain.margin``. Chest CT-IQA's refit goes along
   with a promotion only if its held-out MAE (1-10 scale) is not worse than the current fit.
4. **Record.** Weights under ``storage.root/models/run-<id>/``; a :class:`ModelVersion` per
   candidate (activated only when promoted, so the worker reloads between jobs) and the
   :class:`TrainingRun` row: status promoted|rejected|failed, both models' metrics, the
   fine-tuning's loss curve, reason.

A run whose process died (a crash, a shutdown mid-run) would stay ``running`` for ever:
:func:`recover_interrupted_runs` marks such runs failed, with the reason, when a new run
starts and when the service starts its scheduler. A running row records who runs it
(node, host, process ID and start time), so a run that another live process is still
running is left alone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
import socket
import threading
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from qgate.config import RetrainConfig, Settings
from qgate.db.lock import cluster_lock
from qgate.db.models import (
    Instance,
    ModelVersion,
    Result,
    Series,
    TrainingRun,
    Verdict,
    utcnow,
)
from qgate.events import record
from qgate.registry import (
    ActiveWeights,
    activate,
    active_weights,
    register_version,
    sha256_file,
)
from qgate.storage import to_local

if TYPE_CHECKING:
    import torch

    from qgate.models import MDIQA, ChestIQANet

log = logging.getLogger(__name__)
STAGE = "retrain"

Trigger = Literal["schedule", "cli", "web"]
#: Added to a promoted run's reason when the Chest CT-IQA refit was activated along with it.
CHEST_PROMOTED = "Chest CT-IQA refit promoted too"


#: Runs that this process is running now (to tell its own live runs from dead ones).
_ACTIVE_RUNS: set[int] = set()
_ACTIVE_LOCK = threading.Lock()


class NotEnoughData(Exception):
    """Too few reviewed series for a fair comparison; the run is rejected, not failed."""


@dataclass
class RetrainOutcome:
    """What one run did; :meth:`to_json` is what ``qgate retrain --now --json`` prints."""

    run_id: int
    status: str
    promoted: bool
    reason: str
    candidate: dict[str, Any] = field(default_factory=dict)
    current: dict[str, Any] = field(default_factory=dict)
    candidate_version: str | None = None
    current_version: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Strict JSON: non-finite numbers (a degenerate metric) become null."""
        return _finite(asdict(self))  # type: ignore[no-any-return]


def _finite(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    return o


@dataclass
class _SeriesData:
    uid: str
    group: str
    hu: np.ndarray  # (S, H, W) the chosen slices
    full_hu: np.ndarray | None  # every slice (Chest CT-IQA), reviewed series only
    score: float


# ---------------------------------------------------------------------- data


def serving_weights(settings: Settings, session: Session) -> dict[str, ActiveWeights]:
    """What each model serves: the registry's active version, else the configured file."""
    out = active_weights(session)
    for model, a in out.items():
        configured = getattr(settings.scoring, model).weights
        if a.version == f"{model}-shipped" and configured is not None:
            out[model] = ActiveWeights(model, f"{model}-configured", Path(configured))
    return out


def _hold_out_key(group: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()


def split_groups(groups: Sequence[str], fraction: float, seed: int) -> set[str]:
    """The held-out groups: the first ``ceil(fraction * n)`` by hash, at least 1, never all."""
    uniq = sorted(set(groups), key=lambda g: _hold_out_key(g, seed))
    if len(uniq) < 2:
        return set()
    k = min(max(1, math.ceil(fraction * len(uniq))), len(uniq) - 1)
    return set(uniq[:k])


def _pick(n: int, k: int) -> np.ndarray:
    from qgate.scoring.learned import subsample_indices

    return subsample_indices(n, k)


def _paths(session: Session, uid: str, root: Path) -> list[str]:
    """The series' readable spool files (stored relative to ``root``, storage.root); none
    once retention purged its originals (the callers skip a series without files)."""
    purged = session.scalar(
        select(Series.originals_purged_at).where(Series.series_instance_uid == uid)
    )
    if purged is not None:
        return []
    return [
        str(to_local(p, root))
        for p in session.scalars(
            select(Instance.path)
            .where(Instance.series_instance_uid == uid, Instance.skip_reason.is_(None))
            .order_by(Instance.instance_number, Instance.id)
        )
    ]


def _load(paths: list[str], k: int, *, keep_full: bool) -> tuple[np.ndarray, np.ndarray | None]:
    from qgate.volume import load_series

    hu = load_series(paths).volume.hu
    return np.ascontiguousarray(hu[_pick(len(hu), k)], np.float32), (hu if keep_full else None)


def reviewed_labels(session: Session) -> dict[str, tuple[float, int]]:
    """Series UID -> (score, verdict id) of the newest verdict of each reviewed series."""
    newest = (
        select(func.max(Verdict.id).label("vid")).group_by(Verdict.series_instance_uid).subquery()
    )
    rows = session.execute(
        select(Verdict.series_instance_uid, Verdict.score, Verdict.id).where(
            Verdict.id.in_(select(newest.c.vid))
        )
    )
    return {uid: (float(score), int(vid)) for uid, score, vid in rows}


def _unreviewed(session: Session, cfg: RetrainConfig, reviewed: set[str]) -> list[str]:
    if cfg.recent_unreviewed_days <= 0 or cfg.max_unreviewed_series == 0:
        return []
    since = utcnow() - dt.timedelta(days=cfg.recent_unreviewed_days)
    q = (
        select(Result.series_instance_uid)
        .where(Result.superseded_by.is_(None), Result.created_at >= since)
        .order_by(Result.id.desc())
    )
    out = [u for u in session.scalars(q) if u not in reviewed]
    return out[: cfg.max_unreviewed_series]


# -------------------------------------------------------------------- models


def _inputs(model: MDIQA, hu: np.ndarray) -> torch.Tensor:
    """HU slices -> the crops the worker scores them from, (N, n, C, S, S)."""
    import torch

    from qgate.models.mdiqa import mdiqa_crops, resolve_data_config

    return mdiqa_crops(torch.from_numpy(hu), resolve_data_config(model))


def _slice_logits(model: MDIQA, crops: torch.Tensor) -> torch.Tensor:
    """Crops (b, n, C, S, S) -> pooled slice log-distributions, as the worker pools them."""
    from qgate.models.mdiqa import pool_crop_logits

    b, n = crops.shape[:2]
    flat = model(crops.flatten(0, 1)).float()
    return pool_crop_logits(flat.view(b, n, *flat.shape[1:]))


def _predict(model: MDIQA, x: torch.Tensor, batch: int = 16) -> np.ndarray:
    import torch

    from qgate.models.mdiqa import predict_soft

    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            out.append(predict_soft(_slice_logits(model, x[s : s + batch]), model.cfg.max_score))
    return torch.cat(out).numpy() if out else np.zeros(0)


def _pseudo_labels(model: MDIQA, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Ensemble pseudo-labels (scores): the model on each slice and its mirror image."""
    import torch

    from qgate.models.losses_mdiqa import ensemble_pseudo_labels

    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            xb = x[s : s + batch]
            views = [_slice_logits(model, xb), _slice_logits(model, xb.flip(-1))]
            scores, _ = ensemble_pseudo_labels(views, model.cfg.max_score)
            out.append(scores)
    return torch.cat(out) if out else torch.zeros(0)


def _one_crop(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One of each slice's serving crops, drawn at random: (b, n, ...) -> (b, ...)."""
    import torch

    pick = torch.randint(x.shape[1], (x.shape[0],), generator=g)
    return x[torch.arange(x.shape[0]), pick]


def fine_tune(
    model: MDIQA,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: RetrainConfig,
    *,
    x_unlabelled: torch.Tensor | None = None,
    y_pseudo: torch.Tensor | None = None,
) -> dict[str, list[float]]:
    """A few epochs of the supervised (+ pseudo-label) loss, in place. Returns the loss
    curves: each step's supervised loss (``sup``) and pseudo-label loss (``pseudo``).

    ``x`` and ``x_unlabelled`` are the worker's crops, (N, n, C, S, S); each step trains
    on one crop per slice drawn at random (training's policy, in the serving frame)."""
    import torch

    from qgate.models.losses_mdiqa import pseudo_label_loss, supervised_loss

    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    has_u = x_unlabelled is not None and y_pseudo is not None and len(x_unlabelled) > 0
    curves: dict[str, list[float]] = {"sup": []}
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            parts = supervised_loss(model(_one_crop(x[idx], g)), y[idx], model.cfg)
            loss = parts.total
            curves["sup"].append(float(parts.total.detach()))
            if has_u and cfg.pseudo_label_weight > 0:
                assert x_unlabelled is not None and y_pseudo is not None
                uidx = torch.randint(len(x_unlabelled), (len(idx),), generator=g)
                xu = _one_crop(x_unlabelled[uidx], g)
                pse = pseudo_label_loss(model(xu), y_pseudo[uidx], model.cfg)
                loss = loss + cfg.pseudo_label_weight * pse.total
                curves.setdefault("pseudo", []).append(float(pse.total.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return curves


def loss_curve(values: Sequence[float], points: int = 100) -> list[float]:
    """At most ``points`` values: the means of equal runs of steps (what a run stores)."""
    if len(values) <= points:
        return [round(v, 4) for v in values]
    edges = np.linspace(0, len(values), points + 1).round().astype(int)
    return [round(float(np.mean(values[a:b])), 4) for a, b in pairwise(edges)]


def _save_like(model: Any, source: Path, dest: Path, training: dict[str, Any]) -> Path:
    """Save ``model``'s state dict with ``source``'s metadata (so it loads the same way)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        dtypes = {k: fh.get_slice(k).get_dtype() for k in fh.keys()}  # noqa: SIM118
    import torch

    # Each tensor in its source dtype: a bf16 file's float32 buffers (Chest CT-IQA's refit
    # quality coefficients) stay float32 instead of losing the refit to bf16 rounding.
    half = {"BF16": torch.bfloat16, "F16": torch.float16}
    state = {
        k: (v.to(half[dtypes[k]]) if dtypes.get(k) in half and v.is_floating_point() else v)
        .detach()
        .cpu()
        .contiguous()
        for k, v in model.state_dict().items()
    }
    meta["qgate_training"] = json.dumps(training, default=str)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(dest)
    return dest


# ------------------------------------------------------------------- metrics


def compare_metrics(pred: np.ndarray, labels: np.ndarray, min_items: int) -> dict[str, Any]:
    """MAE always; PLCC/SROCC/KROCC and Overall when there are enough non-constant items."""
    from scipy import stats

    out: dict[str, Any] = {"n": len(labels), "mae": round(float(np.mean(np.abs(pred - labels))), 4)}
    if len(labels) >= min_items and np.ptp(labels) > 0 and np.ptp(pred) > 0:
        plcc = float(stats.pearsonr(pred, labels)[0])
        srocc = float(stats.spearmanr(pred, labels)[0])
        krocc = float(stats.kendalltau(pred, labels)[0])
        out.update(
            plcc=round(plcc, 4),
            srocc=round(srocc, 4),
            krocc=round(krocc, 4),
            overall=round(abs(plcc) + abs(srocc) + abs(krocc), 4),
        )
    return out


def decide(
    candidate: dict[str, Any], current: dict[str, Any], margin: float
) -> tuple[bool, str, str]:
    """(promote, metric, reason): Overall when both have it, else MAE."""
    if "overall" in candidate and "overall" in current:
        gain = candidate["overall"] - current["overall"]
        metric, a, b = "overall", candidate["overall"], current["overall"]
    else:
        gain = current["mae"] - candidate["mae"]
        metric, a, b = "mae", candidate["mae"], current["mae"]
    better = gain > margin
    verdict = "better" if better else "not better"
    return (
        better,
        metric,
        f"candidate {metric} {a:.4f} vs current {b:.4f} on {candidate['n']} held-out items: "
        f"{verdict} by more than the margin {margin:g} (gain {gain:+.4f})",
    )


# ----------------------------------------------------------------------- run


def _finish(
    sessions: sessionmaker[Session], run_id: int, outcome: RetrainOutcome, artifacts: Path | None
) -> None:
    with sessions() as s:
        run = s.get(TrainingRun, run_id)
        assert run is not None
        run.status, run.promoted, run.reason = outcome.status, outcome.promoted, outcome.reason
        run.candidate_version, run.current_version = (
            outcome.candidate_version,
            outcome.current_version,
        )
        run.metrics = _finite(
            {"candidate": outcome.candidate, "current": outcome.current, "data": outcome.data}
        )
        run.artifacts_dir = str(artifacts) if artifacts else None
        run.finished_at = utcnow()
        record(s, STAGE, outcome.status, detail=f"run {run_id}: {outcome.reason}")
        s.commit()


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_owner(settings: Settings) -> dict[str, Any]:
    """Who runs a run started here: recorded in the running row's ``metrics["owner"]``."""
    pid = os.getpid()
    return {
        "node": settings.node_name,
        "host": socket.gethostname(),
        "pid": pid,
        "start": _process_start(pid),
    }


def _owner_gone(run: TrainingRun, me: dict[str, Any]) -> str | None:
    """Why the process that started ``run`` is not running it any more; None if it may be."""
    owner = (run.metrics or {}).get("owner")
    if not isinstance(owner, dict) or not owner.get("pid"):
        return "its process is unknown"
    who = f"{owner.get('node')} (pid {owner['pid']} on {owner.get('host')})"
    if owner.get("host") != me["host"]:
        # Another machine: only this node's own runs are known dead (it restarted).
        return f"node {who} restarted" if owner.get("node") == me["node"] else None
    pid = int(owner["pid"])
    same_process = pid == me["pid"] and owner.get("start") == me["start"]
    if same_process:
        with _ACTIVE_LOCK:
            return None if run.id in _ACTIVE_RUNS else f"{who} stopped running it"
    # Another live process here (`qgate retrain --now` beside the service) keeps its run.
    alive = _pid_alive(pid) and owner.get("start") in (None, _process_start(pid))
    return None if alive else f"process {who} is gone"


def recover_interrupted_runs(
    settings: Settings,
    sessions: sessionmaker[Session],
    *,
    found: str,
    stale_after: dt.timedelta | None = dt.timedelta(days=1),
) -> list[int]:
    """Mark failed the runs left ``running`` by a process that died; returns their IDs.

    A run is interrupted when it records no owner, when its process (same host) is gone or
    is this process without the run in hand, when its node restarted (same node name on
    another host), or when it has been running longer than ``stale_after`` (a run of
    another node that never came back; should that run finish after all, its outcome
    replaces the mark). ``found`` says when, for the reason: "at scheduler start".
    """
    me = run_owner(settings)
    now = utcnow()
    marked: list[int] = []
    with sessions() as s:
        for run in s.scalars(select(TrainingRun).where(TrainingRun.status == "running")):
            why = _owner_gone(run, me)
            if why is None and stale_after is not None and run.started_at < now - stale_after:
                why = f"it has been running since {run.started_at:%Y-%m-%d %H:%M} UTC"
            if why is None:
                continue
            run.status, run.promoted, run.finished_at = "failed", False, now
            run.reason = f"interrupted: {why}; found {found}"
            record(s, STAGE, "interrupted", detail=f"run {run.id}: {run.reason}")
            marked.append(run.id)
        s.commit()
    for run_id in marked:
        log.warning("retraining run %s was interrupted; marked failed", run_id)
    return marked


class RetrainBusy(RuntimeError):
    """Another process (on this node or another sharing the database) is retraining."""


#: The cluster-wide lock (:func:`qgate.db.lock.cluster_lock`) one retraining run holds.
RETRAIN_LOCK = "retrain"


def run_retrain(
    settings: Settings, sessions: sessionmaker[Session], *, trigger: Trigger
) -> RetrainOutcome:
    """Run one retraining (see the module docstring), one per cluster at a time.

    Raises
    ------
    RetrainBusy
        Another process sharing the database holds the retraining lock; nothing was run.
        Any other failure is recorded in the run, not raised.
    """
    with cluster_lock(sessions.kw["bind"], RETRAIN_LOCK) as held:
        if not held:
            raise RetrainBusy("another qgate process is retraining; this run was skipped")
        return _run_locked(settings, sessions, trigger=trigger)


def _run_locked(
    settings: Settings, sessions: sessionmaker[Session], *, trigger: Trigger
) -> RetrainOutcome:
    try:
        recover_interrupted_runs(settings, sessions, found="when a new run started")
    except Exception as exc:  # the new run matters more than the old runs' bookkeeping
        log.warning("could not check for interrupted retraining runs: %s", exc)
    with sessions() as s:
        run = TrainingRun(trigger=trigger, status="running", metrics={"owner": run_owner(settings)})
        s.add(run)
        s.flush()
        run_id = run.id
        with _ACTIVE_LOCK:  # in hand before it is visible as running
            _ACTIVE_RUNS.add(run_id)
        record(s, STAGE, "started", detail=f"trigger {trigger}")
        s.commit()
    out_dir = settings.storage.root / "models" / f"run-{run_id}"
    try:
        outcome = _run(settings, sessions, run_id, out_dir)
    except NotEnoughData as exc:
        outcome = RetrainOutcome(run_id, "rejected", False, str(exc))
    except Exception as exc:
        log.warning("retraining run %s failed: %s", run_id, exc)
        log.debug("%s", traceback.format_exc())
        outcome = RetrainOutcome(run_id, "failed", False, f"{type(exc).__name__}: {exc}")
    try:
        _finish(sessions, run_id, outcome, out_dir if out_dir.exists() else None)
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE_RUNS.discard(run_id)
    log.info("retraining run %s: %s (%s)", run_id, outcome.status, outcome.reason)
    return outcome


def _run(
    settings: Settings, sessions: sessionmaker[Session], run_id: int, out_dir: Path
) -> RetrainOutcome:
    import torch

    from qgate.scoring.learned import load_model

    cfg = settings.retrain
    k = cfg.slices_per_series
    with sessions() as s:
        serving = serving_weights(settings, s)
        labels = reviewed_labels(s)
        patients = dict(
            s.execute(
                select(Series.series_instance_uid, Series.patient_id).where(
                    Series.series_instance_uid.in_(list(labels))
                )
            ).all()
        )
        paths = {uid: _paths(s, uid, settings.storage.root) for uid in labels}
        unlabelled_uids = _unreviewed(s, cfg, set(labels))
        unlabelled_paths = {
            uid: _paths(s, uid, settings.storage.root) for uid in unlabelled_uids
        }
    if len(labels) < cfg.min_reviewed:
        raise NotEnoughData(
            f"{len(labels)} reviewed series, need at least retrain.min_reviewed="
            f"{cfg.min_reviewed}: no candidate trained"
        )
    reviewed = [
        _SeriesData(uid, patients.get(uid) or uid, *_load(p, k, keep_full=True), labels[uid][0])
        for uid, p in sorted(paths.items())
        if p
    ]
    held = split_groups([r.group for r in reviewed], cfg.held_out_fraction, cfg.seed)
    train = [r for r in reviewed if r.group not in held]
    test = [r for r in reviewed if r.group in held]
    if not train or not test:
        raise NotEnoughData(
            f"the reviewed series come from {len({r.group for r in reviewed})} patient(s): "
            "need at least 2 to hold one out"
        )

    current_w = serving["mdiqa"]
    current: MDIQA = load_model("mdiqa", current_w.path)  # type: ignore[assignment]
    x_train = torch.cat([_inputs(current, r.hu) for r in train])
    y_train = torch.cat([torch.full((len(r.hu),), r.score) for r in train])
    test_x = [_inputs(current, r.hu) for r in test]
    test_y = [r.score for r in test]
    data: dict[str, Any] = {
        "verdicts_max_id": max(v for _, v in labels.values()),
        "reviewed_series": len(reviewed),
        "train_series": len(train),
        "held_out_series": sorted(r.uid for r in test),
        "train_slices": len(x_train),
    }
    if cfg.simulated_dir is not None:
        from qgate.models.mdiqa import resolve_data_config
        from training.fit.data import load_mdiqa_split

        dc = resolve_data_config(current)
        sim_train = load_mdiqa_split(cfg.simulated_dir, "train", dc)
        sim_test = load_mdiqa_split(cfg.simulated_dir, "test", dc)
        # The serving crops of each slice, as for the reviewed series (_inputs).
        assert sim_train.crops is not None and sim_test.crops is not None
        ok = torch.isfinite(sim_train.y)
        x_train = torch.cat([x_train, sim_train.crops[ok]])
        y_train = torch.cat([y_train, sim_train.y[ok]])
        ok_t = torch.isfinite(sim_test.y)
        test_x += [x[None] for x in sim_test.crops[ok_t]]
        test_y += [float(v) for v in sim_test.y[ok_t]]
        data["simulated"] = {
            "dir": str(cfg.simulated_dir),
            "train": int(ok.sum()),
            "test": int(ok_t.sum()),
        }

    x_u = None
    y_u = None
    if unlabelled_paths:
        xs = [
            _inputs(current, _load(p, k, keep_full=False)[0])
            for p in unlabelled_paths.values()
            if p
        ]
        if xs:
            x_u = torch.cat(xs)
            y_u = _pseudo_labels(current, x_u)
    data["unlabelled_series"] = len(unlabelled_paths)
    data["unlabelled_slices"] = 0 if x_u is None else len(x_u)

    labels_eval = np.asarray(test_y, dtype=np.float64)

    def evaluate(model: MDIQA) -> dict[str, Any]:
        pred = np.asarray([float(np.mean(_predict(model, x))) for x in test_x])
        return compare_metrics(pred, labels_eval, cfg.min_correlation_items)

    current_metrics = evaluate(current)
    candidate = load_model("mdiqa", current_w.path)
    curves = fine_tune(candidate, x_train, y_train, cfg, x_unlabelled=x_u, y_pseudo=y_u)  # type: ignore[arg-type]
    candidate_metrics = evaluate(candidate)  # type: ignore[arg-type]
    candidate_metrics["train_losses"] = {k_: round(v[-1], 4) for k_, v in curves.items() if v}
    candidate_metrics["loss_curve"] = {
        "steps": len(curves["sup"]),
        **{k_: loss_curve(v) for k_, v in curves.items()},
    }
    promote, metric, reason = decide(candidate_metrics, current_metrics, cfg.margin)

    chest = None
    if cfg.refit_chestiqa and serving["chestiqa"].path.is_file():
        chest = _refit_chest(serving["chestiqa"], train, test)
        if chest is not None:
            candidate_metrics["chestiqa"], current_metrics["chestiqa"] = chest[1], chest[2]

    with sessions() as s:
        parent = _registered(s, current_w)
        chest_parent = _registered(s, serving["chestiqa"]) if chest is not None else None
        s.commit()
    training_info = {"run": run_id, "parent": parent, **data}
    weights = _save_like(candidate, current_w.path, out_dir / "mdiqa.safetensors", training_info)
    with sessions() as s:
        row = register_version(
            s,
            model="mdiqa",
            path=weights,
            parent=parent,
            data_snapshot=data,
            metrics=_finite(
                {"candidate": candidate_metrics, "current": current_metrics, "metric": metric}
            ),
        )
        chest_row = None
        if chest is not None:
            chest_path = _save_like(
                chest[0], serving["chestiqa"].path, out_dir / "chestiqa.safetensors", training_info
            )
            chest_row = register_version(
                s,
                model="chestiqa",
                path=chest_path,
                parent=chest_parent,
                data_snapshot=data,
                metrics=_finite({"candidate": chest[1], "current": chest[2], "metric": "mae"}),
            )
        s.commit()
        version = row.version
        if promote:
            activate(s, version)
            if chest_row is not None and chest[1]["mae"] <= chest[2]["mae"]:
                activate(s, chest_row.version)
                reason += f"; {CHEST_PROMOTED}"
            elif chest_row is not None:
                reason += "; Chest CT-IQA refit kept inactive (held-out MAE worse)"
    return RetrainOutcome(
        run_id=run_id,
        status="promoted" if promote else "rejected",
        promoted=promote,
        reason=reason,
        candidate=candidate_metrics,
        current=current_metrics,
        candidate_version=version,
        current_version=parent,
        data=data,
    )


def _registered(session: Session, weights: ActiveWeights) -> str:
    """The registry version of the serving weights; shipped or configured files are
    registered first (inactive), so that ``qgate models activate`` can roll back to them."""
    if not weights.version.endswith(("-shipped", "-configured")):
        return weights.version
    digest = sha256_file(weights.path)
    row = session.scalar(
        select(ModelVersion).where(
            ModelVersion.model == weights.model,
            ModelVersion.sha256 == digest,
            ModelVersion.path == str(weights.path.resolve()),
        )
    )
    if row is None:
        row = register_version(
            session,
            model=weights.model,
            path=weights.path,
            parent=None,
            data_snapshot={"source": weights.version},
            metrics={},
        )
        session.flush()
    return row.version


def _refit_chest(
    weights: ActiveWeights, train: list[_SeriesData], test: list[_SeriesData]
) -> tuple[ChestIQANet, dict[str, Any], dict[str, Any]] | None:
    """Refit the quality module on the training series (scores 0-4 -> 1-10); held-out MAE."""
    from qgate.models import predict_chestiqa
    from qgate.scoring.learned import load_model

    if len(train) < 2:
        return None
    model: ChestIQANet = load_model("chestiqa", weights.path)  # type: ignore[assignment]

    def feats(rows: list[_SeriesData]) -> np.ndarray:
        return np.asarray(
            [predict_chestiqa(model, r.full_hu, amp=False).features for r in rows]  # type: ignore[arg-type]
        )

    def to10(rows: list[_SeriesData]) -> np.ndarray:
        return np.asarray([1.0 + 9.0 * r.score / 4.0 for r in rows])

    import torch

    f_test, y_test = feats(test), to10(test)
    with torch.no_grad():
        before = model.quality(torch.from_numpy(f_test).float()).numpy()
    fit = model.quality.refit(feats(train), to10(train), ridge=1.0)
    with torch.no_grad():
        after = model.quality(torch.from_numpy(f_test).float()).numpy()
    cand = {
        "n": len(y_test),
        "mae": round(float(np.mean(np.abs(after - y_test))), 4),
        "coef": [round(c, 5) for c in fit.coef],
        "intercept": round(fit.intercept, 5),
    }
    cur = {"n": len(y_test), "mae": round(float(np.mean(np.abs(before - y_test))), 4)}
    return model, cand, cur
