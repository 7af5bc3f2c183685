"""Scorers: the interface (:mod:`qgate.scoring.base`) and the registered measures.

Importing this package registers the classical measures ``noise`` and ``snr``; build one
with ``create_scorer("noise")``.
"""

from qgate.scoring.base import (
    ScoreOutput,
    Scorer,
    SeriesVolume,
    SliceMap,
    create_scorer,
    list_scorers,
    register_scorer,
)
from qgate.scoring.noise import NoiseConfig, NoiseScorer
from qgate.scoring.snr import SnrConfig, SnrScorer

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
