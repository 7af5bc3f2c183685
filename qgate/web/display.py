"""Turn a result's ``scores`` JSON into what the pages show, without knowing the scorers.

A scorer's entry is ``{output: scalar, ..., "slices": {output: [per-slice]}, "version"}``
(:func:`qgate.score.pipeline.scores_json`). Everything scalar becomes a table row, nested
objects are flattened to dotted names, per-slice lists become strip plots; so a new model's
outputs appear without a change here.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qgate.core.config import Threshold
from qgate.report.codes import output_concept
from qgate.report.render import format_value

_HU = re.compile(r"(^|_)hu(_|$)", re.IGNORECASE)
_SKIP = frozenset({"slices", "version"})


def output_label(key: str) -> str:
    """A reader's name for an output: the SR concept meaning (``Image noise (robust SD)``)."""
    return str(output_concept(key.rsplit(".", 1)[-1]).meaning)


def output_unit(key: str) -> str:
    """The unit shown beside an output's value; the result JSON carries none, so this
    recognises the naming convention (``..._hu``)."""
    return "HU" if _HU.search(key) else ""


def fmt_value(value: Any, unit: str = "") -> str:
    """Compact display of any JSON value."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return format_value(value, unit)
    if isinstance(value, list):
        return f"{len(value)} values"
    if isinstance(value, Mapping):
        return f"{len(value)} entries"
    return str(value)


def fmt_dt(value: dt.datetime | None) -> str:
    """UTC date and minute; the pages turn it into the reader's local time."""
    if value is None:
        return "–"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def fmt_dicom_date(value: str | None) -> str:
    if not value or len(value) != 8 or not value.isdigit():
        return value or "–"
    return f"{value[:4]}-{value[4:6]}-{value[6:]}"


def fmt_person_name(value: str | None) -> str:
    """``Doe^John`` -> ``Doe, John``."""
    if not value:
        return "–"
    parts = [p for p in value.split("^") if p]
    if len(parts) >= 2:
        return f"{parts[0]}, {' '.join(parts[1:])}"
    return parts[0] if parts else "–"


def violation(value: Any, thresholds: Sequence[Threshold]) -> str | None:
    """The first limit ``value`` breaks among ``thresholds`` (already matched by output)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    v = float(value)
    if thresholds and not math.isfinite(v):
        return "not measurable"
    for t in thresholds:
        if t.min is not None and v < t.min:
            return f"below {format_value(t.min)}"
        if t.max is not None and v > t.max:
            return f"above {format_value(t.max)}"
    return None


def matching(thresholds: Sequence[Threshold], scorer: str, output: str) -> list[Threshold]:
    return [t for t in thresholds if t.scorer == scorer and t.output == output]


@dataclass(frozen=True)
class OutputRow:
    key: str
    label: str
    value: str
    raw: Any
    limit: str | None  # "max 30 HU" when a gate threshold applies
    breach: str | None  # "above 30" when the value breaks it


@dataclass
class ScorerTable:
    name: str
    version: str | None
    rows: list[OutputRow] = field(default_factory=list)
    slices: dict[str, list[float | None]] = field(default_factory=dict)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def _limit_text(ts: Sequence[Threshold], unit: str) -> str | None:
    parts = []
    for t in ts:
        if t.min is not None:
            parts.append(f"min {format_value(t.min, unit)}")
        if t.max is not None:
            parts.append(f"max {format_value(t.max, unit)}")
    return ", ".join(parts) or None


def scorer_tables(scores: Mapping[str, Any], thresholds: Sequence[Threshold]) -> list[ScorerTable]:
    """One table per scorer, rows in the scorer's own order."""
    tables = []
    for name, entry in scores.items():
        if not isinstance(entry, Mapping):
            tables.append(
                ScorerTable(
                    name, None, [OutputRow(name, name, fmt_value(entry), entry, None, None)]
                )
            )
            continue
        flat: dict[str, Any] = {}
        for k, v in entry.items():
            if k not in _SKIP:
                _flatten(str(k), v, flat)
        rows = []
        for key, value in flat.items():
            unit = output_unit(key)
            ts = matching(thresholds, name, key)
            rows.append(
                OutputRow(
                    key=key,
                    label=output_label(key),
                    value=fmt_value(value, unit),
                    raw=value,
                    limit=_limit_text(ts, unit),
                    breach=violation(value, ts) if ts else None,
                )
            )
        slices_raw = entry.get("slices")
        slices = {
            str(k): [float(x) if isinstance(x, int | float) else None for x in v]
            for k, v in (slices_raw.items() if isinstance(slices_raw, Mapping) else [])
            if isinstance(v, list)
        }
        version = entry.get("version")
        tables.append(ScorerTable(name, str(version) if version else None, rows, slices))
    return tables


def headline(scores: Mapping[str, Any], threshold: Threshold) -> tuple[str, bool]:
    """The value of a threshold's output in ``scores`` and whether it breaks the limit."""
    entry = scores.get(threshold.scorer)
    value = entry.get(threshold.output) if isinstance(entry, Mapping) else None
    unit = output_unit(threshold.output)
    return fmt_value(value, unit), violation(value, [threshold]) is not None


SCORE_LABELS = {
    0: "Non-diagnostic",
    1: "Poor",
    2: "Fair",
    3: "Good",
    4: "Excellent",
}
