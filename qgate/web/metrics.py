"""``/metrics``: Prometheus exposition, computed from SQL at scrape time.

Every node reads the same database, so any node's ``/metrics`` tells the state of the
whole installation; counters are counts of rows that are never deleted (instances,
results, outbox failure events), so they only go up.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings
from qgate.core.db.models import Event, Instance, Job, OutboxItem, Result, Series, Verdict
from qgate.core.diskspace import disk_space

#: Upper bounds (seconds) of the scoring-latency histogram buckets.
LATENCY_BUCKETS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class SqlCollector(Collector):
    """Collects qgate's metrics from the database on every scrape."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def describe(self) -> Iterable[Metric]:
        return []  # no collect() at registration time: that would query the database

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as s:
            yield CounterMetricFamily(
                "qgate_received_instances",
                "DICOM instances received and stored.",
                value=s.scalar(select(func.count(Instance.id))) or 0,
            )

            by_status = GaugeMetricFamily(
                "qgate_series", "Series by pipeline status.", labels=["status"]
            )
            for status, n in s.execute(select(Series.status, func.count()).group_by(Series.status)):
                by_status.add_metric([status], n)
            yield by_status

            by_decision = GaugeMetricFamily(
                "qgate_series_by_decision",
                "Series by the decision of their current result (none: not scored).",
                labels=["decision"],
            )
            counts = {"pass": 0, "flag": 0, "none": 0}
            q = select(Series.decision, func.count()).group_by(Series.decision)
            for decision, n in s.execute(q):
                counts[decision or "none"] = counts.get(decision or "none", 0) + n
            for decision, n in counts.items():
                by_decision.add_metric([decision], n)
            yield by_decision

            yield GaugeMetricFamily(
                "qgate_series_held",
                "Series held back in gate mode, waiting for a release.",
                value=s.scalar(select(func.count()).where(Series.held.is_(True))) or 0,
            )

            jobs = {"queued": 0, "running": 0, "done": 0, "parked": 0}
            for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state)):
                jobs[state] = n
            yield GaugeMetricFamily(
                "qgate_queue_depth", "Scoring jobs waiting to run.", value=jobs["queued"]
            )
            job_states = GaugeMetricFamily("qgate_jobs", "Scoring jobs by state.", labels=["state"])
            for state, n in jobs.items():
                job_states.add_metric([state], n)
            yield job_states

            yield self._latency(s)

            outbox = {"pending": 0, "sending": 0, "sent": 0, "dead": 0}
            q = select(OutboxItem.state, func.count()).group_by(OutboxItem.state)
            for state, n in s.execute(q):
                outbox[state] = n
            items = GaugeMetricFamily(
                "qgate_outbox_items", "Outgoing sends by state.", labels=["state"]
            )
            for state, n in outbox.items():
                items.add_metric([state], n)
            yield items
            yield GaugeMetricFamily(
                "qgate_outbox_dead_letters",
                "Sends that gave up after their last attempt (`qgate outbox retry`).",
                value=outbox["dead"],
            )
            failures = s.scalar(
                select(func.count(Event.id)).where(
                    Event.stage == "dispatch", Event.event.in_(("retry_scheduled", "dead"))
                )
            )
            yield CounterMetricFamily(
                "qgate_outbox_failures",
                "Failed send attempts (each retry scheduled, and each dead letter).",
                value=failures or 0,
            )
            yield CounterMetricFamily(
                "qgate_verdicts",
                "Radiologist verdicts recorded.",
                value=s.scalar(select(func.count(Verdict.id))) or 0,
            )

    @staticmethod
    def _latency(s: Session) -> HistogramMetricFamily:
        cols = [func.sum(case((Result.seconds <= b, 1), else_=0)) for b in LATENCY_BUCKETS]
        row = s.execute(select(func.count(Result.id), func.sum(Result.seconds), *cols)).one()
        count, total = int(row[0] or 0), float(row[1] or 0.0)
        buckets = [(f"{b:g}", int(v or 0)) for b, v in zip(LATENCY_BUCKETS, row[2:], strict=True)]
        buckets.append(("+Inf", count))
        return HistogramMetricFamily(
            "qgate_scoring_seconds",
            "Time to load and score one series (every result, superseded ones included).",
            buckets=buckets,
            sum_value=total,
        )


class DiskCollector(Collector):
    """Free space under ``storage.root`` and whether the receive stage refuses for it
    (:mod:`qgate.core.diskspace`); measured on this node at scrape time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        space = disk_space(self.settings)
        yield GaugeMetricFamily(
            "qgate_storage_free_bytes",
            "Free bytes on the file system of storage.root.",
            value=space.free_bytes,
        )
        yield GaugeMetricFamily(
            "qgate_storage_min_free_bytes",
            "storage.min_free_mb in bytes: below it new associations are refused.",
            value=space.min_free_bytes,
        )
        refusing = GaugeMetricFamily(
            "qgate_receive_refusing_associations",
            "1 while new DICOM associations are refused, labelled with the reason.",
            labels=["reason"],
        )
        refusing.add_metric(["disk_low"], 1 if space.low else 0)
        yield refusing


def make_registry(sessions: sessionmaker[Session], settings: Settings) -> CollectorRegistry:
    """A registry of its own (not the process-global one) holding :class:`SqlCollector`
    and :class:`DiskCollector`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SqlCollector(sessions))
    registry.register(DiskCollector(settings))
    return registry
