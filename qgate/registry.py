"""Model registry: versions of each model's weights, with one active per model kind.

The shipped weights (``qgate/weights/*.safetensors``) are the implicit version
``<model>-shipped`` until a trained version is activated. Activating is a single
transaction (one active row per model), and the worker notices the change between jobs
and reloads its scorers, so promotion and rollback never drop a job.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from qgate.core.families import FAMILIES, FAMILY_NAMES, family, is_family
from qgate.db.models import ModelVersion, utcnow
from qgate.events import record


class RegistryError(Exception):
    """Unknown version, or a weights file that is missing or does not match its checksum."""


@dataclass(frozen=True)
class ActiveWeights:
    model: str
    version: str
    path: Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shipped_path(model: str) -> Path:
    return family(model).shipped_weights


def register_version(
    session: Session,
    *,
    model: str,
    path: Path,
    parent: str | None,
    data_snapshot: dict[str, Any],
    metrics: dict[str, Any],
    now: dt.datetime | None = None,
) -> ModelVersion:
    """Record a new (inactive) version of ``model`` stored at ``path``. Does not commit."""
    if not is_family(model):
        raise RegistryError(f"unknown model kind {model!r}; expected one of {FAMILY_NAMES}")
    if not path.is_file():
        raise RegistryError(f"weights file not found: {path}")
    now = now or utcnow()
    digest = sha256_file(path)
    version = f"{model}-{now:%Y%m%d%H%M%S}-{digest[:8]}"
    row = ModelVersion(
        model=model,
        version=version,
        parent=parent,
        path=str(path.resolve()),
        sha256=digest,
        data_snapshot=data_snapshot,
        metrics=metrics,
        active=False,
        created_at=now,
    )
    session.add(row)
    record(session, "registry", "registered", detail=f"{version} (parent {parent or '-'})")
    return row


def list_versions(session: Session, model: str | None = None) -> list[ModelVersion]:
    q = select(ModelVersion).order_by(ModelVersion.model, ModelVersion.id)
    if model:
        q = q.where(ModelVersion.model == model)
    return list(session.scalars(q))


def activate(session: Session, version: str) -> ModelVersion:
    """Make ``version`` the active one of its model (checksum verified). Commits."""
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == version))
    if row is None:
        raise RegistryError(f"no such model version: {version}")
    path = Path(row.path)
    if not path.is_file() or sha256_file(path) != row.sha256:
        raise RegistryError(f"weights of {version} are missing or do not match their checksum")
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.model == row.model, ModelVersion.id != row.id)
        .values(active=False)
    )
    row.active, row.activated_at = True, utcnow()
    record(session, "registry", "activated", detail=version)
    session.commit()
    return row


def active_weights(session: Session) -> dict[str, ActiveWeights]:
    """The weights each model kind should serve now: the active version, else shipped."""
    out = {f.name: ActiveWeights(f.name, f.shipped_version, f.shipped_weights) for f in FAMILIES}
    for row in session.scalars(select(ModelVersion).where(ModelVersion.active.is_(True))):
        out[row.model] = ActiveWeights(row.model, row.version, Path(row.path))
    return out
