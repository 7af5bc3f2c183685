"""SQL schema. Every stage keeps its state here; Alembic owns the DDL (``migrations/``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

UID = String(64)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC in Python on every backend (SQLite would hand back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    pass


class Series(Base):
    """One CT series as qgate sees it. ``status``: receiving|queued|scoring|scored|failed."""

    __tablename__ = "series"

    series_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(200))
    study_date: Mapped[str | None] = mapped_column(String(8))
    series_description: Mapped[str | None] = mapped_column(String(200))
    modality: Mapped[str | None] = mapped_column(String(16))
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Associations that sent to this series and are still open; 0 lets the release grace apply.
    open_associations: Mapped[int] = mapped_column(Integer, default=0)
    released_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # Bumped by every instance that arrives after scoring: the next result supersedes.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    decision: Mapped[str | None] = mapped_column(String(8))
    held: Mapped[bool] = mapped_column(Boolean, default=False)
    # The generation whose originals were queued for the archive (forward mode, a release,
    # or gate.on_failure: forward); a re-score of that generation neither sends nor holds
    # them again.
    forwarded_generation: Mapped[int | None] = mapped_column(Integer)
    skip_reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    # When retention deleted the spool originals (qgate.housekeeping.retention); the instance
    # rows stay as the record of what was received. Set: nothing left to forward or rescore.
    originals_purged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("series.series_instance_uid"), index=True
    )
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    skip_reason: Mapped[str | None] = mapped_column(Text)


class Job(Base):
    """Durable work queue. ``state``: queued|running|done|parked."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16), default="score")
    series_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    __table_args__ = (Index("ix_jobs_state_created", "state", "created_at"),)


class Result(Base):
    """One scoring of one series generation. Only the newest per series is current."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    generation: Mapped[int] = mapped_column(Integer)
    decision: Mapped[str] = mapped_column(String(8))
    reasons: Mapped[list[Any]] = mapped_column(JSON)
    scores: Mapped[dict[str, Any]] = mapped_column(JSON)
    scorer_versions: Mapped[dict[str, Any]] = mapped_column(JSON)
    slices_scored: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    sr_path: Mapped[str | None] = mapped_column(Text)
    # Scorers and report objects left out, as qgate.core.degrade.SkippedPart.to_json() dicts.
    skipped_parts: Mapped[list[Any]] = mapped_column(JSON, default=list)
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("results.id"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class OutboxItem(Base):
    """One send of a set of files to one destination over one association.

    ``state``: pending|sending|sent|dead. ``kind``: results|forward.
    """

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    kind: Mapped[str] = mapped_column(String(16))
    dest_ae_title: Mapped[str] = mapped_column(String(16))
    dest_host: Mapped[str] = mapped_column(String(255))
    dest_port: Mapped[int] = mapped_column(Integer)
    paths: Mapped[list[Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # When retention deleted this send's files under outgoing/ (results items only).
    purged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_outbox_state_next", "state", "next_attempt_at"),)


class Event(Base):
    """Append-only bookkeeping trail: one row per state change, written in its transaction."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    stage: Mapped[str] = mapped_column(String(16))
    event: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)
    # The node_name of the process that wrote it (None: a row from before migration 0006).
    node: Mapped[str | None] = mapped_column(String(128))


# -- review web app (qgate/web) ---------------------------------------------------------------
#
# Verdicts are the labels of the nightly retraining. They are append-only (a second verdict on
# a series is a new row; the newest counts), so a training run can name its data snapshot as
# "verdicts with id <= N" and a future model-registry table can point at that high-water mark.


class User(Base):
    """A person who logs in to the review app. ``role``: radiologist|admin."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    # argon2id PHC string, e.g. "$argon2id$v=19$m=65536,t=3,p=4$..."
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class Verdict(Base):
    """A radiologist's review of one scored result: agrees with its decision or not, 0-4."""

    __tablename__ = "verdicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("series.series_instance_uid"), index=True
    )
    # The result that was on screen, and its decision at the time (the flag being judged).
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    decision: Mapped[str] = mapped_column(String(8))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    agrees: Mapped[bool] = mapped_column(Boolean)
    # Image quality on the LDCTIQAC2023 scale: 0 non-diagnostic ... 4 excellent.
    score: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)

    __table_args__ = (CheckConstraint("score >= 0 AND score <= 4", name="ck_verdicts_score"),)


class AuditEntry(Base):
    """Who did what, when, in the review app; written in the transaction of the action."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    # Kept as text too, so the trail still reads after a user is renamed or removed.
    username: Mapped[str] = mapped_column(String(64))
    # login|login_failed|logout|verdict|release|rescore|resubmit|user_add
    action: Mapped[str] = mapped_column(String(32), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    remote_addr: Mapped[str | None] = mapped_column(String(64))


# -- model registry and retraining (qgate/core/registry.py, qgate/retrain/) -----------------------


class ModelVersion(Base):
    """One set of weights for one model kind (mdiqa|n2q|chestiqa); at most one is active."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(32), index=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    parent: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    # What it was trained on, e.g. {"verdicts_max_id": 41, "simulated": "..."}.
    data_snapshot: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    activated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class TrainingRun(Base):
    """One retraining run: its candidate, the comparison and the outcome."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # running|promoted|rejected|failed
    status: Mapped[str] = mapped_column(String(16), default="running")
    trigger: Mapped[str] = mapped_column(String(16))  # schedule|cli|web
    candidate_version: Mapped[str | None] = mapped_column(String(64))
    current_version: Mapped[str | None] = mapped_column(String(64))
    promoted: Mapped[bool] = mapped_column(Boolean, default=False)
    # The families whose candidate the run activated, e.g. ["mdiqa", "chestiqa"] (empty
    # unless promoted); pages read this, not the reason.
    promoted_models: Mapped[list[str]] = mapped_column(JSON, default=list)
    reason: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    artifacts_dir: Mapped[str | None] = mapped_column(Text)
