"""Test helpers: DICOM files in every accepted transfer syntax, malformed files, and
clients (dcmtk ``storescu``/``echoscu``, and a pynetdicom SCU that sends a file's bytes
unchanged, for the malformed files ``storescu`` refuses to read)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Sequence
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config

from qgate.synth import make_ct_series

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

# How each accepted transfer syntax is made from an explicit VR little endian file:
# a dcmtk command line (input and output appended) or None for pydicom's encoders.
MAKERS: dict[UID, list[str] | None] = {
    ImplicitVRLittleEndian: ["dcmconv", "+ti"],
    ExplicitVRLittleEndian: ["dcmconv", "+te"],
    DeflatedExplicitVRLittleEndian: ["dcmconv", "+td"],
    JPEGBaseline8Bit: ["dcmcjpeg", "+eb"],
    JPEGExtended12Bit: ["dcmcjpeg", "+ee"],
    JPEGLossless: ["dcmcjpeg", "+el"],
    JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
    JPEGLSLossless: ["dcmcjpls", "+el"],
    JPEGLSNearLossless: ["dcmcjpls", "+en"],
    JPEG2000Lossless: None,
    JPEG2000: None,
    RLELossless: ["dcmcrle"],
}
LOSSY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000})


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def convert(src: Path, ts: UID, dst: Path) -> Path:
    """``src`` (explicit VR little endian) re-encoded in transfer syntax ``ts``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    cmd = MAKERS[ts]
    if cmd is None:
        ds = dcmread(src)
        ds.compress(ts, j2k_cr=[2]) if ts == JPEG2000 else ds.compress(ts)
        return save(ds, dst)
    subprocess.run([*cmd, str(src), str(dst)], check=True, capture_output=True, env=DCMTK_ENV)
    return dst


def encode_body(ds: Dataset, ts: UID = ExplicitVRLittleEndian) -> bytes:
    """The dataset encoded without file meta (little endian), as a C-STORE carries it."""
    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = ts.is_implicit_VR
    write_dataset(out, ds)
    return out.getvalue()


def write_raw(
    path: Path,
    body: bytes,
    *,
    sop_class: str,
    sop_instance: str,
    ts: UID = ExplicitVRLittleEndian,
) -> Path:
    """A Part 10 file: valid file meta, then ``body`` unchanged (may be garbage)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ts
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    buf.write(body)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


@contextlib.contextmanager
def _send_file_bytes() -> Iterator[None]:
    # pynetdicom sends a file's dataset bytes unparsed only in its chunked mode.
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def _file_meta(path: Path) -> FileMetaDataset:
    return dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta


def send_raw(
    port: int,
    paths: Sequence[Path],
    *,
    calling_aet: str = "TESTSCU",
    called_aet: str = "QGATE",
    host: str = "127.0.0.1",
) -> list[int]:
    """Send each file's bytes over one association; the C-STORE status of each."""
    contexts = set()
    for p in paths:
        meta = _file_meta(p)
        contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    ae = AE(ae_title=calling_aet)
    for sop_class, ts in sorted(contexts):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate(host, port, ae_title=called_aet)
    assert assoc.is_established, "association refused"
    statuses = []
    try:
        with _send_file_bytes():
            for p in paths:
                rsp = assoc.send_c_store(p)
                statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    finally:
        assoc.release()
    return statuses


def storescu(
    port: int, paths: Sequence[Path], *, calling_aet: str = "STORESCU", extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    cmd = ["storescu", "-aet", calling_aet, "-aec", "QGATE", *extra, "127.0.0.1", str(port)]
    return subprocess.run(
        [*cmd, *map(str, paths)], capture_output=True, text=True, env=DCMTK_ENV, timeout=60
    )


def echoscu(port: int, *, calling_aet: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    cmd = ["echoscu", "-aet", calling_aet, "-aec", "QGATE", "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, env=DCMTK_ENV, timeout=30)


def undecodable_ct_series(n: int = 3, size: int = 64, *, seed: int = 0) -> list[Dataset]:
    """A well-formed CT series whose pixel data cannot be decoded: JPEG Lossless (SV1)
    headers over fragments of random bytes, as a broken encoder would send them."""
    rng = np.random.default_rng(seed)
    out = make_ct_series(n, size, size, seed=seed)
    for ds in out:
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([bytes(rng.integers(0, 256, 2000, dtype="uint8"))])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    return out
