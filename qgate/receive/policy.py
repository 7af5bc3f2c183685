"""Who may associate, decided when the A-ASSOCIATE-RQ arrives (``evt.EVT_REQUESTED``).

pynetdicom itself checks the calling AE title list (``dicom.allowed_calling_aets``), the
called AE title (``dicom.require_called_aet``) and the association limit
(``dicom.maximum_associations``). :func:`handle_requested` adds what it cannot express:

* ``dicom.allowed_peers``: the calling AE title must come from its listed address or
  network. Refused permanently: service user, calling AE title not recognised
  (result 1, source 1, reason 3).
* ``dicom.maximum_associations`` across the node's receiver processes
  (``dicom.receivers`` > 1, :class:`qgate.receive.listener.AssociationSlots`): with no
  slot free the association is refused as transient, local limit exceeded (result 2,
  source 3, reason 2), as pynetdicom refuses over its per-process limit.
* ``storage.min_free_mb``: below the watermark every association is refused as transient,
  local limit exceeded (result 2, source 3, reason 2), so a modality retries later; as
  MONAI's Informatics Gateway does. Associations already open finish their series.

Rejecting from an ``EVT_REQUESTED`` handler is pynetdicom's supported way (its acceptor
skips negotiation when the handler rejected); the handler mirrors what pynetdicom does
for its own rejections: ``acse.send_reject`` then ``kill``.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from qgate.core.config import AllowedPeer
from qgate.core.diskspace import disk_space

if TYPE_CHECKING:
    from pynetdicom.events import Event as PynetdicomEvent

    from qgate.receive.handlers import ReceiveContext

#: (result, source, reason) of the A-ASSOCIATE-RJ (PS3.8 9.3.4).
REJECT_PEER = (0x01, 0x01, 0x03)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
REJECT_DISK_LOW = REJECT_LOCAL_LIMIT


def peer_allowed(peers: list[AllowedPeer], ae_title: str, address: str) -> bool:
    """Whether (``ae_title``, ``address``) is on the list; an empty list allows all."""
    if not peers:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    ae_title = ae_title.strip()
    return any(
        p.ae_title == ae_title and ip in ipaddress.ip_network(p.host, strict=False) for p in peers
    )


def refusal(
    ctx: ReceiveContext, ae_title: str, address: str
) -> tuple[tuple[int, int, int], str] | None:
    """The A-ASSOCIATE-RJ parameters and a log reason, or None to go on negotiating."""
    cfg = ctx.settings
    if not peer_allowed(cfg.dicom.allowed_peers, ae_title, address):
        return REJECT_PEER, "calling AE title and address not in dicom.allowed_peers"
    if cfg.storage.min_free_mb:
        why = disk_space(cfg).reason
        if why is not None:
            return REJECT_DISK_LOW, why
    return None


def handle_requested(event: PynetdicomEvent, ctx: ReceiveContext) -> None:
    """``evt.EVT_REQUESTED``: reject the association if :func:`refusal` says so."""
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    ae_title = str(primitive.calling_ae_title if primitive is not None else "")
    address = assoc.requestor.address
    decided = refusal(ctx, ae_title, address)
    if decided is None and ctx.slots is not None:
        decided = _take_slot(ctx, assoc)
    if decided is None:
        return
    (result, source, reason), why = decided
    ctx.logger.warning("association refused: aet=%s address=%s: %s", ae_title, address, why)
    assoc.acse.send_reject(result, source, reason)
    assoc.kill()


def _take_slot(ctx: ReceiveContext, assoc: object) -> tuple[tuple[int, int, int], str] | None:
    """Hold one of the node's association slots for ``assoc``, or the refusal."""
    assert ctx.slots is not None
    try:
        if ctx.slots.acquire(assoc):
            return None
    except OSError as exc:  # the slot folder is gone: refuse rather than exceed the limit
        return REJECT_LOCAL_LIMIT, f"association slots unavailable ({exc.strerror})"
    return REJECT_LOCAL_LIMIT, (
        f"dicom.maximum_associations ({ctx.slots.maximum}) reached on this node"
    )
