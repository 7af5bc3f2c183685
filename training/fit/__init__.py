"""Training of the three models: ``qgate-train fit --model {mdiqa,n2q,chest}``.

One module per model (:mod:`training.fit.mdiqa`, :mod:`training.fit.n2q`,
:mod:`training.fit.chest`) over a shared epoch loop (:mod:`training.fit.loop`), run
folders with resumable checkpoints (:mod:`training.fit.common`) and the weights format
the service loads (:mod:`training.fit.export`).
"""

from training.fit.chest import ChestFitConfig, fit_chest
from training.fit.export import load_weights, save_weights, sha256
from training.fit.mdiqa import STAGES, MdiqaFitConfig, fit_mdiqa
from training.fit.n2q import N2QFitConfig, fit_n2q

__all__ = [
    "STAGES",
    "ChestFitConfig",
    "MdiqaFitConfig",
    "N2QFitConfig",
    "fit_chest",
    "fit_mdiqa",
    "fit_n2q",
    "load_weights",
    "save_weights",
    "sha256",
]
