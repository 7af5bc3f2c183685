"""The DICOM File Format header (preamble, prefix, File Meta Information) of a received instance.

pynetdicom's ``event.encoded_dataset()`` builds this header with pydicom for every
instance (a :class:`~pydicom.dataset.FileMetaDataset`, validated element by element,
then written) and joins it to a copy of the dataset: about 0.4 ms and two 512 KB copies
per CT slice, on the path the modality waits on. The header differs between instances
of one SOP class and transfer syntax only in the Media Storage SOP Instance UID, and
the group length depends only on that UID's padded length. So pydicom encodes it once
per (SOP class, transfer syntax, UID length) with a placeholder UID of the same length,
and :func:`file_header` puts the real UID in the placeholder's place. The result is
byte-for-byte what ``encoded_dataset()`` prepends (``tests/test_receive_part10.py``).
"""

from __future__ import annotations

import struct
from functools import lru_cache

from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from qgate.core.uids import encoded_uid, placeholder_uid

PREAMBLE = b"\x00" * 128 + b"DICM"

_INSTANCE_UID_TAG = b"\x02\x00\x03\x00UI"  # (0002,0003) in explicit VR little endian


@lru_cache(maxsize=256)
def _template(sop_class_uid: str, transfer_syntax: str, length: int) -> tuple[bytes, int]:
    """pydicom's header for a placeholder instance UID of ``length`` bytes (padded),
    and the offset of that UID's value in it."""
    placeholder = placeholder_uid(length)
    meta = create_file_meta(
        sop_class_uid=UID(sop_class_uid),
        sop_instance_uid=UID(placeholder),
        transfer_syntax=UID(transfer_syntax),
    )
    header = PREAMBLE + encode_file_meta(meta)
    element = _INSTANCE_UID_TAG + struct.pack("<H", length) + placeholder.encode("ascii")
    at = header.find(element)
    if at < 0 or header.find(element, at + 1) >= 0:  # pragma: no cover - pydicom changed
        raise RuntimeError("cannot locate the Media Storage SOP Instance UID in the file meta")
    return header, at + len(element) - length


def file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information for one received instance.

    Parameters
    ----------
    sop_class_uid, sop_instance_uid : str
        The C-STORE request's Affected SOP Class / Instance UID (validated by the caller;
        ASCII, at most 64 characters).
    transfer_syntax : str
        The presentation context's transfer syntax.

    Returns
    -------
    bytes
        What ``event.encoded_dataset()`` puts before the dataset.
    """
    value = encoded_uid(sop_instance_uid)
    header, at = _template(sop_class_uid, transfer_syntax, len(value))
    return header[:at] + value + header[at + len(value) :]
