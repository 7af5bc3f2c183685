"""Score one series from its files: load, run every scorer, decide.

Pure and database-free, so the worker and the offline ``qgate score`` share it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgate.config import Settings, Threshold
from qgate.decide import Decision, decide
from qgate.scoring import ScoreOutput, Scorer, create_scorer
from qgate.volume import LoadedSeries, load_series


@dataclass
class ScoredSeries:
    loaded: LoadedSeries
    outputs: dict[str, ScoreOutput]
    versions: dict[str, str]
    decision: Decision
    seconds: float

    @property
    def scores_json(self) -> dict[str, dict[str, Any]]:
        return scores_json(self.outputs, self.versions)


def build_scorers(settings: Settings) -> list[Scorer]:
    """Instantiate the configured scorers once; they may hold models."""
    return [create_scorer(name) for name in settings.scoring.scorers]


def _finite(v: Any) -> Any:
    # Strict JSON (and PostgreSQL's JSON type) has no NaN: "nothing to measure" is null.
    return None if isinstance(v, float) and not math.isfinite(v) else v


def scores_json(
    outputs: dict[str, ScoreOutput], versions: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """The ``scores`` object of a result: series outputs flat, per-slice lists under ``slices``."""
    return {
        name: {
            **{k: _finite(v) for k, v in out.series.items()},
            "slices": {k: [_finite(float(x)) for x in vals] for k, vals in out.slices.items()},
            "version": versions[name],
        }
        for name, out in outputs.items()
    }


def score_series(
    paths: Sequence[Path], scorers: Sequence[Scorer], thresholds: Sequence[Threshold]
) -> ScoredSeries:
    """Load the files of one series, run every scorer on it and apply the gate thresholds."""
    t0 = time.perf_counter()
    loaded = load_series(paths)
    outputs = {s.name: s.score(loaded.volume) for s in scorers}
    versions = {s.name: s.version for s in scorers}
    decision = decide(outputs, thresholds)
    return ScoredSeries(loaded, outputs, versions, decision, time.perf_counter() - t0)
