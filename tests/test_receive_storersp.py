"""C-STORE responses from the template are exactly what pynetdicom would send."""

from __future__ import annotations

import pytest
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, generate_uid

from qgate.receive.storersp import encode_store_response, pynetdicom_command

UIDS = [
    "1.2",
    "1.23",
    "9",
    generate_uid(),
    "1.2.840.113619.2.55.3.604688119.969.1268071029.320.1",
    "1." + "2" * 62,
]


@pytest.mark.parametrize("uid", UIDS)
@pytest.mark.parametrize("sop_class", [CTImageStorage, EnhancedCTImageStorage])
@pytest.mark.parametrize(
    ("status", "message_id"),
    [(0x0000, 1), (0x0000, 65535), (0xA700, 256), (0xA900, 255), (0xC211, 0), (0xB000, 4097)],
)
def test_matches_pynetdicom(uid: str, sop_class: str, status: int, message_id: int) -> None:
    expected = pynetdicom_command(sop_class, uid, message_id, status)
    assert encode_store_response(sop_class, uid, message_id, status) == expected


def test_interleaved_lengths_and_ids_do_not_bleed() -> None:
    for n, uid in enumerate(UIDS * 3):
        got = encode_store_response(CTImageStorage, uid, n, 0)
        assert got == pynetdicom_command(CTImageStorage, uid, n, 0)
