"""The receive stage's File Meta header is exactly what pynetdicom would have written."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from qgate.receive.part10 import PREAMBLE, file_header

UIDS = [
    "1.2",  # shortest valid, padded to 4
    "1.23",  # even, no padding
    generate_uid(),
    "1.2.840.113619.2.55.3.604688119.969.1268071029.320.1",  # odd, padded
    "1." + "2" * 62,  # 64 characters, the longest
    "9",  # one character: padded to 2
]


@pytest.mark.parametrize("uid", UIDS)
@pytest.mark.parametrize("sop_class", [CTImageStorage, EnhancedCTImageStorage])
@pytest.mark.parametrize(
    "syntax",
    [
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        JPEG2000Lossless,
        RLELossless,
    ],
)
def test_file_header_matches_pynetdicom(uid: str, sop_class: str, syntax: str) -> None:
    # What event.encoded_dataset() prepends (pynetdicom/events.py).
    meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=uid, transfer_syntax=syntax)
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    assert file_header(sop_class, uid, syntax) == expected


def test_file_header_reads_back_with_each_uid_in_turn() -> None:
    """The cached template is per UID length: interleaved lengths must not bleed."""
    for uid in UIDS * 2:
        head = file_header(CTImageStorage, uid, ExplicitVRLittleEndian)
        assert head.startswith(PREAMBLE)
        ds = dcmread(BytesIO(head), force=True)
        assert ds.file_meta.MediaStorageSOPInstanceUID == uid
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
