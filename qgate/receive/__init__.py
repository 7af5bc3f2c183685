"""Receive stage: the C-STORE SCP that spools CT instances and records them in SQL.

:mod:`qgate.receive.scp` wires the application entity (accepted SOP classes, transfer
syntaxes, calling-AE whitelist); :mod:`qgate.receive.handlers` holds the event handlers and
their contracts.
"""

from qgate.receive.handlers import ReceiveContext, handle_echo, handle_release, handle_store
from qgate.receive.scp import TRANSFER_SYNTAXES, build_ae, event_handlers, start_scp

__all__ = [
    "TRANSFER_SYNTAXES",
    "ReceiveContext",
    "build_ae",
    "event_handlers",
    "handle_echo",
    "handle_release",
    "handle_store",
    "start_scp",
]
