"""Chest CT-IQA (Xun et al.): a 3-D VGG-style multi-task model for chest CT series.

A 3-D VGG backbone with BatchNorm reads a short volume; four separate fully connected
heads give the window/kernel class, the dose (exposure) class, and regressions of SNR
and BRISQUE. A linear "quality module" maps the four outputs to a clinician-like score
(1-10). Loss (paper eq. 3): ``50 CE(window) + 50 CE(exposure) + 5 MSE(SNR) +
1 MSE(BRISQUE)``.

From the paper (section 3.2): 5 feature-extraction parts, each [Conv, BatchNorm,
non-linearity, max-pool], "not too many convolutional layers" (one conv per part); four
unshared heads of three FC layers with ReLU and Dropout(0.5) after the first two
(Model 4 of Table 2); 2-class cross-entropy; MSE for the regressions; the published fit
``score = 6.1930 - 0.0536 X1 - 0.0256 X2 - 0.1192 X3 + 1.3802 X4``.

OUR choices (the paper gives no widths, input size or feature scaling):

- Widths 16-32-64-128-256 (``chestiqa_small``) and 8-16-32-64-128 (``chestiqa_tiny``):
  VGG's 64-128-256-512-512 cut to fit a ~10 MB budget and 2 CPU cores. One 3x3x3 conv per
  part, ReLU; a part pools depth only while the depth is >= 2, so any depth works.
- Global average pooling (``head_pool``) instead of VGG's flatten, so the heads do not
  depend on the input size; head hidden sizes 128, 64 (small) and 64, 32 (tiny).
- Input: see :class:`~qgate.models.preprocess.ChestInputConfig` (32 x 128 x 128, HU
  -1000..1000 -> [0, 1], plus a native-resolution noise channel).
- Class order: window 0 = ``soft_tissue`` (smooth kernel), 1 = ``lung`` (sharp kernel);
  dose 0 = ``low``, 1 = ``high``. Eq. 1 of the paper scores "class 1" as p, and the fit's
  X1 and X2 are the predictions P_window and P_exposure: we feed P(lung) and P(high).
- Regression outputs are parameterised as ``mean + std * z`` with ``mean``/``std``
  buffers (saved with the weights; set them from the training targets with
  :meth:`ChestIQANet.set_target_stats`). The loss is in raw target units by default, as
  in the paper (whose 50/50/5/1 weights balance raw magnitudes);
  ``normalised_reg_loss=True`` measures it in standard deviations instead.
- Quality-fit feature scaling, see :class:`QualityFitConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qgate.models._registry import register_model
from qgate.models.preprocess import (
    ArrayLike,
    ChestInputConfig,
    as_tensor,
    device_layout,
    inference_context,
    prepare_chest_input,
)

__all__ = [
    "PAPER_COEF",
    "PAPER_INTERCEPT",
    "ChestIQAConfig",
    "ChestIQANet",
    "ChestIQAOutput",
    "ChestIQAPrediction",
    "ChestIQATargets",
    "QualityFit",
    "QualityFitConfig",
    "QualityFitResult",
    "chestiqa_small",
    "chestiqa_tiny",
    "predict_chestiqa",
]

#: Published fit (section 4.3.3): weights of (window, exposure, SNR, BRISQUE), intercept.
PAPER_COEF: tuple[float, float, float, float] = (-0.0536, -0.0256, -0.1192, 1.3802)
PAPER_INTERCEPT: float = 6.1930


@dataclass(frozen=True)
class QualityFitConfig:
    """The quality module: ``score = intercept + sum(coef * scale * X)``.

    X = (P(lung window), P(high exposure), SNR, BRISQUE) as the model predicts them.

    Parameters
    ----------
    coef, intercept
        Default: the paper's published fit to the mean of two clinicians' 1-10 scores.
    feature_scale : tuple of 4 float
        Multiplies each feature before the fit. The paper does not say how SNR and
        BRISQUE were scaled; OUR defaults, reasoned from its tables:

        - window, exposure: 1 (probabilities in [0, 1]; Table 4's RMSEs of ~5.5 against
          scores around 6 fit values in [0, 1]).
        - BRISQUE: 0.01. Table 4 puts raw BRISQUE ~32 above the scores (~38 on its
          0-100 scale); an OLS intercept of 6.19 with a coefficient of 1.38 needs the
          BRISQUE feature near 0.4, i.e. BRISQUE / 100. Raw, the score would be ~55.
        - SNR: 0.05. The paper's SNR sat within ~4.5 of the scores (a few units);
          qgate's SNR ((HU + 1000) / sigma over soft-tissue ROIs, ``qgate.score.scorers.snr``)
          is ~25-100, so 0.05 brings it to that magnitude.
    use_probabilities : bool
        X1, X2 as class probabilities (default) or hard 0/1 labels.

    Note: the published fit correlates weakly with the clinicians (PLCC 0.33, SRCC 0.06)
    and its signs (SNR negative, BRISQUE positive) make the score *rise* with noise.
    Refit (:meth:`QualityFit.refit`) before gating on it.
    """

    coef: tuple[float, float, float, float] = PAPER_COEF
    intercept: float = PAPER_INTERCEPT
    feature_scale: tuple[float, float, float, float] = (1.0, 1.0, 0.05, 0.01)
    use_probabilities: bool = True


@dataclass(frozen=True)
class QualityFitResult:
    """A least-squares refit: coefficients (per scaled feature), intercept, in-sample fit."""

    coef: tuple[float, ...]
    intercept: float
    rmse: float
    plcc: float
    n: int


class QualityFit(nn.Module):
    """The linear quality module, its coefficients kept as buffers (saved with weights)."""

    def __init__(self, cfg: QualityFitConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or QualityFitConfig()
        self.use_probabilities = cfg.use_probabilities
        self.register_buffer("coef", torch.tensor(cfg.coef, dtype=torch.float32))
        self.register_buffer("intercept", torch.tensor([cfg.intercept], dtype=torch.float32))
        self.register_buffer("feature_scale", torch.tensor(cfg.feature_scale, dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 4) raw features -> (B,) score."""
        x = features.float() * self.feature_scale
        return x @ self.coef + self.intercept

    @torch.no_grad()
    def refit(
        self, features: ArrayLike, scores: ArrayLike, *, ridge: float = 0.0
    ) -> QualityFitResult:
        """Least-squares fit of the scores on the (scaled) features, stored in place.

        ``features``: (N, 4) raw (P(lung), P(high), SNR, BRISQUE), e.g. from
        :func:`predict_chestiqa`; ``scores``: (N,) review labels. ``ridge`` > 0 adds an
        L2 penalty on the coefficients (not the intercept), for few labels.
        """
        x = np.asarray(as_tensor(features, dtype=torch.float64).cpu(), dtype=np.float64)
        y = np.asarray(as_tensor(scores, dtype=torch.float64).cpu(), dtype=np.float64).ravel()
        if x.ndim != 2 or x.shape[1] != self.coef.numel() or len(x) != len(y):
            raise ValueError(f"need features (N, {self.coef.numel()}) and scores (N,)")
        if len(y) < 2:
            raise ValueError("need at least 2 labelled samples")
        xs = x * self.feature_scale.double().cpu().numpy()
        a = np.column_stack([np.ones(len(xs)), xs])
        if ridge > 0:
            pen = np.sqrt(ridge) * np.eye(a.shape[1])[1:]
            a_fit = np.vstack([a, pen])
            y_fit = np.concatenate([y, np.zeros(len(pen))])
        else:
            a_fit, y_fit = a, y
        beta, *_ = np.linalg.lstsq(a_fit, y_fit, rcond=None)
        self.intercept.copy_(torch.tensor([beta[0]]))
        self.coef.copy_(torch.from_numpy(beta[1:]))
        pred = a @ beta
        rmse = float(np.sqrt(np.mean((pred - y) ** 2)))
        plcc = float(np.corrcoef(pred, y)[0, 1]) if np.std(pred) > 0 and np.std(y) > 0 else math.nan
        return QualityFitResult(
            coef=tuple(float(b) for b in beta[1:]),
            intercept=float(beta[0]),
            rmse=rmse,
            plcc=plcc,
            n=len(y),
        )


@dataclass(frozen=True)
class ChestIQAConfig:
    """Chest CT-IQA architecture, loss and input.

    Parameters
    ----------
    widths : tuple of int
        Channels of the feature-extraction parts (paper: 5 parts; widths ours).
    convs_per_stage : int
        Conv-BN-ReLU units per part before its max-pool (paper: 1).
    head_hidden : tuple of int
        Hidden sizes of the three-layer FC heads (ours: 128, 64).
    head_dropout : float
        Dropout after each hidden FC layer (paper: 0.5).
    head_pool : tuple of int
        Adaptive average pool of the last feature map before the heads (ours: global).
    window_labels, dose_labels : tuple of str
        Class names, index 1 being the paper's "class 1" (the probability the fit uses).
    loss_weights : tuple of 4 float
        (window, exposure, SNR, BRISQUE) (paper: 50, 50, 5, 1).
    reg_loss : {"mse", "l1"}
        Regression loss (paper: MSE).
    normalised_reg_loss : bool
        Regression loss in units of the target std (``set_target_stats``) rather than
        raw units (paper: raw).
    quality : QualityFitConfig
        The quality module's default coefficients and feature scaling.
    input : ChestInputConfig
        Preprocessing; decides the number of input channels.
    """

    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    convs_per_stage: int = 1
    head_hidden: tuple[int, ...] = (128, 64)
    head_dropout: float = 0.5
    head_pool: tuple[int, int, int] = (1, 1, 1)
    window_labels: tuple[str, str] = ("soft_tissue", "lung")
    dose_labels: tuple[str, str] = ("low", "high")
    loss_weights: tuple[float, float, float, float] = (50.0, 50.0, 5.0, 1.0)
    reg_loss: Literal["mse", "l1"] = "mse"
    normalised_reg_loss: bool = False
    quality: QualityFitConfig = field(default_factory=QualityFitConfig)
    input: ChestInputConfig = field(default_factory=ChestInputConfig)

    def __post_init__(self) -> None:
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"need positive widths, got {self.widths}")
        if self.convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be >= 1, got {self.convs_per_stage}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if len(self.loss_weights) != 4:
            raise ValueError(f"loss_weights needs 4 values, got {self.loss_weights}")
        if self.reg_loss not in ("mse", "l1"):
            raise ValueError(f"reg_loss must be 'mse' or 'l1', got {self.reg_loss!r}")

    @property
    def in_chans(self) -> int:
        return self.input.in_chans


class ChestIQAOutput(NamedTuple):
    """Logits (B, 2) for window and dose; SNR and BRISQUE (B,) in target units."""

    window_logits: torch.Tensor
    dose_logits: torch.Tensor
    snr: torch.Tensor
    brisque: torch.Tensor


@dataclass
class ChestIQATargets:
    """Training targets, each (B,); a ``None`` term is left out of the loss."""

    window: torch.Tensor | None = None
    dose: torch.Tensor | None = None
    snr: torch.Tensor | None = None
    brisque: torch.Tensor | None = None


class _Pool(nn.Module):
    """2 x 2 x 2 max-pool that stops pooling depth once it is down to one slice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(x, (2 if x.shape[2] >= 2 else 1, 2, 2))


def _stage(in_ch: int, out_ch: int, n_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_convs):
        layers += [
            nn.Conv3d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm3d(out_ch),
            nn.ReLU(inplace=True),
        ]
    layers.append(_Pool())
    return nn.Sequential(*layers)


def _mlp(in_f: int, hidden: Sequence[int], out_f: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_f, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        in_f = h
    layers.append(nn.Linear(in_f, out_f))
    return nn.Sequential(*layers)


class ChestIQANet(nn.Module):
    """The Chest CT-IQA network: 3-D VGG backbone, four heads, linear quality module.

    Interface as timm models: :meth:`forward_features` (pooled features (B, F)),
    :meth:`forward_head`, :meth:`forward`; plus :meth:`quality_features` and
    :meth:`score` for the quality module.
    """

    def __init__(self, cfg: ChestIQAConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ChestIQAConfig()
        chans = (cfg.in_chans, *cfg.widths)
        self.features = nn.Sequential(
            *(_stage(chans[i], chans[i + 1], cfg.convs_per_stage) for i in range(len(cfg.widths)))
        )
        self.pool = nn.AdaptiveAvgPool3d(cfg.head_pool)
        self.num_features = cfg.widths[-1] * math.prod(cfg.head_pool)
        self.window_head = self._head(2)
        self.dose_head = self._head(2)
        self.snr_head = self._head(1)
        self.brisque_head = self._head(1)
        # (SNR, BRISQUE) output parameterisation: value = mean + std * head output.
        self.register_buffer("reg_mean", torch.zeros(2))
        self.register_buffer("reg_std", torch.ones(2))
        self.quality = QualityFit(cfg.quality)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def _head(self, n_out: int) -> nn.Sequential:
        return _mlp(self.num_features, self.cfg.head_hidden, n_out, self.cfg.head_dropout)

    @property
    def data_config(self) -> ChestInputConfig:
        """The preprocessing this model expects (see :func:`prepare_chest_input`)."""
        return self.cfg.input

    def set_target_stats(self, *, snr: tuple[float, float], brisque: tuple[float, float]) -> None:
        """Set the (mean, std) of the SNR and BRISQUE targets (call before training)."""
        if snr[1] <= 0 or brisque[1] <= 0:
            raise ValueError("target std must be > 0")
        self.reg_mean.copy_(torch.tensor([snr[0], brisque[0]]))
        self.reg_std.copy_(torch.tensor([snr[1], brisque[1]]))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)

    def forward_head(self, feats: torch.Tensor) -> ChestIQAOutput:
        mean, std = self.reg_mean.to(feats.dtype), self.reg_std.to(feats.dtype)
        return ChestIQAOutput(
            window_logits=self.window_head(feats),
            dose_logits=self.dose_head(feats),
            snr=mean[0] + std[0] * self.snr_head(feats)[:, 0],
            brisque=mean[1] + std[1] * self.brisque_head(feats)[:, 0],
        )

    def forward(self, x: torch.Tensor) -> ChestIQAOutput:
        return self.forward_head(self.forward_features(x))

    def quality_features(self, out: ChestIQAOutput) -> torch.Tensor:
        """(B, 4) quality-module inputs: P(lung), P(high dose), SNR, BRISQUE."""
        if self.quality.use_probabilities:
            pw = out.window_logits.float().softmax(1)[:, 1]
            pd = out.dose_logits.float().softmax(1)[:, 1]
        else:
            pw = out.window_logits.argmax(1).float()
            pd = out.dose_logits.argmax(1).float()
        return torch.stack([pw, pd, out.snr.float(), out.brisque.float()], dim=1)

    def score(self, out: ChestIQAOutput) -> torch.Tensor:
        """(B,) clinician-like quality score from the quality module."""
        return self.quality(self.quality_features(out))

    def loss(
        self, out: ChestIQAOutput, targets: ChestIQATargets
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Paper eq. 3: weighted CE + CE + regression + regression. Returns (total, parts)."""
        w_win, w_dose, w_snr, w_bri = self.cfg.loss_weights
        reg = F.mse_loss if self.cfg.reg_loss == "mse" else F.l1_loss
        parts: dict[str, torch.Tensor] = {}
        total = out.snr.new_zeros((), dtype=torch.float32)
        if targets.window is not None:
            parts["window"] = F.cross_entropy(out.window_logits.float(), targets.window.long())
            total = total + w_win * parts["window"]
        if targets.dose is not None:
            parts["dose"] = F.cross_entropy(out.dose_logits.float(), targets.dose.long())
            total = total + w_dose * parts["dose"]
        for i, (name, pred, tgt, wt) in enumerate(
            (("snr", out.snr, targets.snr, w_snr), ("brisque", out.brisque, targets.brisque, w_bri))
        ):
            if tgt is None:
                continue
            p, t = pred.float(), tgt.to(pred.device).float()
            if self.cfg.normalised_reg_loss:
                p = (p - self.reg_mean[i]) / self.reg_std[i]
                t = (t - self.reg_mean[i]) / self.reg_std[i]
            parts[name] = reg(p, t)
            total = total + wt * parts[name]
        return total, parts


def _build(base: ChestIQAConfig, overrides: dict[str, Any]) -> ChestIQANet:
    # replace() rejects unknown fields here, at the entry point, not deep in the model.
    return ChestIQANet(replace(base, **overrides) if overrides else base)


@register_model
def chestiqa_small(**overrides: Any) -> ChestIQANet:
    """Chest CT-IQA, widths 16-32-64-128-256, heads 128-64 (~1.34 M parameters, 5.4 MB)."""
    return _build(ChestIQAConfig(), overrides)


@register_model
def chestiqa_tiny(**overrides: Any) -> ChestIQANet:
    """Chest CT-IQA, widths 8-16-32-64-128, heads 64-32 (~0.34 M parameters, 1.3 MB)."""
    return _build(ChestIQAConfig(widths=(8, 16, 32, 64, 128), head_hidden=(64, 32)), overrides)


# --------------------------------------------------------------------------- inference


@dataclass
class ChestIQAPrediction:
    """Chest CT-IQA outputs for one series (the ``scores.chestiqa`` fields, and more)."""

    window_class: str
    window_prob: float  # P(window_labels[1]), "lung" by default
    dose_class: str
    dose_prob: float  # P(dose_labels[1]), "high" by default
    snr: float
    brisque: float
    score: float
    features: tuple[float, float, float, float]  # quality-module inputs, for refits

    def series_json(self) -> dict[str, float | str]:
        """The ``scores.chestiqa`` fields of the results JSON."""
        return {
            "window_class": self.window_class,
            "dose_class": self.dose_class,
            "snr": self.snr,
            "brisque": self.brisque,
            "score": self.score,
        }


def predict_chestiqa(
    model: ChestIQANet, hu: ArrayLike, *, pixel_mm: float | None = None, amp: bool = True
) -> ChestIQAPrediction:
    """Run Chest CT-IQA on a series in HU, (S, H, W) sorted along the patient axis.

    ``pixel_mm`` (in-plane spacing) is required by inputs on a physical field
    (``ChestInputConfig.fov_mm``, ``pixel_channel``).

    The model is put in eval mode and runs on its own device; preprocessing
    (``model.data_config``) runs there too. On CUDA: channels_last_3d and bf16 autocast.
    """
    if not isinstance(model, ChestIQANet):
        raise TypeError(f"model must be a ChestIQANet, got {type(model).__name__}")
    model.eval()
    device = next(model.parameters()).device
    hu_t = as_tensor(hu)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last_3d)
    with inference_context(device, amp=amp):
        x = prepare_chest_input(
            hu_t.to(device, non_blocking=True), model.data_config, pixel_mm=pixel_mm
        )
        out = model(device_layout(x))
        feats = model.quality_features(out)
        score = model.quality(feats)
    f = feats[0].float().cpu().tolist()
    cfg = model.cfg
    return ChestIQAPrediction(
        window_class=cfg.window_labels[int(out.window_logits[0].argmax())],
        window_prob=float(out.window_logits[0].float().softmax(0)[1]),
        dose_class=cfg.dose_labels[int(out.dose_logits[0].argmax())],
        dose_prob=float(out.dose_logits[0].float().softmax(0)[1]),
        snr=float(out.snr[0]),
        brisque=float(out.brisque[0]),
        score=float(score[0]),
        features=(f[0], f[1], f[2], f[3]),
    )
