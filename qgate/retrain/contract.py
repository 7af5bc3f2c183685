"""The contract between the service's retraining and its training process (``qgate-train
retrain``): what goes in (an exported label file) and what comes out (a result file).

The service never imports ``training/``: it writes a :class:`TrainRequest` to
``<run dir>/labels.json``, runs ::

    qgate-train retrain --labels <run dir>/labels.json --out <run dir>

(``python -m training.cli retrain ...``; ``retrain.command`` in the config) as a child
process, and reads the :class:`TrainResult` from ``<run dir>/result.json``. The child
writes the candidate weights beside it (file names in the result, relative to the run
dir). Both files carry ``schema``; a child that writes another version is refused.

The child trains and measures; the service decides, registers and promotes. The split
into training and held-out series is made by the service (so a training process cannot
choose its own test set), and every path in the request is a local absolute path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: The exported label file in a run directory.
LABELS_FILE = "labels.json"
#: The result file the training process writes into the run directory.
RESULT_FILE = "result.json"
#: The training process's stdout and stderr.
LOG_FILE = "train.log"
#: The service's process ID, in the training process's environment: the training stops
#: when that process dies (Linux), so no orphan trains on after a crash or a restart.
PARENT_PID_ENV = "QGATE_RETRAIN_PARENT_PID"
#: The threads the training process may use (``retrain.threads``), in its environment
#: with ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``OPENBLAS_NUM_THREADS``; the
#: training sets torch's intra- and inter-op threads to it.
THREADS_ENV = "QGATE_RETRAIN_THREADS"

SCHEMA = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainParams(_Strict):
    """How to train (``retrain.*`` of the service's config)."""

    seed: int
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    pseudo_label_weight: float = Field(ge=0)
    slices_per_series: int = Field(ge=2)
    min_correlation_items: int = Field(ge=3)


class LabelledSeries(_Strict):
    """A reviewed series: its newest verdict's score (0-4, MD-IQA's scale) and its files."""

    uid: str
    score: float
    paths: list[Path] = Field(min_length=1)


class UnlabelledSeries(_Strict):
    """A recently scored series without a verdict (pseudo-labelled by the serving model)."""

    uid: str
    paths: list[Path] = Field(min_length=1)


class ServingWeights(_Strict):
    """Weights a family serves now: the registry version and the local file."""

    version: str
    path: Path


class TrainRequest(_Strict):
    """The exported label file: the data, the serving weights and how to train."""

    schema_version: Literal[1] = Field(SCHEMA, alias="schema")
    run_id: int
    params: TrainParams
    #: The serving MD-IQA weights (the candidate is fine-tuned from them).
    mdiqa: ServingWeights
    #: The serving Chest CT-IQA weights, whose quality module is refit; None: no refit.
    chestiqa: ServingWeights | None
    train: list[LabelledSeries] = Field(min_length=1)
    held_out: list[LabelledSeries] = Field(min_length=1)
    unlabelled: list[UnlabelledSeries] = Field(default_factory=list)
    #: An MD-IQA folder from ``qgate-train data build --task mdiqa``: its train split
    #: joins training, its test split the held-out set.
    simulated_dir: Path | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class HeldOut(_Strict):
    """A model's metrics on the held-out set: MAE always, the correlations (and Overall =
    |PLCC| + |SROCC| + |KROCC|) when there are enough items with non-constant labels."""

    n: int
    mae: float
    plcc: float | None = None
    srocc: float | None = None
    krocc: float | None = None
    overall: float | None = None


class LossCurve(_Strict):
    """The fine-tuning's loss per step, averaged to at most 100 points."""

    steps: int
    sup: list[float]
    pseudo: list[float] | None = None


class FineTuned(_Strict):
    """The fine-tuned family's candidate (MD-IQA) against the serving weights."""

    weights: str  # file name in the run dir
    candidate: HeldOut
    current: HeldOut
    #: The last step's loss of each term (``sup``, ``pseudo``).
    train_losses: dict[str, float]
    loss_curve: LossCurve


class QualityRefit(_Strict):
    """The refit family's candidate (Chest CT-IQA's linear quality module, 1-10 scale)."""

    weights: str  # file name in the run dir
    candidate: HeldOut
    current: HeldOut
    coef: list[float]
    intercept: float


class SimulatedCounts(_Strict):
    dir: str
    train: int
    test: int


class TrainData(_Strict):
    """What the training process read, beside the series the request named."""

    train_slices: int
    unlabelled_slices: int
    simulated: SimulatedCounts | None = None


class TrainResult(_Strict):
    """The result file: the candidates and both sides' held-out metrics."""

    schema_version: Literal[1] = Field(SCHEMA, alias="schema")
    run_id: int
    mdiqa: FineTuned
    chestiqa: QualityRefit | None = None
    data: TrainData

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
