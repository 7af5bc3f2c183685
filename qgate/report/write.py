"""Write a scored series' report objects (SR, quality-map SC series, Parametric Map) to disk.

The SC images overlay the Noise2Quality map (``n2q.quality``) when that scorer ran, else
the first map; a subsampled map gets one image per mapped slice. The Parametric Map is
written when the Noise2Quality map is present. An SC series or Parametric Map that cannot
be built for a series is skipped with its reason, and the SR lists it (degrade, don't fail).

Files go to a per-job folder under ``storage.root/outgoing`` and are written atomically,
before the transaction that queues them for the archive; so a queued send never points at
a half-written file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import RLELossless, generate_uid

from qgate import __version__
from qgate.core.degrade import OutputName, PartKind, SkippedPart, SkipReason
from qgate.core.spool import write_atomic
from qgate.report import (
    QualityReport,
    build_quality_map_pm,
    build_quality_map_sc,
    build_quality_sr,
)
from qgate.report.sc import select_slices
from qgate.report.sr import SourceImages
from qgate.score.pipeline import ScoredSeries

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Fixed series numbers make qgate's objects easy to spot in a PACS viewer.
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
PM_SERIES_NUMBER = 9903
#: The map shown on the SC images and stored in the Parametric Map, when present.
QUALITY_MAP = "n2q.quality"


def _encode(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _sc_map(report: QualityReport) -> tuple[str | None, int | None]:
    """(map to overlay, max_images): the N2Q map if present, and only its mapped slices."""
    keys = [m.key for m in report.maps()]
    name = QUALITY_MAP if QUALITY_MAP in keys else None
    selected = report.select_map(name)
    if selected is None:
        return None, None
    values = selected.map.values
    mapped = np.isfinite(values.reshape(len(values), -1)).any(axis=1)
    k = int(mapped.sum())
    # A subsampled scorer maps the select_slices() spread: render exactly those slices.
    if 0 < k < len(values) and np.flatnonzero(mapped).tolist() == select_slices(len(values), k):
        return selected.key, k
    return selected.key, None


@dataclass(frozen=True)
class WrittenReport:
    """What :func:`write_report` wrote: the files (SR first), the SR's UID, what was skipped."""

    paths: list[Path]
    sr_uid: str
    #: Every scorer and report object left out (the scorers' skips come first).
    skipped_parts: list[SkippedPart]


def _optional_output(
    name: OutputName, build: Callable[[], _T], skipped: list[SkippedPart]
) -> _T | None:
    """``build()``, or None with the skip recorded: one object must not sink the report."""
    try:
        return build()
    except Exception as exc:  # any cause; the SR goes out and says what is missing
        part = SkippedPart.from_error(PartKind.OUTPUT, name.value, exc, SkipReason.OUTPUT_ERROR)
        log.warning("%s", part.describe())
        skipped.append(part)
        return None


def write_report(
    scored: ScoredSeries,
    out_dir: Path,
    *,
    previous_sr: Dataset | None,
    generation: int,
    fsync: bool,
    sr_source_images: SourceImages = "scored",
) -> WrittenReport:
    """Build and write the SR, SC and PM objects.

    The SC series and the Parametric Map are optional: one that cannot be built for this
    series is skipped and recorded. The SR is built last, so that it lists every scorer
    and object that was skipped; a failure to build the SR itself raises.
    ``sr_source_images`` is ``report.sr_source_images`` (see :func:`build_quality_sr`).
    """
    skipped = list(scored.skipped_parts)
    report = QualityReport(
        source_datasets=scored.loaded.headers,
        volume=scored.loaded.volume,
        scores=scored.outputs,
        versions=scored.versions,
        decision=scored.decision.decision,
        reasons=list(scored.decision.reasons),
        generation=generation + 1,
        previous_sr=previous_sr,
        skipped=skipped,
    )
    map_name, max_images = _sc_map(report)
    # RLE keeps the RGB maps ~3x smaller at no extra CPU; every PACS decodes it.
    images = _optional_output(
        OutputName.SECONDARY_CAPTURE,
        lambda: build_quality_map_sc(
            report,
            series_instance_uid=generate_uid(),
            series_number=SC_SERIES_NUMBER,
            map_name=map_name,
            max_images=max_images,
            manufacturer="qgate",
            software_version=__version__,
            transfer_syntax_uid=RLELossless,
        ),
        skipped,
    )
    pm = None
    if map_name == QUALITY_MAP:
        pm = _optional_output(
            OutputName.PARAMETRIC_MAP,
            lambda: build_quality_map_pm(
                report,
                series_instance_uid=generate_uid(),
                series_number=PM_SERIES_NUMBER,
                map_name=QUALITY_MAP,
                manufacturer="qgate",
                software_version=__version__,
            ),
            skipped,
        )
    if len(skipped) > len(report.skipped):
        report = replace(report, skipped=skipped)
    sr = build_quality_sr(
        report,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        manufacturer="qgate",
        software_version=__version__,
        source_images=sr_source_images,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "sr.dcm"]
    write_atomic(paths[0], _encode(sr), fsync=fsync)
    for k, img in enumerate(images or []):
        p = out_dir / f"sc{k:05d}.dcm"
        write_atomic(p, _encode(img), fsync=fsync)
        paths.append(p)
    if pm is not None:
        p = out_dir / "pm.dcm"
        write_atomic(p, _encode(pm), fsync=fsync)
        paths.append(p)
    return WrittenReport(paths, str(sr.SOPInstanceUID), skipped)
