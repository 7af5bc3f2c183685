"""One retraining per cluster: the cluster-wide lock, across engines (processes, nodes)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from qgate.core.config import Settings
from qgate.core.db import make_engine, make_session_factory
from qgate.core.db.lock import cluster_lock
from qgate.core.db.models import TrainingRun
from qgate.retrain import RETRAIN_LOCK, RetrainBusy, run_retrain


def test_cluster_lock_is_held_by_one_engine_at_a_time(settings: Settings) -> None:
    url = settings.database.url
    one, other = make_engine(url), make_engine(url)  # as two nodes would have
    try:
        with cluster_lock(one, "retrain") as held:
            assert held
            with cluster_lock(other, "retrain") as second:
                assert not second
            with cluster_lock(other, "purge") as unrelated:
                assert unrelated
        with cluster_lock(other, "retrain") as after:
            assert after  # released with the block
    finally:
        one.dispose()
        other.dispose()


def test_retraining_is_skipped_while_another_node_retrains(settings: Settings) -> None:
    url = settings.database.url
    node, elsewhere = make_engine(url), make_engine(url)
    try:
        with cluster_lock(elsewhere, RETRAIN_LOCK) as held:
            assert held
            sessions = make_session_factory(node, node=settings.node_name)
            with pytest.raises(RetrainBusy, match="another qgate process is retraining"):
                run_retrain(settings, sessions, trigger="cli")
            with sessions() as s:
                assert s.scalar(select(func.count(TrainingRun.id))) == 0  # nothing started
    finally:
        node.dispose()
        elsewhere.dispose()
