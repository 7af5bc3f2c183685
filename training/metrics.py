"""Evaluation metrics of the three models, as the papers and the challenge define them.

* MD-IQA / LDCTIQAC2023: PLCC, SROCC, KROCC (scipy) and Overall = |PLCC| + |SROCC| +
  |KROCC| (:func:`correlations`).
* Noise2Quality: SSIM between the predicted and the true SSIM map, MSE and NRMSE
  (:func:`map_metrics`), dose-class accuracy.
* Chest CT-IQA: accuracy and F1 of the window and dose classes (:func:`classification`),
  SRCC, PLCC and RMSE of the SNR and BRISQUE regressions (:func:`regression`).

Every function takes numpy arrays or tensors and returns plain floats in a frozen
dataclass (``as_dict()`` for JSON). Undefined values (a constant input) are NaN, never
an exception: a report must be written even for a degenerate model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | list[float] | list[int]

__all__ = [
    "ClassMetrics",
    "Correlations",
    "MapMetrics",
    "RegressionMetrics",
    "classification",
    "correlations",
    "map_metrics",
    "monotone",
    "regression",
]


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy().astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def _finite_pair(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = _np(a).ravel(), _np(b).ravel()
    if x.shape != y.shape:
        raise ValueError(f"lengths differ: {x.shape} vs {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


@dataclass(frozen=True)
class Correlations:
    """PLCC, SROCC, KROCC and the challenge's Overall (sum of absolute values)."""

    plcc: float
    srocc: float
    krocc: float
    n: int

    @property
    def overall(self) -> float:
        return abs(self.plcc) + abs(self.srocc) + abs(self.krocc)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "overall": self.overall}


def correlations(pred: ArrayLike, target: ArrayLike) -> Correlations:
    """Pearson, Spearman and Kendall (tau-b) correlation of ``pred`` with ``target``.

    Non-finite pairs are dropped; fewer than 3 pairs or a constant side gives NaN.
    """
    from scipy import stats

    x, y = _finite_pair(pred, target)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlations(math.nan, math.nan, math.nan, len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = float(stats.pearsonr(x, y)[0])
        s = float(stats.spearmanr(x, y)[0])
        k = float(stats.kendalltau(x, y)[0])
    return Correlations(p, s, k, len(x))


@dataclass(frozen=True)
class RegressionMetrics:
    """SRCC, PLCC, RMSE and MAE of a regression against its targets."""

    srcc: float
    plcc: float
    rmse: float
    mae: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def regression(pred: ArrayLike, target: ArrayLike) -> RegressionMetrics:
    x, y = _finite_pair(pred, target)
    c = correlations(x, y)
    if len(x) == 0:
        return RegressionMetrics(math.nan, math.nan, math.nan, math.nan, 0)
    err = x - y
    return RegressionMetrics(
        srcc=c.srocc,
        plcc=c.plcc,
        rmse=float(np.sqrt(np.mean(err**2))),
        mae=float(np.mean(np.abs(err))),
        n=len(x),
    )


@dataclass(frozen=True)
class ClassMetrics:
    """Accuracy, macro F1, per-class F1 and the confusion matrix (rows: truth)."""

    accuracy: float
    f1_macro: float
    f1: tuple[float, ...]
    confusion: tuple[tuple[int, ...], ...]
    n: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def classification(pred: ArrayLike, target: ArrayLike, num_classes: int) -> ClassMetrics:
    """Class metrics of integer predictions; a class never predicted nor present has F1 NaN
    and is left out of the macro average."""
    p = _np(pred).astype(np.int64).ravel()
    t = _np(target).astype(np.int64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"lengths differ: {p.shape} vs {t.shape}")
    if p.size and (min(p.min(), t.min()) < 0 or max(p.max(), t.max()) >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes})")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    f1s: list[float] = []
    for c in range(num_classes):
        tp = cm[c, c]
        denom = 2 * tp + (cm[:, c].sum() - tp) + (cm[c, :].sum() - tp)
        f1s.append(float(2 * tp / denom) if denom else math.nan)
    valid = [f for f in f1s if not math.isnan(f)]
    return ClassMetrics(
        accuracy=float(np.trace(cm) / cm.sum()) if cm.sum() else math.nan,
        f1_macro=float(np.mean(valid)) if valid else math.nan,
        f1=tuple(f1s),
        confusion=tuple(tuple(int(v) for v in row) for row in cm),
        n=int(cm.sum()),
    )


@dataclass(frozen=True)
class MapMetrics:
    """Noise2Quality map metrics, each the mean over samples.

    ``ssim``: SSIM between predicted and true map (11 x 11 Gaussian, sigma 1.5, data
    range 1: SSIM maps live in [0, 1] on CT); ``mse``; ``nrmse``: ||pred - true|| /
    ||true|| (scikit-image's ``normalized_root_mse``, Euclidean); ``mean_abs_error`` of
    the per-image mean quality (what the service reports as ``mean_quality``).
    """

    ssim: float
    mse: float
    nrmse: float
    mean_quality_mae: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def map_metrics(pred: torch.Tensor, target: torch.Tensor) -> MapMetrics:
    """``pred`` and ``target``: (B, H, W) or (B, 1, H, W) maps."""
    from qgate.models.preprocess import ssim_map

    p = torch.as_tensor(pred).detach().float().cpu()
    t = torch.as_tensor(target).detach().float().cpu()
    if p.shape != t.shape:
        raise ValueError(f"shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    if p.ndim == 4:
        p, t = p[:, 0], t[:, 0]
    if p.ndim != 3 or len(p) == 0:
        raise ValueError(f"expected (B, H, W) maps, got {tuple(p.shape)}")
    ssim = ssim_map(p, t).mean(dim=(-2, -1))
    mse = ((p - t) ** 2).mean(dim=(-2, -1))
    nrmse = (p - t).flatten(1).norm(dim=1) / t.flatten(1).norm(dim=1).clamp_min(1e-12)
    mq = (p.mean(dim=(-2, -1)) - t.mean(dim=(-2, -1))).abs()
    return MapMetrics(
        ssim=float(ssim.mean()),
        mse=float(mse.mean()),
        nrmse=float(nrmse.mean()),
        mean_quality_mae=float(mq.mean()),
        n=len(p),
    )


def monotone(values: ArrayLike, *, decreasing: bool = True, strict: bool = False) -> bool:
    """True if ``values`` (ordered best acquisition first) never rise (``decreasing``; never
    fall otherwise) from one rung of a ladder to the next; ``strict``: ties fail too."""
    d = np.diff(_np(values).ravel())
    if not decreasing:
        d = -d
    return bool(np.all(d < 0) if strict else np.all(d <= 0))
