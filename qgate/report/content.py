"""The typed input of the report stage: what was scored, what the scorers said, the decision.

:class:`QualityReport` is built once per scored series by the worker and handed to both
writers (:func:`qgate.report.build_quality_sr` and :func:`qgate.report.build_quality_map_sc`).
It is validated on construction, so the writers can assume a consistent input.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import RE_VALID_UID

from qgate.core.degrade import PartKind, SkippedPart
from qgate.score.scorers.base import ScoreOutput, SeriesVolume, SliceMap

#: SOP Class UIDs of the SR storage classes a predecessor report may have.
_SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


class GateDecision(enum.Enum):
    """Outcome of the quality gate for one series."""

    PASS = "pass"
    FLAG = "flag"


@dataclass(frozen=True)
class NamedMap:
    """A :class:`~qgate.score.scorers.base.SliceMap` together with the scorer that produced it."""

    scorer: str
    map: SliceMap

    @property
    def key(self) -> str:
        """``"<scorer>.<map name>"``, the fully qualified name used for selection."""
        return f"{self.scorer}.{self.map.name}"


@dataclass(frozen=True)
class QualityReport:
    """Everything the report writers need about one scored series.

    Parameters
    ----------
    source_datasets: Sequence[pydicom.dataset.Dataset]
        The instances of the scored series (headers are enough for the SR; the SC writer
        uses only their patient, study and geometry attributes, never their pixel data).
        All must belong to ``volume``'s series and study, and every instance named in
        ``volume.sop_instance_uids`` must be among them.
    volume: qgate.score.scorers.base.SeriesVolume
        The preprocessed series that was scored (HU volume and geometry).
    scores: Mapping[str, qgate.score.scorers.base.ScoreOutput]
        Scorer name to that scorer's output. At least one scorer is required.
    versions: Mapping[str, str]
        Scorer name to scorer version; required for every scorer in ``scores``.
    decision: Union[str, GateDecision]
        Gate decision, ``"pass"`` or ``"flag"``.
    reasons: Sequence[str], optional
        Human-readable reasons for the decision (may be empty for a pass).
    generation: int, optional
        1 for the first report of a series, incremented each time a re-score supersedes
        the previous report.
    previous_sr: Union[pydicom.dataset.Dataset, None], optional
        The SR document this report supersedes (required when ``generation`` > 1 is the
        result of a re-score and the earlier SR is known); must be an SR in the same study.
    skipped: Sequence[qgate.core.degrade.SkippedPart], optional
        Scorers and report objects left out of this report, and why; the SR lists them.

    Raises
    ------
    TypeError
        When an argument has the wrong type or a scorer has no version.
    ValueError
        When values are inconsistent (unknown decision, mismatching series, wrong number
        of per-slice values, maps of the wrong shape, bad generation).
    """

    source_datasets: Sequence[Dataset]
    volume: SeriesVolume
    scores: Mapping[str, ScoreOutput]
    versions: Mapping[str, str]
    decision: GateDecision | str
    reasons: Sequence[str] = ()
    generation: int = 1
    previous_sr: Dataset | None = None
    skipped: Sequence[SkippedPart] = ()
    _by_uid: Mapping[str, Dataset] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise on entry
        if not isinstance(self.volume, SeriesVolume):
            raise TypeError('Argument "volume" must be a SeriesVolume.')
        if isinstance(self.source_datasets, Dataset) or not isinstance(
            self.source_datasets, Sequence
        ):
            raise TypeError('Argument "source_datasets" must be a sequence of Datasets.')
        if len(self.source_datasets) == 0:
            raise ValueError('Argument "source_datasets" must not be empty.')
        for ds in self.source_datasets:
            if not isinstance(ds, Dataset):
                raise TypeError('Items of "source_datasets" must be pydicom Datasets.')
        set_(self, "source_datasets", tuple(self.source_datasets))

        vol = self.volume
        by_uid: dict[str, Dataset] = {}
        for ds in self.source_datasets:
            for kw in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
                if kw not in ds:
                    raise ValueError(f"source dataset lacks {kw}")
            if ds.SeriesInstanceUID != vol.series_instance_uid:
                raise ValueError("source datasets must all belong to the scored series")
            if ds.StudyInstanceUID != vol.study_instance_uid:
                raise ValueError("source datasets must all belong to the scored study")
            by_uid[str(ds.SOPInstanceUID)] = ds
        missing = [u for u in vol.sop_instance_uids if u not in by_uid]
        if missing:
            raise ValueError(
                f"{len(missing)} instance(s) of the volume are not among source_datasets"
            )
        set_(self, "_by_uid", by_uid)

        if not isinstance(self.scores, Mapping):
            raise TypeError('Argument "scores" must be a mapping of scorer name to ScoreOutput.')
        if len(self.scores) == 0:
            raise ValueError('Argument "scores" must contain at least one scorer.')
        if not isinstance(self.versions, Mapping):
            raise TypeError('Argument "versions" must be a mapping of scorer name to version.')
        n = vol.n_slices
        for name, out in self.scores.items():
            if not isinstance(name, str) or not name:
                raise TypeError("scorer names must be non-empty strings")
            if not isinstance(out, ScoreOutput):
                raise TypeError(f"scores[{name!r}] must be a ScoreOutput")
            version = self.versions.get(name)
            if not isinstance(version, str) or not version:
                raise TypeError(f"no version given for scorer {name!r}")
            for key, value in out.series.items():
                if isinstance(value, str):
                    continue
                if not isinstance(value, (int, float, np.integer, np.floating)):
                    raise TypeError(
                        f"{name}.{key}: series outputs must be numbers or strings, "
                        f"got {type(value).__name__}"
                    )
            for key, values in out.slices.items():
                if len(values) != n:
                    raise ValueError(f"{name}.{key}: {len(values)} per-slice values for {n} slices")
            for m in out.maps:
                if not isinstance(m, SliceMap):
                    raise TypeError(f"{name}: maps must be SliceMap instances")
                if m.values.ndim != 3 or m.values.shape[0] != n:
                    raise ValueError(
                        f"{name}.{m.name}: map must have shape (slices={n}, rows, cols), "
                        f"got {m.values.shape}"
                    )
                lo, hi = m.display_range
                if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
                    raise ValueError(f"{name}.{m.name}: display_range must be finite, lo < hi")
        set_(self, "scores", dict(self.scores))
        set_(self, "versions", dict(self.versions))

        try:
            set_(self, "decision", GateDecision(self.decision))
        except ValueError:
            raise ValueError(f"decision must be 'pass' or 'flag', got {self.decision!r}") from None
        if isinstance(self.reasons, str) or not isinstance(self.reasons, Sequence):
            raise TypeError('Argument "reasons" must be a sequence of strings.')
        for r in self.reasons:
            if not isinstance(r, str):
                raise TypeError('Items of "reasons" must be strings.')
        set_(self, "reasons", tuple(self.reasons))

        if isinstance(self.generation, bool) or not isinstance(self.generation, int):
            raise TypeError('Argument "generation" must be an int.')
        if self.generation < 1:
            raise ValueError('Argument "generation" must be >= 1.')
        if self.previous_sr is not None:
            prev = self.previous_sr
            if not isinstance(prev, Dataset):
                raise TypeError('Argument "previous_sr" must be a pydicom Dataset or None.')
            if not str(prev.get("SOPClassUID", "")).startswith(_SR_SOP_CLASS_PREFIX):
                raise ValueError('Argument "previous_sr" is not an SR document.')
            if prev.get("StudyInstanceUID") != vol.study_instance_uid:
                raise ValueError('Argument "previous_sr" belongs to another study.')
            if self.generation < 2:
                raise ValueError('A report with a "previous_sr" must have generation >= 2.')
        if isinstance(self.skipped, SkippedPart) or not isinstance(self.skipped, Sequence):
            raise TypeError('Argument "skipped" must be a sequence of SkippedPart.')
        for part in self.skipped:
            if not isinstance(part, SkippedPart):
                raise TypeError('Items of "skipped" must be SkippedPart instances.')
            if part.kind is PartKind.SCORER and part.name in self.scores:
                raise ValueError(f"scorer {part.name!r} is both scored and skipped")
        set_(self, "skipped", tuple(self.skipped))

    def dataset_for_slice(self, index: int) -> Dataset:
        """Return the source instance that slice ``index`` of the volume came from."""
        return self._by_uid[self.volume.sop_instance_uids[index]]

    def maps(self) -> list[NamedMap]:
        """All maps of all scorers, in scorer order then map order."""
        return [NamedMap(name, m) for name, out in self.scores.items() for m in out.maps]

    def select_map(self, name: str | None = None) -> NamedMap | None:
        """Pick the map to render.

        Parameters
        ----------
        name: Union[str, None], optional
            ``"<scorer>.<map>"`` or a bare map name (which must then be unambiguous).
            ``None`` selects the first map of the first scorer that has one.

        Returns
        -------
        Union[NamedMap, None]
            The selected map, or ``None`` if ``name`` is ``None`` and no scorer gave a map.

        Raises
        ------
        ValueError
            When ``name`` matches no map or more than one.
        """
        maps = self.maps()
        if name is None:
            return maps[0] if maps else None
        hits = [m for m in maps if name in (m.key, m.map.name)]
        if len(hits) != 1:
            known = ", ".join(m.key for m in maps) or "none"
            what = "no" if not hits else "more than one"
            raise ValueError(f"{what} map matches {name!r}; available: {known}")
        return hits[0]


def check_uid(name: str, value: object) -> None:
    """Raise TypeError/ValueError unless ``value`` is a valid DICOM UID string."""
    if not isinstance(value, str):
        raise TypeError(f'Argument "{name}" must be a str.')
    if len(value) > 64 or not RE_VALID_UID.match(value):
        raise ValueError(f'Argument "{name}" is not a valid UID: {value!r}')


def check_positive_int(name: str, value: object) -> None:
    """Raise TypeError/ValueError unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'Argument "{name}" must be an int.')
    if value < 1:
        raise ValueError(f'Argument "{name}" must be >= 1.')
