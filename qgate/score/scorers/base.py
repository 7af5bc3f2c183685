"""The scoring interface shared by the worker, the offline CLI and training.

A scorer takes a :class:`SeriesVolume` (HU volume plus geometry) and returns a
:class:`ScoreOutput`: per-series outputs, per-slice outputs and optional per-slice maps.
Scorers are registered by name with :func:`register_scorer` and built by
:func:`create_scorer`, the way timm registers models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SeriesVolume:
    """A CT series in Hounsfield units, slices sorted along the patient axis.

    ``hu`` has shape (slices, rows, columns), float32. ``sop_instance_uids[i]`` is the
    instance that slice ``i`` came from (with ``frame_numbers[i]``, 1-based, for
    multi-frame instances; 1 otherwise).
    """

    hu: np.ndarray
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) in mm
    slice_thickness: float | None
    slice_positions: tuple[float, ...]  # position along the slice normal, mm
    sop_instance_uids: tuple[str, ...]
    frame_numbers: tuple[int, ...]
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    # Free-form acquisition hints (kernel, kVp, mAs, window) that some scorers use.
    acquisition: dict[str, Any] = field(default_factory=dict)
    # ``hu`` already copied to the scoring device (the worker stages it while the previous
    # series is scored: qgate.score.prefetch); a scorer on that device reads this instead
    # of copying ``hu`` again. None: host memory only.
    device_hu: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"hu must be 3-D (slices, rows, cols), got shape {self.hu.shape}")
        n = self.hu.shape[0]
        for name in ("slice_positions", "sop_instance_uids", "frame_numbers"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} slices")
        if self.device_hu is not None and tuple(self.device_hu.shape) != self.hu.shape:
            raise ValueError(
                f"device_hu has shape {tuple(self.device_hu.shape)}, hu {self.hu.shape}"
            )

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])


@dataclass
class SliceMap:
    """A per-slice real-valued map (rows, columns) with its meaning and display range."""

    name: str
    values: np.ndarray  # (slices, rows, cols) float32
    unit: str
    display_range: tuple[float, float]
    # Higher is better (quality) or worse (noise); drives the colour map direction.
    higher_is_better: bool


@dataclass
class ScoreOutput:
    """What one scorer says about one series.

    ``series`` holds JSON-ready scalars (and strings for classes). ``slices`` maps an
    output name to one value per slice. ``units`` gives the unit of each series output
    ("HU", "1", ...), used by the SR.
    """

    series: dict[str, float | int | str]
    slices: dict[str, list[float]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    maps: list[SliceMap] = field(default_factory=list)


@runtime_checkable
class Scorer(Protocol):
    name: str
    version: str

    def score(self, volume: SeriesVolume) -> ScoreOutput: ...


_REGISTRY: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    """Decorator: register a scorer factory under ``name``."""

    def deco(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        if name in _REGISTRY:
            raise ValueError(f"scorer {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def list_scorers() -> list[str]:
    return sorted(_REGISTRY)


def create_scorer(name: str, **kwargs: Any) -> Scorer:
    """Build the scorer registered as ``name``."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown scorer {name!r}; registered: {', '.join(list_scorers())}"
        ) from None
    return factory(**kwargs)
