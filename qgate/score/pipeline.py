"""Score one series from its files: load, run every scorer, decide.

Pure and database-free, so the worker and the offline ``qgate score`` share it. A scorer
that raises on a series is skipped with a :class:`~qgate.core.degrade.SkippedPart` and the
others still count (degrade, don't fail); only a series no scorer could measure fails.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qgate.core.config import Settings, Threshold
from qgate.core.degrade import PartKind, SkippedPart, SkipReason
from qgate.core.families import FAMILY_NAMES
from qgate.decide.thresholds import Decision, decide
from qgate.score.scorers import ScoreOutput, Scorer, create_scorer
from qgate.score.scorers.learned import set_torch_threads
from qgate.score.volume import LoadedSeries, load_series

log = logging.getLogger(__name__)

#: The learned scorers (qgate.score.scorers.learned), configured by ``scoring.<name>``.
LEARNED_SCORERS = FAMILY_NAMES


@dataclass
class ScoredSeries:
    loaded: LoadedSeries
    outputs: dict[str, ScoreOutput]
    versions: dict[str, str]
    decision: Decision
    seconds: float
    #: Scorers that raised on this series; their outputs are absent from ``outputs``.
    skipped_parts: list[SkippedPart] = field(default_factory=list)

    @property
    def scores_json(self) -> dict[str, dict[str, Any]]:
        return scores_json(self.outputs, self.versions)


def build_scorers(settings: Settings) -> list[Scorer]:
    """Instantiate the configured scorers once; they may hold models.

    The learned scorers get their ``scoring.<name>`` settings and ``scoring.device``, and
    ``scoring.torch_threads`` is applied before they load.
    """
    cfg = settings.scoring
    if any(name in LEARNED_SCORERS for name in cfg.scorers):
        set_torch_threads(cfg.torch_threads)
    return [
        create_scorer(name, config=cfg.learned(name), device=cfg.device)
        if name in LEARNED_SCORERS
        else create_scorer(name)
        for name in cfg.scorers
    ]


def _finite(v: Any) -> Any:
    # Strict JSON (and PostgreSQL's JSON type) has no NaN: "nothing to measure" is null.
    return None if isinstance(v, float) and not math.isfinite(v) else v


def scores_json(
    outputs: dict[str, ScoreOutput], versions: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """The ``scores`` object of a result: series outputs flat, per-slice lists under ``slices``.

    A per-slice output named ``slice_*`` (MD-IQA's ``slice_scores``) is also listed at the
    top level, where the results JSON names it (``scores.mdiqa.slice_scores``).
    """
    result: dict[str, dict[str, Any]] = {}
    for name, out in outputs.items():
        slices = {k: [_finite(float(x)) for x in vals] for k, vals in out.slices.items()}
        result[name] = {
            **{k: _finite(v) for k, v in out.series.items()},
            **{k: v for k, v in slices.items() if k.startswith("slice_") and k not in out.series},
            "slices": slices,
            "version": versions[name],
        }
    return result


class NothingScored(RuntimeError):
    """Every scorer raised on the series: there is no measurement to report."""


def score_series(
    paths: Sequence[Path], scorers: Sequence[Scorer], thresholds: Sequence[Threshold]
) -> ScoredSeries:
    """Load the files of one series, run every scorer on it and apply the gate thresholds.

    A scorer that raises is skipped and recorded; a threshold on its outputs then flags
    the series (:func:`qgate.decide.thresholds.decide`: a gate that cannot measure must not pass).

    Raises
    ------
    qgate.score.volume.SeriesLoadError
        No usable CT instance.
    NothingScored
        Every scorer raised.
    """
    t0 = time.perf_counter()
    loaded = load_series(paths)
    return score_loaded(loaded, scorers, thresholds, decode_seconds=time.perf_counter() - t0)


def score_loaded(
    loaded: LoadedSeries,
    scorers: Sequence[Scorer],
    thresholds: Sequence[Threshold],
    *,
    decode_seconds: float = 0.0,
) -> ScoredSeries:
    """:func:`score_series` on a series already loaded (decoded ahead by the worker).

    ``seconds`` of the result is ``decode_seconds`` plus the time spent here.

    Raises
    ------
    NothingScored
        Every scorer raised.
    """
    t0 = time.perf_counter() - decode_seconds
    outputs: dict[str, ScoreOutput] = {}
    skipped: list[SkippedPart] = []
    for scorer in scorers:
        try:
            outputs[scorer.name] = scorer.score(loaded.volume)
        except Exception as exc:  # any cause: one scorer must not sink the series
            part = SkippedPart.from_error(
                PartKind.SCORER, scorer.name, exc, SkipReason.SCORER_ERROR
            )
            log.warning("%s", part.describe())  # the worker's log names the job
            skipped.append(part)
    if scorers and not outputs:
        raise NothingScored("; ".join(p.describe() for p in skipped))
    versions = {s.name: s.version for s in scorers if s.name in outputs}
    decision = decide(outputs, thresholds)
    return ScoredSeries(
        loaded, outputs, versions, decision, time.perf_counter() - t0, skipped_parts=skipped
    )
