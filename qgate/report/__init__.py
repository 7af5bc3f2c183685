"""Report stage: the quality SR and the secondary-capture quality maps of a scored series.

Build a :class:`QualityReport` once per scored series, then hand it to
:func:`build_quality_sr` (TID 1500 Measurement Report, Enhanced SR),
:func:`build_quality_map_sc` (one RGB Secondary Capture image per scored slice) and
:func:`build_quality_map_pm` (the real-valued map as a float Parametric Map).
:func:`qgate.report.write.write_report` writes them to disk for the worker.
"""

from qgate.report.content import GateDecision, NamedMap, QualityReport
from qgate.report.pm import build_quality_map_pm
from qgate.report.sc import build_quality_map_sc
from qgate.report.sr import build_quality_sr

__all__ = [
    "GateDecision",
    "NamedMap",
    "QualityReport",
    "build_quality_map_pm",
    "build_quality_map_sc",
    "build_quality_sr",
]
