"""What a retraining run learns from, exported to the label file of its training process.

Labelled: every reviewed series, labelled with its newest verdict's score (0-4, MD-IQA's
scale), with its readable spool files. A deterministic hold-out by patient (SHA-256 of the
patient ID, the series UID when there is none; ``retrain.held_out_fraction`` of the
patients, at least one, never all) is kept for the comparison. Unlabelled: series scored
in the last ``retrain.recent_unreviewed_days`` with no verdict.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from qgate.core.config import RetrainConfig, Settings
from qgate.core.db.models import Instance, Result, Series, Verdict, utcnow
from qgate.core.families import retrained
from qgate.core.registry import ActiveWeights, register_serving, serving_weights
from qgate.core.storage import to_local
from qgate.retrain.contract import (
    LabelledSeries,
    ServingWeights,
    TrainParams,
    TrainRequest,
    UnlabelledSeries,
)


class NotEnoughData(Exception):
    """Too few reviewed series for a fair comparison; the run is rejected, not failed."""


def _hold_out_key(group: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()


def split_groups(groups: Sequence[str], fraction: float, seed: int) -> set[str]:
    """The held-out groups: the first ``ceil(fraction * n)`` by hash, at least 1, never all."""
    uniq = sorted(set(groups), key=lambda g: _hold_out_key(g, seed))
    if len(uniq) < 2:
        return set()
    k = min(max(1, math.ceil(fraction * len(uniq))), len(uniq) - 1)
    return set(uniq[:k])


def series_paths(session: Session, uid: str, root: Path) -> list[Path]:
    """The series' readable spool files (stored relative to ``root``, storage.root); none
    once retention purged its originals (the callers skip a series without files)."""
    purged = session.scalar(
        select(Series.originals_purged_at).where(Series.series_instance_uid == uid)
    )
    if purged is not None:
        return []
    return [
        to_local(p, root)
        for p in session.scalars(
            select(Instance.path)
            .where(Instance.series_instance_uid == uid, Instance.skip_reason.is_(None))
            .order_by(Instance.instance_number, Instance.id)
        )
    ]


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


def _serving(session: Session, weights: ActiveWeights, root: Path) -> ServingWeights:
    return ServingWeights(version=register_serving(session, weights, root=root), path=weights.path)


def export_request(
    settings: Settings, session: Session, run_id: int
) -> tuple[TrainRequest, dict[str, Any]]:
    """The label file of run ``run_id``, and what it holds (the run's ``data`` record).

    The serving weights are registered (inactive) when they are the shipped or configured
    files, so that a promotion can be rolled back to them. Does not commit.

    Raises
    ------
    NotEnoughData
        Fewer than ``retrain.min_reviewed`` reviewed series, or their readable series come
        from fewer than two patients (one must be held out).
    """
    cfg, root = settings.retrain, settings.storage.root
    labels = reviewed_labels(session)
    if len(labels) < cfg.min_reviewed:
        raise NotEnoughData(
            f"{len(labels)} reviewed series, need at least retrain.min_reviewed="
            f"{cfg.min_reviewed}: no candidate trained"
        )
    patients = dict(
        session.execute(
            select(Series.series_instance_uid, Series.patient_id).where(
                Series.series_instance_uid.in_(list(labels))
            )
        ).all()
    )
    reviewed = {
        uid: (patients.get(uid) or uid, paths)
        for uid in sorted(labels)
        if (paths := series_paths(session, uid, root))
    }
    held = split_groups([g for g, _ in reviewed.values()], cfg.held_out_fraction, cfg.seed)
    rows = {
        uid: LabelledSeries(uid=uid, score=labels[uid][0], paths=paths)
        for uid, (_, paths) in reviewed.items()
    }
    train = [rows[uid] for uid, (g, _) in reviewed.items() if g not in held]
    held_out = [rows[uid] for uid, (g, _) in reviewed.items() if g in held]
    if not train or not held_out:
        raise NotEnoughData(
            f"the reviewed series come from {len({g for g, _ in reviewed.values()})} "
            "patient(s): need at least 2 to hold one out"
        )
    unlabelled = [
        UnlabelledSeries(uid=uid, paths=paths)
        for uid in _unreviewed(session, cfg, set(labels))
        if (paths := series_paths(session, uid, root))
    ]
    serving = serving_weights(settings, session)
    tuned, refit = retrained("fine_tune"), retrained("refit_quality")
    refit_weights = serving[refit.name]
    request = TrainRequest(
        run_id=run_id,
        params=TrainParams(
            seed=cfg.seed,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            pseudo_label_weight=cfg.pseudo_label_weight,
            slices_per_series=cfg.slices_per_series,
            min_correlation_items=cfg.min_correlation_items,
        ),
        mdiqa=_serving(session, serving[tuned.name], root),
        chestiqa=(
            _serving(session, refit_weights, root)
            if cfg.refit_chestiqa and refit_weights.path.is_file()
            else None
        ),
        train=train,
        held_out=held_out,
        unlabelled=unlabelled,
        simulated_dir=cfg.simulated_dir,
    )
    data: dict[str, Any] = {
        "verdicts_max_id": max(v for _, v in labels.values()),
        "reviewed_series": len(reviewed),
        "train_series": len(train),
        "held_out_series": sorted(r.uid for r in held_out),
        "unlabelled_series": len(unlabelled),
    }
    return request, data
