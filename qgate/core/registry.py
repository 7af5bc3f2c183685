"""Model registry: versions of each model's weights, with one active per model kind.

The shipped weights (``qgate/weights/*.safetensors``) are the implicit version
``<model>-shipped`` until a trained version is activated. Activating is a single
transaction (one active row per model), and the worker notices the change between jobs
and reloads its scorers, so promotion and rollback never drop a job.

``model_versions.path`` is stored as the other paths of the store are
(:mod:`qgate.core.storage`): relative to ``storage.root`` when the file is under it (a
retraining run's ``models/run-<id>/mdiqa.safetensors``), so that every node resolves it
on its own mount of the shared storage; ``shipped:<file>`` for the shipped weights, which
every node has in its own installation; else absolute (a configured file elsewhere).
Every function that reads or writes a path takes the node's ``root``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from qgate.core.config import Settings
from qgate.core.db.models import ModelVersion, utcnow
from qgate.core.events import record
from qgate.core.families import FAMILIES, FAMILY_NAMES, SHIPPED_WEIGHTS_DIR, family, is_family
from qgate.core.storage import to_local, to_stored

#: How ``model_versions.path`` names a file of the shipped weights folder.
SHIPPED_PREFIX = "shipped:"


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


def stored_weights_path(path: Path, root: Path) -> str:
    """``path`` as ``model_versions.path`` keeps it (see the module docstring)."""
    absolute = Path(os.path.abspath(path))
    if absolute.parent == SHIPPED_WEIGHTS_DIR:
        return SHIPPED_PREFIX + absolute.name
    return to_stored(absolute, root)


def local_weights_path(stored: str, root: Path) -> Path:
    """The file a stored ``model_versions.path`` names on this node."""
    if stored.startswith(SHIPPED_PREFIX):
        return SHIPPED_WEIGHTS_DIR / stored.removeprefix(SHIPPED_PREFIX)
    return to_local(stored, root)


def register_version(
    session: Session,
    *,
    model: str,
    path: Path,
    root: Path,
    parent: str | None,
    data_snapshot: dict[str, Any],
    metrics: dict[str, Any],
    now: dt.datetime | None = None,
) -> ModelVersion:
    """Record a new (inactive) version of ``model`` stored at ``path``, kept relative to
    ``root`` (``storage.root``) when under it. Does not commit."""
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
        path=stored_weights_path(path, root),
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


def activate(session: Session, version: str, *, root: Path) -> ModelVersion:
    """Make ``version`` the active one of its model (checksum verified). Commits."""
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == version))
    if row is None:
        raise RegistryError(f"no such model version: {version}")
    path = local_weights_path(row.path, root)
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


def active_weights(session: Session, *, root: Path) -> dict[str, ActiveWeights]:
    """The weights each model kind should serve now: the active version, else shipped."""
    out = {f.name: ActiveWeights(f.name, f.shipped_version, f.shipped_weights) for f in FAMILIES}
    for row in session.scalars(select(ModelVersion).where(ModelVersion.active.is_(True))):
        out[row.model] = ActiveWeights(row.model, row.version, local_weights_path(row.path, root))
    return out


def serving_weights(settings: Settings, session: Session) -> dict[str, ActiveWeights]:
    """What each model serves: the registry's active version, else the configured file
    (``scoring.<model>.weights``, version ``<model>-configured``), else the shipped one."""
    out = active_weights(session, root=settings.storage.root)
    for model, a in out.items():
        configured = settings.scoring.learned(model).weights
        if a.version == family(model).shipped_version and configured is not None:
            out[model] = ActiveWeights(model, f"{model}-configured", Path(configured))
    return out


def is_registered(weights: ActiveWeights) -> bool:
    """Whether ``weights`` is a registry version (not the shipped or configured file)."""
    return not weights.version.endswith(("-shipped", "-configured"))


def register_serving(session: Session, weights: ActiveWeights, *, root: Path) -> str:
    """The registry version of serving ``weights``; shipped or configured files are
    registered first (inactive), so that ``qgate models activate`` can roll back to them.
    Does not commit."""
    if is_registered(weights):
        return weights.version
    digest = sha256_file(weights.path)
    row = session.scalar(
        select(ModelVersion).where(
            ModelVersion.model == weights.model,
            ModelVersion.sha256 == digest,
            ModelVersion.path == stored_weights_path(weights.path, root),
        )
    )
    if row is None:
        row = register_version(
            session,
            model=weights.model,
            path=weights.path,
            root=root,
            parent=None,
            data_snapshot={"source": weights.version},
            metrics={},
        )
        session.flush()
    return row.version
