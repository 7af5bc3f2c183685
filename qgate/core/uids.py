"""DICOM UID validation (PS3.5 §9.1).

A UID is at most 64 characters of digits and dots. Components are non-empty and a
multi-digit component has no leading zero. On the wire a UI value may be padded with a
trailing NUL (or, from sloppy writers, spaces); :func:`clean_uid` removes the padding and
returns the UID or raises ``ValueError``. Anything that becomes part of a file path or a
database key goes through :func:`clean_uid` first.
"""

from __future__ import annotations

import re

UID_MAX_LENGTH = 64

_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_PADDING = "\x00 "


def clean_uid(value: object) -> str:
    """Return ``value`` as a valid DICOM UID without padding.

    Parameters
    ----------
    value : str or bytes
        The UID as read from a dataset or a DIMSE message. ``bytes`` must be ASCII.

    Returns
    -------
    str
        The UID, stripped of NUL and space padding.

    Raises
    ------
    ValueError
        If ``value`` is missing, not text, or not a valid UID after stripping.
    """
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("UID is not ASCII") from None
    if not isinstance(value, str):
        raise ValueError(f"UID must be text, got {type(value).__name__}")
    uid = value.strip(_PADDING)
    if not uid:
        raise ValueError("UID is empty")
    if len(uid) > UID_MAX_LENGTH:
        raise ValueError(f"UID is longer than {UID_MAX_LENGTH} characters")
    if _UID_RE.fullmatch(uid) is None:
        # The offending value is not echoed: it may be anything a peer sent.
        raise ValueError("UID must be dot-separated numbers without leading zeros")
    return uid


def is_valid_uid(value: object) -> bool:
    """``True`` if :func:`clean_uid` accepts ``value``."""
    try:
        clean_uid(value)
    except ValueError:
        return False
    return True


def encoded_uid(uid: str) -> bytes:
    """A UID as a DICOM UI value is encoded: ASCII, NUL-padded to an even length."""
    value = uid.encode("ascii")
    return value + b"\x00" if len(value) % 2 else value


def placeholder_uid(length: int) -> str:
    """A valid UID of exactly ``length`` characters (1..64), for encoding templates."""
    return "1." + "9" * (length - 2) if length > 2 else "9" * length
