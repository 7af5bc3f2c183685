"""Dispatch stage: the SQL outbox, the C-STORE SCU and the dispatcher thread."""

from qgate.dispatch.dispatcher import Dispatcher, run_once
from qgate.dispatch.outbox import (
    RetryPolicy,
    claim_due,
    enqueue,
    list_items,
    mark_failed,
    mark_sent,
    retry,
)
from qgate.dispatch.scu import Destination, FileOutcome, SendResult, send_files

__all__ = [
    "Destination",
    "Dispatcher",
    "FileOutcome",
    "RetryPolicy",
    "SendResult",
    "claim_due",
    "enqueue",
    "list_items",
    "mark_failed",
    "mark_sent",
    "retry",
    "run_once",
    "send_files",
]
