"""Dataset builders for MD-IQA, Noise2Quality and Chest CT-IQA, and their readers."""

from training.datasets.common import (
    Manifest,
    ShardDataset,
    SourceConfig,
    assign_splits,
    load_split,
    read_manifest,
)
from training.datasets.score import ScoreProxy, fidelity

__all__ = [
    "Manifest",
    "ScoreProxy",
    "ShardDataset",
    "SourceConfig",
    "assign_splits",
    "fidelity",
    "load_split",
    "read_manifest",
]
