"""pynetdicom is pinned, and every piece of it that qgate.receive replaces is unchanged.

qgate.receive replaces pynetdicom internals where ``benchmarks/receive.py`` showed them
to matter (benchmarks/RESULTS.md). Each replaced or patched function, and each class
whose instances get a qgate subclass, is pinned here by the sha256 of its source in the
pinned version. An upgrade that changes one fails here: read the new code against
qgate/receive/reactor.py, storersp.py and part10.py, port the change, update the digest
and the pin in pyproject.toml together.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import tomllib
from pathlib import Path

import pynetdicom
import pytest

from qgate.receive import reactor, storersp

#: The exact version pyproject.toml requires.
PYNETDICOM_VERSION = "3.0.4"

#: ``module:qualified.name`` -> the first 24 hex digits of the sha256 of its source in
#: PYNETDICOM_VERSION.
PINNED: dict[str, str] = {
    "pynetdicom.ae:ApplicationEntity.start_server": "d3868a2df83d3cc08966b575",
    "pynetdicom.association:Association": "da3d42124170e02af6c29738",
    "pynetdicom.association:Association._run_reactor": "f28838c5559e462a563750cf",
    "pynetdicom.dimse:DIMSEServiceProvider": "3bb7d2ea221570d72e21d56f",
    "pynetdicom.dimse:DIMSEServiceProvider.send_msg": "a839cf2fb46976d9da29cf06",
    "pynetdicom.dul:DULServiceProvider": "c0a5c6a4618efd94b74b75fd",
    "pynetdicom.dul:DULServiceProvider._is_transport_event": "8725ed03bb8fbdefef249d5d",
    "pynetdicom.dul:DULServiceProvider.kill_dul": "5ceccf8dd01c2072c377d18b",
    "pynetdicom.dul:DULServiceProvider.run_reactor": "e3a10eb3a0931e4854af33b9",
    "pynetdicom.dul:DULServiceProvider.send_pdu": "7cbce5da8594124e9e70c790",
    "pynetdicom.events:Event.encoded_dataset": "879e44cd3dc43358692ef7fa",
    "pynetdicom.transport:AssociationServer.__init__": "edacb98bdfb7b9744194698d",
    "pynetdicom.transport:AssociationServer.get_request": "925a4f3a3042f6e4b944505d",
    "pynetdicom.transport:AssociationServer.server_bind": "cf69278a05a5c777b7e9e9af",
    "pynetdicom.transport:AssociationServer.server_close": "3fa1b358badbe6826671da5e",
    "pynetdicom.transport:AssociationServer.service_actions": "0a0853a3615ac7c5260a57dc",
    "pynetdicom.transport:AssociationServer.shutdown": "e8e2c3a41009886d8544d17c",
    "pynetdicom.transport:AssociationSocket": "4f95b1dce6067f32193cb814",
    "pynetdicom.transport:RequestHandler._create_association": "05c8d12b79863cdbdb901ce3",
    "pynetdicom.transport:RequestHandler.handle": "034823fb4df3a87467bd0d45",
}

#: qgate's subclasses of pynetdicom classes: every method they override must be pinned.
SUBCLASSES: tuple[type, ...] = (
    reactor.LowLatencyAssociation,
    reactor.LowLatencyDUL,
    reactor.LowLatencyRequestHandler,
    reactor.DeferredHandshakeServer,
    storersp.StoreResponseDIMSE,
)


def _resolve(name: str) -> object:
    module, _, rest = name.partition(":")
    obj: object = importlib.import_module(module)
    for part in rest.split("."):
        obj = getattr(obj, part)
    return obj


def _digest(name: str) -> str:
    source = inspect.getsource(_resolve(name))  # type: ignore[arg-type]
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def _overridden() -> set[str]:
    """``module:Class.method`` of each pynetdicom method a qgate subclass overrides."""
    out = set()
    for cls in SUBCLASSES:
        for attr, value in vars(cls).items():
            if not callable(value) or (attr.startswith("__") and attr != "__init__"):
                continue
            for base in cls.__mro__[1:]:
                if attr in vars(base):
                    if base.__module__.startswith("pynetdicom"):
                        out.add(f"{base.__module__}:{base.__qualname__}.{attr}")
                    break
    return out


def test_pyproject_pins_the_installed_pynetdicom() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    [spec] = [d for d in pyproject["project"]["dependencies"] if re.match(r"pynetdicom\b", d)]
    assert spec == f"pynetdicom=={PYNETDICOM_VERSION}"
    assert pynetdicom.__version__ == PYNETDICOM_VERSION


def test_every_overridden_pynetdicom_method_is_pinned() -> None:
    assert _overridden() <= set(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_replaced_pynetdicom_code_is_unchanged(name: str) -> None:
    assert _digest(name) == PINNED[name], f"{name} changed in pynetdicom"
