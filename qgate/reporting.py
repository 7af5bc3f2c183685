"""Write a scored series' report objects (SR and quality-map SC series) to disk.

Files go to a per-job folder under ``storage.root/outgoing`` and are written atomically,
before the transaction that queues them for the archive; so a queued send never points at
a half-written file.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import RLELossless, generate_uid

from qgate import __version__
from qgate.pipeline import ScoredSeries
from qgate.report import QualityReport, build_quality_map_sc, build_quality_sr
from qgate.spool import write_atomic

# Fixed series numbers make qgate's objects easy to spot in a PACS viewer.
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902


def _encode(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_report(
    scored: ScoredSeries,
    out_dir: Path,
    *,
    previous_sr: Dataset | None,
    generation: int,
    fsync: bool,
) -> tuple[list[Path], str]:
    """Build and write the SR and SC objects; returns (paths, SR first) and the SR's UID."""
    report = QualityReport(
        source_datasets=scored.loaded.headers,
        volume=scored.loaded.volume,
        scores=scored.outputs,
        versions=scored.versions,
        decision=scored.decision.decision,
        reasons=list(scored.decision.reasons),
        generation=generation + 1,
        previous_sr=previous_sr,
    )
    sr = build_quality_sr(
        report,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        manufacturer="qgate",
        software_version=__version__,
    )
    # RLE keeps the RGB maps ~3x smaller at no extra CPU; every PACS decodes it.
    images = build_quality_map_sc(
        report,
        series_instance_uid=generate_uid(),
        series_number=SC_SERIES_NUMBER,
        manufacturer="qgate",
        software_version=__version__,
        transfer_syntax_uid=RLELossless,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "sr.dcm"]
    write_atomic(paths[0], _encode(sr), fsync=fsync)
    for k, img in enumerate(images):
        p = out_dir / f"sc{k:05d}.dcm"
        write_atomic(p, _encode(img), fsync=fsync)
        paths.append(p)
    return paths, str(sr.SOPInstanceUID)
