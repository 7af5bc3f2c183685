"""CT image-quality models (MD-IQA, Noise2Quality, Chest CT-IQA) behind one registry.

Importing this package registers every entry point: ``mdiqa_tiny``/``mdiqa_small``,
``n2q_tiny``/``n2q_small``, ``chestiqa_tiny``/``chestiqa_small``.
"""

from qgate.models import chestiqa, mdiqa, n2q
from qgate.models._registry import create_model, list_models, register_model
from qgate.models.chestiqa import ChestIQAConfig, ChestIQANet, QualityFit, predict_chestiqa
from qgate.models.mdiqa import MDIQA, MDIQAConfig, load_mdiqa, mdiqa_preprocess, save_mdiqa
from qgate.models.n2q import N2QConfig, N2QNet, predict_n2q

__all__ = [
    "MDIQA",
    "ChestIQAConfig",
    "ChestIQANet",
    "MDIQAConfig",
    "N2QConfig",
    "N2QNet",
    "QualityFit",
    "chestiqa",
    "create_model",
    "list_models",
    "load_mdiqa",
    "mdiqa",
    "mdiqa_preprocess",
    "n2q",
    "predict_chestiqa",
    "predict_n2q",
    "register_model",
    "save_mdiqa",
]
