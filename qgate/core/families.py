"""The one table of learned model families: MD-IQA, Noise2Quality, Chest CT-IQA.

Every part of qgate that needs to know which model families exist reads :data:`FAMILIES`:
the scorers (:mod:`qgate.score.scorers.learned`), the scoring settings (``scoring.<name>``),
the model registry (:mod:`qgate.core.registry`), the retraining and the web app. A family's
``name`` is at once its scorer name, its registry kind, its ``scoring.<name>`` key, the
prefix of its model entry points (``<name>_tiny``) and the stem of its shipped weights
(``qgate/weights/<name>.safetensors``).

This module imports nothing of qgate, so anything (the settings included) may read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

#: A family's name; checked against :data:`FAMILIES` at import.
Family = Literal["mdiqa", "n2q", "chestiqa"]

#: Where the trained weights ship: ``qgate/weights/<name>.safetensors``.
SHIPPED_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

#: What the nightly retraining does with a family: fine-tune its weights, refit its linear
#: quality module, or leave it alone.
RetrainRole = Literal["fine_tune", "refit_quality", "none"]


@dataclass(frozen=True)
class ModelFamily:
    """One learned model family.

    Parameters
    ----------
    name : Family
        Scorer name, registry kind, ``scoring.<name>`` key and entry-point prefix.
    title : str
        How people read it (pages, reports).
    train_task : str
        Its ``qgate-train fit --model`` choice.
    per_slice : bool
        Scores one slice at a time (``scoring.<name>`` is a ``SliceScorerConfig``, with
        ``batch_size`` and ``max_slices``); else it reads the whole series.
    retrain : RetrainRole
        What the nightly retraining does with it.
    """

    name: Family
    title: str
    train_task: str
    per_slice: bool
    retrain: RetrainRole

    @property
    def shipped_weights(self) -> Path:
        """The weights it serves until a trained version is activated."""
        return SHIPPED_WEIGHTS_DIR / f"{self.name}.safetensors"

    @property
    def shipped_version(self) -> str:
        """The registry's name for the shipped weights."""
        return f"{self.name}-shipped"

    @property
    def entry_prefix(self) -> str:
        """The prefix of its model entry points (``mdiqa_tiny``, ``mdiqa_small``)."""
        return f"{self.name}_"


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("mdiqa", "MD-IQA", "mdiqa", per_slice=True, retrain="fine_tune"),
    ModelFamily("n2q", "Noise2Quality", "n2q", per_slice=True, retrain="none"),
    ModelFamily("chestiqa", "Chest CT-IQA", "chest", per_slice=False, retrain="refit_quality"),
)

#: The families' names, in table order.
FAMILY_NAMES: tuple[Family, ...] = tuple(f.name for f in FAMILIES)

_BY_NAME = {f.name: f for f in FAMILIES}
if set(FAMILY_NAMES) != set(get_args(Family)) or len(_BY_NAME) != len(FAMILIES):
    raise RuntimeError(f"the Family names {get_args(Family)} disagree with FAMILIES")


def family(name: str) -> ModelFamily:
    """The family called ``name``.

    Raises
    ------
    KeyError
        ``name`` is no learned model family.
    """
    try:
        return _BY_NAME[name]  # type: ignore[index]
    except KeyError:
        raise KeyError(
            f"unknown model family {name!r}; expected one of {', '.join(FAMILY_NAMES)}"
        ) from None


def is_family(name: str) -> bool:
    """Whether ``name`` is a learned model family (else a physics scorer, e.g. ``noise``)."""
    return name in _BY_NAME


def retrained(role: RetrainRole) -> ModelFamily:
    """The one family the retraining treats with ``role``."""
    (found,) = (f for f in FAMILIES if f.retrain == role)
    return found
