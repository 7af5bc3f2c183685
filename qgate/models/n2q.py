"""Noise2Quality (Haque, Wang, Imran): a per-pixel SSIM map from one CT slice.

A U-Net on [image, high-pass image] (2 channels, as in the paper; the public notebook
forgot the concatenation) predicts the SSIM map between the low-dose slice and its
(unseen) full-dose counterpart, and a self-supervised head on the pooled bottleneck
classifies the dose level (5, 10, 25, 50, 75 %). Loss (paper eq. 1):
``MSE(map, SSIM) + alpha * CE(dose)``, alpha 0.01.

From the paper / public notebook (``shared/papers/FACTS.md``): 5 levels of widths
16-32-64-128-256, each 2 x [conv3x3, InstanceNorm, LeakyReLU 0.2], dropout 0.25, bilinear
upsampling with skips, 1x1 conv + tanh out, Linear(256, 5) dose head, C40/W300 window,
256 x 256 input.

OUR choices (the paper is silent; each is a config field):

- Down-sampling by 2 x 2 max-pooling; the decoder upsamples bilinearly to the skip's size
  (any input size >= 16 works), concatenates [skip, upsampled] and runs one double conv
  down to the skip's width.
- Dropout2d(0.25) after the bottleneck block and after each decoder block, not in the
  encoder: the shallow encoder features feed the skips that a pixel-accurate map needs.
- InstanceNorm with learnable affine; conv bias off where a norm follows.
- The tanh output *is* the SSIM value: SSIM lies in [-1, 1] and tanh in (-1, 1), so no
  affine remapping is needed and the MSE is taken against the raw SSIM map. CT SSIM maps
  lie almost entirely in [0, 1] (display range); a map value of 1 (identical to full
  dose) is approached but never reached.
- Input at the slice's own pixel grid (``N2QInputConfig.size=None``): no resize, so
  the noise texture reaches the network at full strength; training on native crops
  (the map is local), serving on the whole slice (the U-Net is fully convolutional).
- Noise statistics (``noise_stats``, default on): the dose level is a *global noise
  amplitude*, and every InstanceNorm divides it out of the features (the first version's
  dose head, fed only the pooled bottleneck, stayed at chance). So the first conv of
  level 0 is also applied, with no norm after it, to the input minus its 3 x 3 local
  mean (the fine texture): per channel, the mean over the in-window pixels (the image
  channel strictly inside (0, 1)) of log(h^2 + 1e-6), i.e. the log energy of that
  native-scale filter on soft tissue (:func:`qgate.models.layers.texture_log_energy`),
  standardised by a BatchNorm1d (:class:`qgate.models.layers.StatNorm`). That vector
  (width[0]) is concatenated to the pooled bottleneck for the dose head, and projected
  (Linear, zero-initialised) to a per-channel bias on the last decoder features, so the
  map also knows the slice's noise level.
  ``noise_stats=False`` is the paper's head alone.
- Served as 128 px windows (``N2QInputConfig.tile``), the training context, and with
  the map set to exactly 1 where the slice lies below the label window's floor over the
  whole SSIM support (``N2QInputConfig.floor_hu``: two equal constant patches), which the
  network only approximates over air.
- Dose head: global average pool of the bottleneck (+ the noise statistics) ->
  Linear(width[-1] (+ width[0]), 5), no dropout.

Entry points: ``n2q_small`` (the paper's widths, 1.97 M parameters, 7.9 MB in float32;
3.5 GMAC per 256 x 256 slice) and ``n2q_tiny`` (base width 8, 0.49 M, 2.0 MB; 0.88 GMAC),
for CPU serving and CI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qgate.models._registry import register_model
from qgate.models.layers import InstanceNorm2d, StatNorm, texture_log_energy
from qgate.models.preprocess import (
    ArrayLike,
    N2QInputConfig,
    as_tensor,
    below_floor,
    device_layout,
    inference_context,
    prepare_n2q_input,
)

__all__ = [
    "N2QConfig",
    "N2QNet",
    "N2QOutput",
    "N2QPrediction",
    "N2QTargets",
    "n2q_small",
    "n2q_tiny",
    "predict_n2q",
]

NormName = Literal["instance", "batch", "group", "none"]


@dataclass(frozen=True)
class N2QConfig:
    """Noise2Quality architecture, loss and input.

    Parameters
    ----------
    widths : tuple of int
        Channels of the 5 levels, shallow to deep (paper: 16-32-64-128-256).
    dose_levels : tuple of int
        Dose of each class, percent of routine dose (paper: 5, 10, 25, 50, 75).
    norm : {"instance", "batch", "group", "none"}
        Normalisation in each conv unit (paper: instance).
    negative_slope : float
        LeakyReLU slope (paper: 0.2).
    dropout : float
        Dropout2d probability (paper: 0.25) after the bottleneck and decoder blocks.
    alpha : float
        Weight of the dose cross-entropy (paper: 0.01).
    init_quality : float
        SSIM the untrained map starts at (ours: 0.5, mid-range of CT SSIM maps).
    map_loss : {"mse", "l1"}
        Map loss (paper: MSE; the notebook used L1).
    noise_stats : bool
        Native-scale noise statistics for the dose head and the map (ours; see the
        module docstring). ``False``: the paper's pooled-bottleneck head only.
    input : N2QInputConfig
        Preprocessing; decides the number of input channels.
    """

    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    dose_levels: tuple[int, ...] = (5, 10, 25, 50, 75)
    norm: NormName = "instance"
    negative_slope: float = 0.2
    dropout: float = 0.25
    alpha: float = 0.01
    init_quality: float = 0.5
    map_loss: Literal["mse", "l1"] = "mse"
    noise_stats: bool = True
    input: N2QInputConfig = field(default_factory=N2QInputConfig)

    def __post_init__(self) -> None:
        if len(self.widths) < 2 or any(w < 1 for w in self.widths):
            raise ValueError(f"need >= 2 positive widths, got {self.widths}")
        if len(self.dose_levels) < 2:
            raise ValueError(f"need >= 2 dose levels, got {self.dose_levels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in ("instance", "batch", "group", "none"):
            raise ValueError(f"unknown norm {self.norm!r}")
        if not -1.0 < self.init_quality < 1.0:
            raise ValueError(f"init_quality must be in (-1, 1), got {self.init_quality}")
        if self.map_loss not in ("mse", "l1"):
            raise ValueError(f"map_loss must be 'mse' or 'l1', got {self.map_loss!r}")

    @property
    def in_chans(self) -> int:
        return self.input.in_chans

    @property
    def num_classes(self) -> int:
        return len(self.dose_levels)


class N2QOutput(NamedTuple):
    """``quality_map``: (B, 1, H, W) predicted SSIM in (-1, 1); ``dose_logits``: (B, K)."""

    quality_map: torch.Tensor
    dose_logits: torch.Tensor


@dataclass
class N2QTargets:
    """Training targets: the SSIM map (B, 1, H, W) and the dose class index (B,)."""

    quality_map: torch.Tensor
    dose: torch.Tensor | None = None


def _norm(name: NormName, ch: int) -> nn.Module:
    if name == "instance":
        return InstanceNorm2d(ch, affine=True)
    if name == "batch":
        return nn.BatchNorm2d(ch)
    if name == "group":
        return nn.GroupNorm(math.gcd(8, ch), ch)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    """2 x [conv3x3, norm, LeakyReLU], then optional Dropout2d."""

    def __init__(
        self, in_ch: int, out_ch: int, *, norm: NormName, slope: float, dropout: float
    ) -> None:
        layers: list[nn.Module] = []
        for c_in in (in_ch, out_ch):
            layers += [
                nn.Conv2d(c_in, out_ch, 3, padding=1, bias=norm == "none"),
                _norm(norm, out_ch),
                nn.LeakyReLU(slope, inplace=True),
            ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class N2QNet(nn.Module):
    """The Noise2Quality U-Net with its dose-level head.

    Interface as timm models: :meth:`forward_features` (encoder features, shallow to
    bottleneck), :meth:`forward_head`, :meth:`forward`, :meth:`reset_classifier`.
    """

    def __init__(self, cfg: N2QConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or N2QConfig()
        w = cfg.widths
        blk = {"norm": cfg.norm, "slope": cfg.negative_slope}
        n = len(w)
        self.encoder = nn.ModuleList(
            DoubleConv(
                cfg.in_chans if i == 0 else w[i - 1],
                w[i],
                dropout=cfg.dropout if i == n - 1 else 0.0,
                **blk,
            )
            for i in range(n)
        )
        # decoder[i] brings level i+1 up to level i (built deep-to-shallow order below).
        self.decoder = nn.ModuleList(
            DoubleConv(w[i] + w[i + 1], w[i], dropout=cfg.dropout, **blk) for i in range(n - 1)
        )
        self.map_head = nn.Conv2d(w[0], 1, 1)
        self.dose_head = nn.Linear(self._dose_features, cfg.num_classes)
        # Standardised across the batch (running statistics when serving): the raw log
        # energies sit near -8 and differ by a few units between dose levels.
        self.noise_norm = StatNorm(w[0]) if cfg.noise_stats else None
        self.noise_to_map = nn.Linear(w[0], w[0]) if cfg.noise_stats else None
        self._init_weights()

    @property
    def _dose_features(self) -> int:
        return self.cfg.widths[-1] + (self.cfg.widths[0] if self.cfg.noise_stats else 0)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(
                    m.weight, a=self.cfg.negative_slope, nonlinearity="leaky_relu"
                )
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Start the map flat at init_quality, in tanh's linear range, so early steps
        # learn the image dependence instead of spending themselves on the offset.
        nn.init.normal_(self.map_head.weight, std=1e-2)
        nn.init.constant_(self.map_head.bias, math.atanh(self.cfg.init_quality))
        if self.noise_to_map is not None:  # starts as the plain U-Net
            nn.init.zeros_(self.noise_to_map.weight)
            nn.init.zeros_(self.noise_to_map.bias)

    @property
    def data_config(self) -> N2QInputConfig:
        """The preprocessing this model expects (see :func:`prepare_n2q_input`)."""
        return self.cfg.input

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats: list[torch.Tensor] = []
        for i, block in enumerate(self.encoder):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            feats.append(x)
        return feats

    def noise_stats(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) input -> (B, width[0]) log energy of level 0's first conv, before
        its norm, over the in-window pixels (see the module docstring)."""
        img = x[:, :1]
        stats = texture_log_energy(self.encoder[0][0], x, (img > 0.0) & (img < 1.0))
        return self.noise_norm(stats) if self.noise_norm is not None else stats

    def forward_head(
        self, feats: list[torch.Tensor], stats: torch.Tensor | None = None
    ) -> N2QOutput:
        bottleneck = feats[-1]
        pooled = bottleneck.mean(dim=(-2, -1))
        if self.cfg.noise_stats:
            if stats is None:
                raise ValueError("this model needs noise_stats(x): call forward(x)")
            pooled = torch.cat([pooled, stats.to(pooled.dtype)], dim=1)
        dose_logits = self.dose_head(pooled)
        x = bottleneck
        for i in range(len(feats) - 2, -1, -1):
            skip = feats[i]
            up = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.decoder[i](torch.cat([skip, up], dim=1))
        if self.noise_to_map is not None and stats is not None:
            x = x + self.noise_to_map(stats.to(x.dtype))[..., None, None]
        return N2QOutput(torch.tanh(self.map_head(x)), dose_logits)

    def forward(self, x: torch.Tensor) -> N2QOutput:
        stats = self.noise_stats(x) if self.cfg.noise_stats else None
        return self.forward_head(self.forward_features(x), stats)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the dose head (e.g. for other dose levels)."""
        self.dose_head = nn.Linear(self._dose_features, num_classes)

    def loss(
        self, out: N2QOutput, targets: N2QTargets
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Paper eq. 1: map loss + alpha * CE(dose). Returns (total, parts)."""
        pred = out.quality_map.float()
        tgt = targets.quality_map.to(pred.dtype)
        if tgt.shape != pred.shape:
            raise ValueError(f"target map {tuple(tgt.shape)} != prediction {tuple(pred.shape)}")
        map_l = F.mse_loss(pred, tgt) if self.cfg.map_loss == "mse" else F.l1_loss(pred, tgt)
        parts = {"map": map_l}
        total = map_l
        if targets.dose is not None and self.cfg.alpha > 0:
            ce = F.cross_entropy(out.dose_logits.float(), targets.dose.long())
            parts["dose"] = ce
            total = total + self.cfg.alpha * ce
        return total, parts


def _build(base: N2QConfig, overrides: dict[str, Any]) -> N2QNet:
    # replace() rejects unknown fields here, at the entry point, not deep in the model.
    return N2QNet(replace(base, **overrides) if overrides else base)


@register_model
def n2q_small(**overrides: Any) -> N2QNet:
    """Noise2Quality at the paper's widths 16-32-64-128-256 (1.97 M parameters)."""
    return _build(N2QConfig(), overrides)


@register_model
def n2q_tiny(**overrides: Any) -> N2QNet:
    """Noise2Quality at half the paper's widths, 8-16-32-64-128 (0.49 M parameters)."""
    return _build(N2QConfig(widths=(8, 16, 32, 64, 128)), overrides)


# --------------------------------------------------------------------------- inference


@dataclass
class N2QPrediction:
    """Noise2Quality outputs for a series.

    ``maps``: (S, H, W) float32 predicted SSIM (at the input grid, or the model's with
    ``map_size="model"``; ``None`` if not requested). ``slice_quality``: mean predicted
    SSIM over the mask, per slice (NaN where a slice's mask is empty).
    ``mean_quality``: the same over the mask of the whole series.
    ``dose_probs``: (S, K) softmax per slice. ``dose_class``: the dose level (percent of
    routine dose) with the highest mean probability over the slices with body.
    """

    maps: np.ndarray | None
    slice_quality: np.ndarray
    mean_quality: float
    dose_probs: np.ndarray
    dose_class: int
    dose_levels: tuple[int, ...]

    @property
    def slice_dose_class(self) -> list[int]:
        return [self.dose_levels[i] for i in self.dose_probs.argmax(axis=1).tolist()]

    def series_json(self) -> dict[str, float | int]:
        """The ``scores.n2q`` fields of the results JSON."""
        return {"mean_quality": self.mean_quality, "dose_class": self.dose_class}


def _tile_starts(n: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, n - tile + 1, stride))
    if starts[-1] != n - tile:
        starts.append(n - tile)  # the last window flush with the border
    return starts


def forward_tiled(
    model: N2QNet, x: torch.Tensor, tile: int, stride: int | None = None
) -> N2QOutput:
    """``model`` on ``tile`` x ``tile`` windows of a prepared input (B, C, H, W); the map
    is averaged where windows overlap, the dose probabilities over the windows weighted by
    their share of in-window pixels (image channel strictly inside (0, 1): an all-air
    window shows no noise and would vote for full dose), returned as their log, so
    ``softmax`` gives them back. An axis no longer than ``tile`` is taken whole. See
    :class:`~qgate.models.preprocess.N2QInputConfig` (``tile``)."""
    b, _, h, w = x.shape
    if h <= tile and w <= tile:
        return model(x)
    step = stride or tile
    th, tw = min(tile, h), min(tile, w)
    rows = _tile_starts(h, th, step) if h > th else [0]
    cols = _tile_starts(w, tw, step) if w > tw else [0]
    where = [(r, c) for r in rows for c in cols]
    acc = x.new_zeros((b, 1, h, w), dtype=torch.float32)
    cnt = x.new_zeros((1, 1, h, w), dtype=torch.float32)
    # every window of the batch in one pass (with stride 96: 1.56x the batch's pixels)
    windows = torch.stack([x[:, :, r : r + th, c : c + tw] for r, c in where], dim=1)
    out = model(windows.reshape(b * len(where), *windows.shape[2:]))
    qmap = out.quality_map.float().reshape(b, len(where), 1, th, tw)
    prob = out.dose_logits.float().softmax(dim=1).reshape(b, len(where), -1)
    for k, (r, c) in enumerate(where):
        acc[:, :, r : r + th, c : c + tw] += qmap[:, k]
        cnt[:, :, r : r + th, c : c + tw] += 1
    img = windows[:, :, 0]
    share = ((img > 0) & (img < 1)).float().mean(dim=(-2, -1)) + 1e-3  # (b, windows)
    probs = (prob * share[..., None]).sum(dim=1) / share.sum(dim=1, keepdim=True)
    return N2QOutput(acc / cnt, probs.clamp_min(1e-12).log())


def predict_n2q(
    model: N2QNet,
    hu: ArrayLike,
    body_mask: ArrayLike | None = None,
    *,
    batch_size: int = 8,
    amp: bool = True,
    map_size: Literal["input", "model"] = "input",
    return_maps: bool = True,
) -> N2QPrediction:
    """Run Noise2Quality on the slices of a series.

    Parameters
    ----------
    model : N2QNet
        Put in eval mode here; runs on its own device. On CUDA: channels_last and bf16
        autocast (``amp``).
    hu : array (S, H, W) or (H, W)
        Slices in HU. Preprocessed with ``model.data_config`` on the model's device.
    body_mask : bool array like ``hu``, optional
        Pixels to average the map over; ``None``: every pixel.
    batch_size : int
        Slices per forward pass.
    map_size : {"input", "model"}
        Grid of the returned maps and of the averaging: the input grid (the map is
        bilinearly upsampled) or the model's (the mask is area-resized, kept >= 0.5).
        With a native-grid model (``input.size=None``) both are the input grid.
    return_maps : bool
        ``False`` saves memory when only the summary values are needed.
    """
    if not isinstance(model, N2QNet):
        raise TypeError(f"model must be an N2QNet, got {type(model).__name__}")
    hu_t = as_tensor(hu)
    if hu_t.ndim == 2:
        hu_t = hu_t[None]
    if hu_t.ndim != 3:
        raise ValueError(f"hu must be (slices, rows, cols), got shape {tuple(hu_t.shape)}")
    mask_t = None
    if body_mask is not None:
        mask_t = torch.as_tensor(
            np.asarray(body_mask) if not isinstance(body_mask, torch.Tensor) else body_mask
        )
        mask_t = mask_t.reshape(hu_t.shape).bool()
    model.eval()
    device = next(model.parameters()).device
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    n, h, w = hu_t.shape
    size = model.cfg.input.size
    out_hw = (h, w) if map_size == "input" or size is None else (size, size)
    maps: list[np.ndarray] = []
    sums = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    probs: list[torch.Tensor] = []
    with inference_context(device, amp=amp):
        for s in range(0, n, batch_size):
            part = hu_t[s : s + batch_size].to(device, non_blocking=True)
            x = prepare_n2q_input(part, model.data_config)
            tile = model.data_config.tile
            if tile is None:
                out = model(device_layout(x))
            else:
                out = forward_tiled(model, device_layout(x), tile, model.data_config.tile_stride)
            qmap = out.quality_map.float()
            floor = below_floor(part, model.data_config)
            if floor is not None:  # SSIM is exactly 1 there (N2QInputConfig.floor_hu)
                qmap = torch.where(floor[:, None], torch.ones_like(qmap), qmap)
            if tuple(qmap.shape[-2:]) != out_hw:
                qmap = F.interpolate(qmap, size=out_hw, mode="bilinear", align_corners=False)
            qmap = qmap[:, 0]
            if mask_t is None:
                m = torch.ones_like(qmap)
            else:
                m = mask_t[s : s + batch_size].to(device).float()
                if tuple(m.shape[-2:]) != out_hw:
                    m = (F.adaptive_avg_pool2d(m[:, None], out_hw)[:, 0] >= 0.5).float()
            sums[s : s + len(qmap)] = (qmap * m).sum(dim=(-2, -1)).double().cpu()
            counts[s : s + len(qmap)] = m.sum(dim=(-2, -1)).double().cpu()
            probs.append(out.dose_logits.float().softmax(dim=1).cpu())
            if return_maps:
                maps.append(qmap.cpu().numpy())
    dose_probs = torch.cat(probs).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        slice_q = (sums / counts).numpy().astype(np.float32)
    total = float(counts.sum())
    mean_q = float(sums.sum() / total) if total > 0 else math.nan
    has_body = (counts > 0).numpy()
    pooled = dose_probs[has_body].mean(axis=0) if has_body.any() else dose_probs.mean(axis=0)
    levels = model.cfg.dose_levels
    return N2QPrediction(
        maps=np.concatenate(maps) if return_maps else None,
        slice_quality=slice_q,
        mean_quality=mean_q,
        dose_probs=dose_probs,
        dose_class=int(levels[int(np.argmax(pooled))]),
        dose_levels=levels,
    )
