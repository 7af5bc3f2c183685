"""Nightly retraining: fine-tune MD-IQA on the radiologists' scores and promote it only if
it beats the serving model on held-out series (issue 5).

The service schedules, compares and promotes; the training itself runs in a child
process, so the service never imports ``training/`` (issue 11). One run
(:func:`run_retrain`, from the scheduler in :mod:`qgate.housekeeping.schedule` or ``qgate retrain
--now``), under a cluster-wide lock:

1. :mod:`~qgate.retrain.runs`: a ``training_runs`` row, ``running``, owned by this process.
2. :mod:`~qgate.retrain.labels`: the reviewed series, their scores and files, the held-out
   split by patient, the recent unreviewed series and the serving weights, exported to
   ``storage.root/models/run-<id>/labels.json``.
3. :mod:`~qgate.retrain.child`: ``qgate-train retrain --labels ... --out ...`` (the
   contract: :mod:`~qgate.retrain.contract`) trains the candidates and writes their
   weights and ``result.json`` beside the label file.
4. :mod:`~qgate.retrain.promote`: the decision on the held-out metrics, a
   :class:`~qgate.core.db.models.ModelVersion` per candidate, activated only when promoted
   (the worker reloads between jobs).
5. The run's row: status promoted|rejected|failed, the promoted families, both models'
   metrics, the fine-tuning's loss curve, the reason.
"""

from qgate.retrain.labels import NotEnoughData, reviewed_labels, split_groups
from qgate.retrain.promote import CHEST_PROMOTED, decide
from qgate.retrain.run import RETRAIN_LOCK, RetrainBusy, RetrainOutcome, run_retrain
from qgate.retrain.runs import Trigger, recover_interrupted_runs

__all__ = [
    "CHEST_PROMOTED",
    "RETRAIN_LOCK",
    "NotEnoughData",
    "RetrainBusy",
    "RetrainOutcome",
    "Trigger",
    "decide",
    "recover_interrupted_runs",
    "reviewed_labels",
    "run_retrain",
    "split_groups",
]
