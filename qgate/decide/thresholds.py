"""The gate decision: per-series scorer outputs against configured thresholds.

:func:`decide` flags a series when any configured output is outside its limits, or is
missing or not a finite number (a gate that cannot measure must not pass silently), and
says why in plain words, e.g. ``"noise: noise_sigma_hu 38.2 HU is above the limit 30 HU"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from qgate.core.config import DEFAULT_THRESHOLDS as DEFAULT_THRESHOLDS
from qgate.core.config import Threshold
from qgate.score.scorers.base import ScoreOutput

# The defaults live in qgate.core.config (no scorer imports there); re-exported here.


@dataclass
class Decision:
    """``pass`` or ``flag``, and one human-readable reason per failed check."""

    decision: Literal["pass", "flag"]
    reasons: list[str] = field(default_factory=list)


def _outputs(score: ScoreOutput | Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping]:
    """(series outputs, units) of one scorer's result in any accepted form."""
    if isinstance(score, ScoreOutput):
        return score.series, score.units
    series = score.get("series")
    if isinstance(series, Mapping):  # a ScoreOutput as a dict
        units = score.get("units")
        return series, units if isinstance(units, Mapping) else {}
    return score, {}  # a flat {output: value} mapping, as in the result JSON


def _fmt(value: float) -> str:
    """A readable number: 38.2, 0.153, 1234."""
    if value == 0 or not math.isfinite(value):
        return str(value)
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _unit(unit: Any) -> str:
    return "" if unit in (None, "", "1") else f" {unit}"


def decide(
    scores: Mapping[str, ScoreOutput | Mapping[str, Any]],
    thresholds: Sequence[Threshold],
) -> Decision:
    """Decide ``pass`` or ``flag`` for one series.

    Parameters
    ----------
    scores : mapping
        ``{scorer name: result}``. A result is a :class:`ScoreOutput`, a dict of one
        (``{"series": {...}, "units": {...}}``), or a flat ``{output: value}`` dict.
    thresholds : sequence of Threshold
        Each flags when ``scores[scorer][output]`` is below ``min`` or above ``max``
        (limits are inclusive: a value equal to the limit passes). A threshold with
        neither limit checks only that the output is present.

    Returns
    -------
    Decision
        ``flag`` with one reason per failed check (in threshold order), else ``pass``.
        A missing scorer or output, or a value that is not a finite number, is a failed
        check, never an exception.
    """
    reasons: list[str] = []
    for t in thresholds:
        why = f" ({t.reason})" if t.reason else ""
        score = scores.get(t.scorer)
        if score is None:
            reasons.append(f"{t.scorer}: output {t.output} missing (scorer did not run)")
            continue
        series, units = _outputs(score)
        if t.output not in series or series[t.output] is None:
            reasons.append(f"{t.scorer}: output {t.output} missing")
            continue
        raw = series[t.output]
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(raw, bool) or not math.isfinite(value):
            reasons.append(f"{t.scorer}: {t.output} is not a finite number ({raw!r})")
            continue
        unit = _unit(units.get(t.output))
        if t.max is not None and value > t.max:
            reasons.append(
                f"{t.scorer}: {t.output} {_fmt(value)}{unit} is above the limit "
                f"{t.max:g}{unit}{why}"
            )
        if t.min is not None and value < t.min:
            reasons.append(
                f"{t.scorer}: {t.output} {_fmt(value)}{unit} is below the limit "
                f"{t.min:g}{unit}{why}"
            )
    return Decision(decision="flag" if reasons else "pass", reasons=reasons)
