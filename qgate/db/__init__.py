"""SQL store: schema, engine, migrations."""

from qgate.db.migrate import upgrade
from qgate.db.models import Base, Event, Instance, Job, OutboxItem, Result, Series
from qgate.db.session import make_engine, make_session_factory

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
