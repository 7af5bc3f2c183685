"""Scorers: the interface (:mod:`qgate.score.scorers.base`) and the registered measures.

Importing this package registers the classical measures ``noise`` and ``snr``; build one
with ``create_scorer("noise")``.
"""

from qgate.score.scorers.base import (
    ScoreOutput,
    Scorer,
    SeriesVolume,
    SliceMap,
    create_scorer,
    list_scorers,
    register_scorer,
)
from qgate.score.scorers.noise import NoiseConfig, NoiseScorer
from qgate.score.scorers.snr import SnrConfig, SnrScorer

__all__ = [
    "NoiseConfig",
    "NoiseScorer",
    "ScoreOutput",
    "Scorer",
    "SeriesVolume",
    "SliceMap",
    "SnrConfig",
    "SnrScorer",
    "create_scorer",
    "list_scorers",
    "register_scorer",
]
