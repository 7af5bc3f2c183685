"""SQL store: schema, engine, migrations."""

from qgate.core.db.migrate import upgrade
from qgate.core.db.models import Base, Event, Instance, Job, OutboxItem, Result, Series
from qgate.core.db.session import make_engine, make_session_factory

__all__ = [
    "Base",
    "Event",
    "Instance",
    "Job",
    "OutboxItem",
    "Result",
    "Series",
    "make_engine",
    "make_session_factory",
    "upgrade",
]
