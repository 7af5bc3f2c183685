"""What every stage process shares: its view of the SQL store and its run loop.

A stage (``qgate receive``, ``qgate worker``, ``qgate dispatch``, ``qgate web``) is an
object with ``start()`` and ``stop()``; :func:`run_stage` starts it, waits for the stop
request (SIGTERM or SIGINT, wired by the command line) and stops it, letting the item in
hand finish. ``qgate serve`` (:mod:`qgate.core.service`) runs each stage as such a process.
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import Literal, Protocol

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from qgate.core.config import Settings
from qgate.core.db import make_engine, make_session_factory
from qgate.core.db.migrate import schema_problem

log = logging.getLogger(__name__)

#: The stages ``qgate serve`` supervises, in start order.
StageName = Literal["receive", "worker", "dispatch", "web"]
STAGE_NAMES: tuple[StageName, ...] = ("receive", "worker", "dispatch", "web")


class SchemaNotReady(RuntimeError):
    """The database is not migrated to this qgate's schema (``qgate db upgrade``)."""


class Stage(Protocol):
    name: StageName

    def start(self) -> None: ...

    def stop(self) -> None: ...


def open_store(settings: Settings) -> tuple[Engine, sessionmaker[Session]]:
    """The engine and session factory of a stage; its events name ``settings.node_name``.

    Raises
    ------
    SchemaNotReady
        The database is not at this qgate's migration head. Stages never migrate (several
        processes and nodes would race); ``qgate serve`` and ``qgate db upgrade`` do.
    """
    engine = make_engine(settings.database.url, echo=settings.database.echo)
    problem = schema_problem(engine)
    if problem is not None:
        engine.dispose()
        raise SchemaNotReady(problem)
    return engine, make_session_factory(engine, node=settings.node_name)


def describe(stage: Stage) -> str:
    """How the logs name a stage process: its optional ``label`` (a receiver process of
    the receive stage says which), else "stage <name>"."""
    label = getattr(stage, "label", None)
    return label if isinstance(label, str) else f"stage {stage.name}"


def run_stage(stage: Stage, stop: threading.Event) -> None:
    """Start ``stage``, wait until ``stop`` is set, then stop it."""
    what = describe(stage)
    stage.start()
    # Everything loaded so far lives as long as the process. Freezing it keeps the
    # cyclic GC's full collections from rescanning it (~200k objects with torch,
    # SQLAlchemy and pydicom loaded: ~50 ms per full collection on the dev VM, a pause a
    # sender would wait through).
    gc.freeze()
    log.info("%s running", what)
    stop.wait()
    log.info("%s stopping", what)
    stage.stop()
    log.info("%s stopped", what)
