"""MD-IQA: multi-scale distribution regression with a dual-branch alignment network.

Song et al., "MD-IQA: Learning multi-scale distributed image quality assessment with
semi-supervised learning for low dose CT" (``shared/papers/md-iqa.md``).

What the paper prints, and this module follows:

- a ViT branch and a ConvNeXt branch (timm, built here, never pretrained);
- multi-scale ConvNeXt features aligned to the ViT grid by deformable convolution whose
  sampling offsets are predicted from the ViT features, then attention over them;
- a patch-weighted head (eq. 2): per-patch scores f' from a Scoring Conv, weights
  w = sigmoid(Weighting Conv), Y = sum(w * f') / sum(w);
- K Gaussian targets over N sampling points (eq. 1): Y[j] = exp(-(j-u)^2 / (2 sigma^2)),
  u = s/M * N, sigma = N * tau, M = 4; read-out mean_k argmax(Y_k)/N * M.

What the paper leaves open is a field of :class:`MDIQAConfig`; the defaults are OUR
choices (FACTS.md: no public code exists):

- ``num_points`` N = 100 (argmax resolution 0.04 of a score unit; labels step 0.2). The
  vector holds N + 1 points j = 0..N so both s = 0 and s = M sit on a point: with exactly
  N points eq. 1 would put s = M one past the end.
- ``taus`` = (0.025, 0.05, 0.1), i.e. sigma = 0.1, 0.2, 0.4 score units: one label step
  on either side of the finest, about the spread of five raters' mean for the widest.
- ViT taps: the last four blocks of a short ViT, our counterpart of MANIQA's "4 middle
  blocks" of ViT-B (whose later blocks exist only to use ImageNet weights we do not load).
- Alignment: each ConvNeXt stage is sampled by a (DCNv2-modulated) deformable conv whose
  stride maps it straight onto the ViT grid (see :func:`qgate.models.layers.align_geometry`);
  offsets and masks come from a conv over the projected ViT features.
- "Attention over the aligned features": channel (cross-covariance) attention over the
  concatenated aligned CNN scales, then ``fuse_depth`` timm ViT blocks of spatial
  self-attention over the fused ViT+CNN tokens.
- Texture statistics (``noise_stats``, ours): LayerNorm in every token of both
  backbones divides out the global noise amplitude the dose sets. The stem's learnt
  filters are also applied, with no norm after them, to the crop minus its 3 x 3 local
  mean; the mean log energy of each over the soft-tissue pixels
  (:func:`qgate.models.layers.texture_log_energy`), standardised (BatchNorm1d), is
  projected (Linear, zero-initialised) and added to every fused token before the fusion
  blocks, so the patch head knows the crop's noise level.
- Head: per-patch *logits* are pooled with eq. 2 and a softmax makes each scale's
  distribution; w has one channel per scale, broadcast over the points. The paper's
  sentence on w is ambiguous about its input, so ``weight_input`` picks f (MANIQA's
  wiring, default) or f'.
- Input (OUR choice; the paper is silent on CT windowing and input scale): native-resolution
  crops, never a resize. The dose noise the labels depend on is a few to a few tens of HU
  at the pixel scale; the first version windowed to [-1000, 400] (1400 HU wide), cropped
  448 of 512 and resized to 128, so 14 HU of noise became ~1 % of the range and was then
  averaged down ~3.5x: the network never saw it. Now (``crop_mode="native"``):

  * two channels (``in_chans=2``): the LDCTIQAC2023 window [-1000, 400] and a soft-tissue
    window C40/W400 ([-160, 240], ``soft_window``), each normalised (x - 0.5) / 0.5; the
    second makes 10 HU of noise 2.5 % of its range;
  * ``img_size`` x ``img_size`` crops of the slice at its own pixel grid, placed on the body
    (:func:`crop_centers`: HU > -400, centroid +/- one standard deviation of the body
    pixels' coordinates). Serving scores ``n_crops`` of them per slice (4: the 2 x 2
    pattern; 5 adds the centroid; 1 is the centroid) and averages the crops' score
    distributions (:func:`pool_crop_logits`), so the slice's soft score is the mean of the
    crops' expectations; training draws random offsets in the same frame
    (:func:`mdiqa_random_crops`). Training and the worker call the same functions.
  * ``crop_mode="resize"`` keeps the first version's input (crop fraction ``crop``, resize
    to ``img_size``) for old weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from qgate.models._registry import register_model
from qgate.models.layers import (
    ChannelAttention,
    DeformAlign,
    LayerNorm2d,
    StatNorm,
    texture_log_energy,
)
from qgate.models.preprocess import (
    ArrayLike,
    as_tensor,
    hu_to_unit,
    local_std_channel,
    resize2d,
)

__all__ = [
    "CROP_OFFSETS",
    "MDIQA",
    "MDIQA_CFGS",
    "MDIQAConfig",
    "MDIQADataConfig",
    "body_frame",
    "crop_centers",
    "extract_crops",
    "gaussian_targets",
    "load_mdiqa",
    "mdiqa_channels",
    "mdiqa_crops",
    "mdiqa_preprocess",
    "mdiqa_preprocess_unit",
    "mdiqa_random_crops",
    "mdiqa_small",
    "mdiqa_tiny",
    "pool_crop_logits",
    "predict_argmax",
    "predict_soft",
    "resolve_data_config",
    "save_mdiqa",
]

Readout = Literal["soft", "argmax"]


@dataclass(frozen=True)
class MDIQAConfig:
    """Architecture, distribution and input settings of one MD-IQA model.

    Unless marked "paper", a default is our choice (see the module docstring).
    """

    # Input.
    img_size: int = 224  # MANIQA-style challenge entry: 448 crop resized to 224
    # 1: the wide window; 2: wide + soft-tissue window (ours, default); 3: the wide window
    # repeated (RGB-style stems).
    in_chans: int = 2
    hu_window: tuple[float, float] = (-1000.0, 400.0)  # LDCTIQAC2023 (FACTS)
    soft_window: tuple[float, float] = (-160.0, 240.0)  # C40/W400, channel 1 when in_chans=2
    # "native": img_size crops at the slice's own pixels on the body (ours); "grid": native
    # crops on a regular grid over the whole slice (ours, issue 10: the score then estimates
    # the whole slice, as SSIM does); "resize": crop fraction ``crop`` resized to img_size
    # (the first version).
    crop_mode: Literal["native", "grid", "resize"] = "native"
    n_crops: int = 4  # "native" crops scored per slice at inference: 1, 4 or 5
    grid_per_axis: int = 3  # "grid": at most this many crops per axis, evenly spread
    crop: tuple[float, float] = (32 / 512, 480 / 512)  # "resize": rows/cols kept, as fractions
    norm_mean: float = 0.5
    norm_std: float = 0.5
    # ViT branch (timm VisionTransformer).
    patch_size: int = 16
    vit_embed_dim: int = 256
    vit_depth: int = 7
    vit_num_heads: int = 4
    vit_mlp_ratio: float = 4.0
    vit_taps: tuple[int, ...] = (3, 4, 5, 6)  # blocks whose outputs are concatenated
    # ConvNeXt branch (timm ConvNeXt, 4 stages, strides 4, 8, 16, 32).
    use_cnn: bool = True  # False: ablation without the CNN branch and the alignment
    cnn_dims: tuple[int, int, int, int] = (32, 64, 128, 256)
    cnn_depths: tuple[int, int, int, int] = (2, 2, 4, 2)
    cnn_taps: tuple[int, ...] = (0, 1, 2, 3)  # stages aligned to the ViT grid
    align_dim: int = 64  # channels of each aligned stage
    deform_modulated: bool = True  # DCNv2 masks besides offsets
    # Fusion.
    fuse_dim: int = 192
    fuse_heads: int = 4
    fuse_depth: int = 2  # ViT blocks over the fused tokens
    # Head and distributions.
    head_hidden: int = 96
    weight_input: Literal["features", "scores"] = "features"
    num_points: int = 100  # the paper's N (vector of N + 1 points, see module docstring)
    taus: tuple[float, ...] = (0.025, 0.05, 0.1)  # K = len(taus); (tau,) is single-scale
    max_score: float = 4.0  # paper: M = 4
    drop_rate: float = 0.1  # head dropout
    drop_path_rate: float = 0.1  # stochastic depth in both backbones
    # Native-scale texture statistics added to the fused tokens (ours; module docstring).
    # Without them the tiny model's training loss did not fall below predicting the mean
    # in 600 steps on 2 CPU cores; with them it did in 150 (training/reports/NOTES.md).
    noise_stats: bool = True
    # A local-std channel between the two windows (ours, issue 10 round 12; needs
    # ``in_chans=3``): 4 x the local std of the slice in the label's C40/W400 window under
    # the label SSIM's Gaussian (:func:`qgate.models.preprocess.local_std_channel`), what
    # SSIM's contrast term weighs the noise against. The soft-tissue window stays last.
    # Round 12: a fine-tune left it unused (REPORT.md); off in the shipped weights.
    local_std: bool = False

    def __post_init__(self) -> None:
        # YAML/JSON give lists: store tuples so configs stay hashable and comparable.
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        if self.in_chans not in (1, 2, 3):
            raise ValueError(f"in_chans must be 1, 2 or 3, got {self.in_chans}")
        if self.local_std and (self.in_chans != 3 or self.crop_mode == "resize"):
            raise ValueError("local_std needs in_chans=3 and native or grid crops")
        if self.crop_mode not in ("native", "grid", "resize"):
            raise ValueError(
                f"crop_mode must be 'native', 'grid' or 'resize', got {self.crop_mode!r}"
            )
        if self.grid_per_axis < 1:
            raise ValueError(f"grid_per_axis must be >= 1, got {self.grid_per_axis}")
        if self.n_crops not in CROP_OFFSETS:
            raise ValueError(f"n_crops must be one of {sorted(CROP_OFFSETS)}, got {self.n_crops}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} not a multiple of patch {self.patch_size}")
        if self.img_size % 32:
            raise ValueError(f"img_size {self.img_size} must be a multiple of 32 (ConvNeXt)")
        if not self.vit_taps or not all(0 <= t < self.vit_depth for t in self.vit_taps):
            raise ValueError(f"vit_taps {self.vit_taps} must lie in [0, {self.vit_depth})")
        if not self.cnn_taps or not all(0 <= t < 4 for t in self.cnn_taps):
            raise ValueError(f"cnn_taps {self.cnn_taps} must lie in [0, 4)")
        if len(self.cnn_dims) != 4 or len(self.cnn_depths) != 4:
            raise ValueError("cnn_dims and cnn_depths need 4 stages")
        if self.use_cnn and (len(self.cnn_taps) * self.align_dim) % self.fuse_heads:
            raise ValueError("len(cnn_taps) * align_dim must be divisible by fuse_heads")
        if self.fuse_dim % self.fuse_heads or self.vit_embed_dim % self.vit_num_heads:
            raise ValueError("embedding dims must be divisible by their head counts")
        if not self.taus or any(t <= 0 for t in self.taus):
            raise ValueError(f"taus must be positive and non-empty, got {self.taus}")
        if self.num_points < 2 or self.max_score <= 0:
            raise ValueError("num_points must be >= 2 and max_score > 0")
        if self.weight_input not in ("features", "scores"):
            raise ValueError(
                f"weight_input must be 'features' or 'scores', got {self.weight_input}"
            )
        lo, hi = self.crop
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"crop fractions must satisfy 0 <= lo < hi <= 1, got {self.crop}")

    @property
    def num_scales(self) -> int:
        """K, the number of Gaussian scales."""
        return len(self.taus)

    @property
    def num_bins(self) -> int:
        """Length of each distribution vector: N + 1."""
        return self.num_points + 1

    @property
    def grid_size(self) -> int:
        """Side of the ViT token grid, onto which everything is aligned."""
        return self.img_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MDIQAConfig:
        return cls(**d)


# ---------------------------------------------------------------------------- data


@dataclass(frozen=True)
class MDIQADataConfig:
    """Preprocessing derived from a model config, shared by training and inference."""

    img_size: int
    in_chans: int
    hu_window: tuple[float, float]
    crop: tuple[float, float]
    mean: float
    std: float
    soft_window: tuple[float, float] = (-160.0, 240.0)
    crop_mode: str = "resize"
    n_crops: int = 1
    grid_per_axis: int = 3
    local_std: bool = False


def resolve_data_config(model_or_cfg: MDIQA | MDIQAConfig) -> MDIQADataConfig:
    """The preprocessing a model expects, read from its config (timm's resolve_data_config)."""
    cfg = model_or_cfg.cfg if isinstance(model_or_cfg, MDIQA) else model_or_cfg
    return MDIQADataConfig(
        img_size=cfg.img_size,
        in_chans=cfg.in_chans,
        hu_window=cfg.hu_window,
        crop=cfg.crop,
        mean=cfg.norm_mean,
        std=cfg.norm_std,
        soft_window=cfg.soft_window,
        crop_mode=cfg.crop_mode,
        n_crops=cfg.n_crops,
        grid_per_axis=cfg.grid_per_axis,
        local_std=cfg.local_std,
    )


def mdiqa_preprocess_unit(x01: ArrayLike, data_cfg: MDIQADataConfig) -> torch.Tensor:
    """Slices already windowed to [0, 1] by the LDCTIQAC2023 window -> model input.

    ``x01``: (B, H, W), e.g. LDCTIQAC2023 TIFFs. Converted back to HU (inside [-1000, 400]
    that is exact) and passed to :func:`mdiqa_preprocess`.
    """
    lo, hi = data_cfg.hu_window
    return mdiqa_preprocess(as_tensor(x01) * (hi - lo) + lo, data_cfg)


def _check_slices(hu: ArrayLike) -> torch.Tensor:
    t = as_tensor(hu)
    if t.ndim != 3:
        raise ValueError(f"expected (B, H, W) slices, got shape {tuple(t.shape)}")
    return t


def mdiqa_channels(hu: ArrayLike, data_cfg: MDIQADataConfig) -> torch.Tensor:
    """HU slices (B, H, W) -> normalised windowed channels (B, in_chans, H, W), no crop.

    Channel 0: the LDCTIQAC2023 window; channel 1 (``in_chans=2``): the soft-tissue window;
    ``in_chans=3`` repeats channel 0, or with ``local_std`` is [wide window, local std
    (unnormalised), soft-tissue window].
    """
    t = _check_slices(hu)
    wide = hu_to_unit(t, data_cfg.hu_window)
    chans = [wide]
    if data_cfg.in_chans == 2 or data_cfg.local_std:
        chans.append(hu_to_unit(t, data_cfg.soft_window))
    x = (torch.stack(chans, dim=1) - data_cfg.mean) / data_cfg.std
    if data_cfg.local_std:
        return torch.cat([x[:, :1], local_std_channel(t, None), x[:, 1:]], dim=1).contiguous()
    if data_cfg.in_chans == 3:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


#: Crop centres per ``n_crops``, in units of the body's coordinate spread (rows, cols).
CROP_OFFSETS: dict[int, tuple[tuple[float, float], ...]] = {
    1: ((0.0, 0.0),),
    4: ((-1.0, -1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 1.0)),
    5: ((0.0, 0.0), (-1.0, -1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 1.0)),
}
BODY_HU = -400.0  # body pixels for crop placement: soft tissue, fat, bone (not air, lung)


def body_frame(hu: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slice: centroid (B, 2) and coordinate standard deviation (B, 2) of the body
    pixels (HU > -400), in pixels (rows, cols). Slices without body: the image centre and
    a quarter of the size."""
    t = _check_slices(hu)
    h, w = t.shape[-2:]
    m = (t > BODY_HU).float()
    n = m.sum(dim=(-2, -1))
    ys = torch.arange(h, dtype=torch.float32, device=t.device).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32, device=t.device).view(1, 1, w)
    safe = n.clamp_min(1.0)
    cy = (m * ys).sum(dim=(-2, -1)) / safe
    cx = (m * xs).sum(dim=(-2, -1)) / safe
    sy = ((m * (ys - cy.view(-1, 1, 1)) ** 2).sum(dim=(-2, -1)) / safe).sqrt()
    sx = ((m * (xs - cx.view(-1, 1, 1)) ** 2).sum(dim=(-2, -1)) / safe).sqrt()
    empty = n < 16
    centre = torch.stack([cy, cx], 1)
    spread = torch.stack([sy, sx], 1)
    centre[empty] = torch.tensor([(h - 1) / 2, (w - 1) / 2], device=t.device)
    spread[empty] = torch.tensor([h / 4, w / 4], device=t.device)
    return centre, spread


def crop_centers(centre: torch.Tensor, spread: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Crop centres (B, n, 2) = centre + offsets * spread; ``offsets`` (n, 2) or (B, n, 2)."""
    off = offsets.to(centre.device, torch.float32)
    if off.ndim == 2:
        off = off.unsqueeze(0)
    return centre[:, None, :] + off * spread[:, None, :]


def extract_crops(x: torch.Tensor, centers: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` x ``size`` crops of ``x`` (B, C, H, W) around ``centers`` (B, n, 2) ->
    (B, n, C, size, size). Crops are shifted to lie inside the image; an image smaller
    than ``size`` is padded with the value of air, each channel's own minimum (a window
    channel's -1, the local-std channel's 0)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        air = x.amin(dim=(0, -2, -1), keepdim=True)
        x = torch.nn.functional.pad(x - air, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)) + air
        centers = centers + torch.tensor([ph // 2, pw // 2], device=centers.device)
        h, w = x.shape[-2:]
    top = (centers[..., 0] - size / 2).round().long().clamp(0, h - size).tolist()
    left = (centers[..., 1] - size / 2).round().long().clamp(0, w - size).tolist()
    out = [
        torch.stack([x[i, :, r : r + size, q : q + size] for r, q in zip(rows, cols, strict=True)])
        for i, (rows, cols) in enumerate(zip(top, left, strict=True))
    ]
    return torch.stack(out).contiguous()


def grid_centers(shape: tuple[int, int], size: int, per_axis: int) -> torch.Tensor:
    """Centres (n, 2) of ``size`` crops on a regular grid over an image of ``shape``: as many
    per axis as tile it (``ceil(H / size)``), at most ``per_axis``, first and last flush
    with the borders, so the crops are an even sample of the whole slice."""
    axes = []
    for n in shape:
        k = max(1, min(per_axis, math.ceil(n / size)))
        if k == 1 or n <= size:
            axes.append(torch.tensor([(n - 1) / 2]))
        else:
            axes.append(torch.linspace(size / 2, n - size / 2, k))
    rows, cols = torch.meshgrid(axes[0], axes[1], indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], 1)


def mdiqa_crops(hu: ArrayLike, data_cfg: MDIQADataConfig) -> torch.Tensor:
    """HU slices (B, H, W) -> the crops a slice is scored from, (B, n, C, img, img).

    ``crop_mode="native"``: ``n_crops`` native-resolution crops on the body
    (:data:`CROP_OFFSETS`); ``"grid"``: native crops on a regular grid over the whole
    slice (:func:`grid_centers`); ``"resize"``: one crop, the first version's resized input.
    The one preprocessing of training, evaluation and the worker; runs on ``hu``'s device.
    """
    t = _check_slices(hu)
    if data_cfg.crop_mode == "resize":
        return _resized(t, data_cfg)[:, None]
    if data_cfg.crop_mode == "grid":
        centers = grid_centers(t.shape[-2:], data_cfg.img_size, data_cfg.grid_per_axis)
        centers = centers.to(t.device)[None].expand(len(t), -1, -1)
        return extract_crops(mdiqa_channels(t, data_cfg), centers, data_cfg.img_size)
    centre, spread = body_frame(t)
    offs = torch.tensor(CROP_OFFSETS[data_cfg.n_crops])
    return extract_crops(
        mdiqa_channels(t, data_cfg), crop_centers(centre, spread, offs), data_cfg.img_size
    )


def mdiqa_random_crops(
    channels: torch.Tensor,
    centre: torch.Tensor,
    spread: torch.Tensor,
    size: int,
    g: torch.Generator,
    *,
    reach: float = 1.5,
) -> torch.Tensor:
    """Training crops: one per slice, (B, C, size, size), from precomputed
    :func:`mdiqa_channels` and :func:`body_frame`, centred at offsets drawn uniformly in
    [-reach, reach] body spreads: the frame the serving crops (offsets 0 and +/-1) lie in."""
    off = (torch.rand(len(channels), 1, 2, generator=g) * 2 - 1) * reach
    return extract_crops(channels, crop_centers(centre, spread, off), size)[:, 0]


def mdiqa_preprocess(hu: ArrayLike, data_cfg: MDIQADataConfig) -> torch.Tensor:
    """HU slices (B, H, W) -> one model input per slice, (B, in_chans, img, img).

    ``"native"``: the crop at the body's centroid (the first of :func:`mdiqa_crops` with
    ``n_crops=1``); ``"resize"``: window, crop [32:480] of 512 (proportionally), resize.
    For the full per-slice score use :func:`mdiqa_crops` and :func:`pool_crop_logits`.
    """
    t = _check_slices(hu)
    if data_cfg.crop_mode == "resize":
        return _resized(t, data_cfg)
    return mdiqa_crops(t, replace(data_cfg, n_crops=1))[:, 0]


def _resized(hu: torch.Tensor, data_cfg: MDIQADataConfig) -> torch.Tensor:
    """The first version's input: window, crop [32:480] of 512 (proportionally), resize."""
    x = hu_to_unit(hu, data_cfg.hu_window)
    _, h, w = x.shape
    lo, hi = data_cfg.crop
    r0, r1 = round(lo * h), round(hi * h)
    c0, c1 = round(lo * w), round(hi * w)
    # Anti-aliased bilinear (resize2d): plain bilinear shrinking aliases the noise we score.
    x = resize2d(x[:, None, r0:r1, c0:c1], data_cfg.img_size)
    x = (x - data_cfg.mean) / data_cfg.std
    if data_cfg.in_chans > 1:
        x = x.expand(-1, data_cfg.in_chans, -1, -1)
    return x.contiguous()


def pool_crop_logits(logits: torch.Tensor) -> torch.Tensor:
    """Crops' logits (B, n, K, P) -> one slice's log-distributions (B, K, P).

    The slice distribution is the mean of the crops' distributions (softmax), returned as
    its log so that :func:`predict_soft` gives the mean of the crops' expectations and
    :func:`predict_argmax` the argmax of the pooled distribution.
    """
    p = logits.float().softmax(-1).mean(1)
    return p.clamp_min(1e-12).log()


# ------------------------------------------------------------------ distributions


def gaussian_targets(
    scores: torch.Tensor,
    *,
    num_points: int,
    taus: Sequence[float],
    max_score: float = 4.0,
) -> torch.Tensor:
    """Eq. 1 targets: (B,) scores -> (B, K, N + 1) Gaussians, each normalised to sum 1.

    u = s / M * N and sigma = N * tau, sampled at j = 0..N. The paper's Y is
    unnormalised; we normalise so it is a distribution for the KL term.
    """
    s = scores.float().reshape(-1, 1, 1)
    j = torch.arange(num_points + 1, device=s.device, dtype=torch.float32).view(1, 1, -1)
    sigma = torch.tensor(list(taus), device=s.device, dtype=torch.float32).view(1, -1, 1)
    sigma = sigma * num_points
    u = s / max_score * num_points
    y = torch.exp(-((j - u) ** 2) / (2 * sigma**2))
    return y / y.sum(-1, keepdim=True)


def predict_argmax(logits: torch.Tensor, max_score: float = 4.0) -> torch.Tensor:
    """The paper's read-out: mean over the K scales of argmax(Y_k) / N * M. (B,K,P) -> (B,)."""
    n = logits.shape[-1] - 1
    return (logits.argmax(-1).float() / n * max_score).mean(-1)


def predict_soft(logits: torch.Tensor, max_score: float = 4.0) -> torch.Tensor:
    """Our refinement: mean over K of the expectation E_Y[j] / N * M. (B,K,P) -> (B,)."""
    return expected_scores(logits, max_score).mean(-1)


def expected_scores(logits: torch.Tensor, max_score: float = 4.0) -> torch.Tensor:
    """Per-scale expected score, (B, K, P) logits -> (B, K). Differentiable."""
    n = logits.shape[-1] - 1
    j = torch.arange(n + 1, device=logits.device, dtype=torch.float32)
    return (logits.float().softmax(-1) * j).sum(-1) / n * max_score


# -------------------------------------------------------------------------- model


class MDIQA(nn.Module):
    """Dual-branch alignment network with the patch-weighted multi-scale distribution head.

    ``forward(x)`` takes (B, in_chans, img, img) from :func:`mdiqa_preprocess` and returns
    float32 logits (B, K, N + 1): one distribution per Gaussian scale (softmax over the last
    axis). :func:`predict_argmax` and :func:`predict_soft` turn them into scores in [0, M].
    """

    def __init__(self, cfg: MDIQAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        grid = cfg.grid_size
        self.vit = VisionTransformer(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            num_classes=0,
            global_pool="",
            embed_dim=cfg.vit_embed_dim,
            depth=cfg.vit_depth,
            num_heads=cfg.vit_num_heads,
            mlp_ratio=cfg.vit_mlp_ratio,
            drop_path_rate=cfg.drop_path_rate,
        )
        # Blocks after the last tap, the final norm and the head are never used: drop them.
        self.vit.prune_intermediate_layers(list(cfg.vit_taps), prune_norm=True, prune_head=True)
        self.vit_proj = nn.Sequential(
            nn.Conv2d(len(cfg.vit_taps) * cfg.vit_embed_dim, cfg.fuse_dim, 1),
            LayerNorm2d(cfg.fuse_dim),
        )
        self.cnn: ConvNeXt | None = None
        if cfg.use_cnn:
            self.cnn = ConvNeXt(
                in_chans=cfg.in_chans,
                num_classes=0,
                depths=cfg.cnn_depths,
                dims=cfg.cnn_dims,
                drop_path_rate=cfg.drop_path_rate,
            )
            self.cnn.prune_intermediate_layers(list(cfg.cnn_taps), prune_norm=True, prune_head=True)
            self.align = nn.ModuleList(
                DeformAlign(
                    cfg.cnn_dims[i],
                    cfg.fuse_dim,
                    cfg.align_dim,
                    src_size=cfg.img_size // (4 * 2**i),
                    dst_size=grid,
                    modulated=cfg.deform_modulated,
                )
                for i in cfg.cnn_taps
            )
            cnn_chs = len(cfg.cnn_taps) * cfg.align_dim
            self.cnn_attn = ChannelAttention(cnn_chs, cfg.fuse_heads)
            self.fuse = nn.Sequential(
                nn.Conv2d(cfg.fuse_dim + cnn_chs, cfg.fuse_dim, 1), LayerNorm2d(cfg.fuse_dim)
            )
        self.blocks = nn.Sequential(
            *(
                Block(
                    cfg.fuse_dim,
                    cfg.fuse_heads,
                    mlp_ratio=cfg.vit_mlp_ratio,
                    qkv_bias=True,
                    drop_path=cfg.drop_path_rate,
                )
                for _ in range(cfg.fuse_depth)
            )
        )
        self.norm = nn.LayerNorm(cfg.fuse_dim)
        self.noise_norm: StatNorm | None = None
        self.noise_proj: nn.Linear | None = None
        if cfg.noise_stats:
            stem = self._stem()
            self.noise_norm = StatNorm(stem.out_channels)
            self.noise_proj = nn.Linear(stem.out_channels, cfg.fuse_dim)
            nn.init.zeros_(self.noise_proj.weight)  # starts as the plain network
            nn.init.zeros_(self.noise_proj.bias)
        k, p = cfg.num_scales, cfg.num_bins
        self.score_conv = nn.Sequential(  # "Scoring Conv": f' per patch
            nn.Conv2d(cfg.fuse_dim, cfg.head_hidden, 1),
            nn.GELU(),
            nn.Dropout(cfg.drop_rate),
            nn.Conv2d(cfg.head_hidden, k * p, 1),
        )
        w_in = cfg.fuse_dim if cfg.weight_input == "features" else k * p
        self.weight_conv = nn.Sequential(  # "Weighting Conv": w = sigmoid(.)
            nn.Conv2d(w_in, cfg.head_hidden, 1),
            nn.GELU(),
            nn.Dropout(cfg.drop_rate),
            nn.Conv2d(cfg.head_hidden, k, 1),
        )

    def _stem(self) -> nn.Conv2d:
        """The first conv on the pixels: ConvNeXt's stem, or the ViT patch embedding."""
        conv = self.cnn.stem[0] if self.cnn is not None else self.vit.patch_embed.proj
        assert isinstance(conv, nn.Conv2d)
        return conv

    def noise_stats(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, img, img) -> (B, stem channels): standardised log texture energy of the
        stem's filters over the soft-tissue pixels (the last channel strictly inside its
        window), :func:`qgate.models.layers.texture_log_energy`."""
        assert self.noise_norm is not None
        win = x[:, -1:]
        inside = (win > -1.0 + 1e-4) & (win < 1.0 - 1e-4)
        return self.noise_norm(texture_log_energy(self._stem(), x, inside))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, img, img) -> fused features f, (B, fuse_dim, G, G) on the ViT grid."""
        cfg = self.cfg
        taps = self.vit.forward_intermediates(
            x, indices=list(cfg.vit_taps), intermediates_only=True, output_fmt="NCHW"
        )
        v = self.vit_proj(torch.cat(taps, dim=1))
        if self.cnn is not None:
            stages = self.cnn.forward_intermediates(
                x, indices=list(cfg.cnn_taps), intermediates_only=True
            )
            aligned = torch.cat([al(c, v) for al, c in zip(self.align, stages, strict=True)], 1)
            aligned = self.cnn_attn(aligned)
            f = self.fuse(torch.cat([v, aligned.to(v.dtype)], dim=1))
        else:
            f = v
        if self.noise_proj is not None:  # the crop's noise level, on every token
            f = f + self.noise_proj(self.noise_stats(x)).to(f.dtype)[..., None, None]
        b, c, h, w = f.shape
        t = self.norm(self.blocks(f.flatten(2).transpose(1, 2)))
        return t.transpose(1, 2).reshape(b, c, h, w)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """Eq. 2 on fused features: (B, C, G, G) -> float32 logits (B, K, N + 1)."""
        b = f.shape[0]
        k, p = self.cfg.num_scales, self.cfg.num_bins
        s = self.score_conv(f)
        w = torch.sigmoid(self.weight_conv(f if self.cfg.weight_input == "features" else s))
        # Pool in fp32: sums over up to hundreds of patches under bf16 lose the ranking.
        s = s.float().reshape(b, k, p, -1)
        w = w.float().reshape(b, k, 1, -1)
        return (s * w).sum(-1) / w.sum(-1).clamp_min(1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def predict(self, x: torch.Tensor, readout: Readout = "soft") -> torch.Tensor:
        """Scores in [0, M], (B,), with the soft (expectation) or the paper's argmax read-out."""
        logits = self(x)
        if readout == "argmax":
            return predict_argmax(logits, self.cfg.max_score)
        if readout == "soft":
            return predict_soft(logits, self.cfg.max_score)
        raise ValueError(f"readout must be 'soft' or 'argmax', got {readout!r}")


# -------------------------------------------------------------- variants, weights

MDIQA_CFGS: dict[str, MDIQAConfig] = {
    # CPU/CI size: 128 px input (8 x 8 tokens), 3 ViT blocks tapped, 3 ConvNeXt stages.
    "mdiqa_tiny": MDIQAConfig(
        img_size=128,
        vit_embed_dim=96,
        vit_depth=4,
        vit_num_heads=3,
        vit_taps=(1, 2, 3),
        cnn_dims=(24, 48, 96, 192),
        cnn_depths=(1, 1, 2, 1),
        cnn_taps=(0, 1, 2),
        align_dim=32,
        fuse_dim=96,
        fuse_heads=3,
        fuse_depth=1,
        head_hidden=48,
    ),
    # GPU production size (~9.5 M parameters, ~19 MB as bf16 safetensors).
    "mdiqa_small": MDIQAConfig(),
}


def _build(name: str, overrides: dict[str, Any]) -> MDIQA:
    # dataclasses.replace rejects unknown fields here, at the top, not deep in a layer.
    return MDIQA(replace(MDIQA_CFGS[name], **overrides))


@register_model
def mdiqa_tiny(**overrides: Any) -> MDIQA:
    """MD-IQA sized for CPU/CI; ``overrides`` replace :class:`MDIQAConfig` fields."""
    return _build("mdiqa_tiny", overrides)


@register_model
def mdiqa_small(**overrides: Any) -> MDIQA:
    """MD-IQA sized for a GPU in production; ``overrides`` replace config fields."""
    return _build("mdiqa_small", overrides)


def save_mdiqa(
    model: MDIQA, path: str | Path, *, dtype: torch.dtype | None = torch.bfloat16
) -> None:
    """Write the weights as safetensors (bf16 by default, halving the file) with the config.

    The config is stored as JSON in the safetensors metadata (key ``mdiqa_config``) so a
    file can be rebuilt by :func:`load_mdiqa` even if trained with overrides.
    """
    from safetensors.torch import save_file

    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
        .detach()
        .cpu()
        .contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(path), metadata={"mdiqa_config": json.dumps(model.cfg.to_dict())})


def load_mdiqa(path: str | Path, *, device: str | torch.device = "cpu") -> MDIQA:
    """Rebuild a model from a :func:`save_mdiqa` file (config from its metadata), in fp32."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "mdiqa_config" not in meta:
        raise ValueError(f"{path} has no mdiqa_config metadata; use create_model(name, weights=)")
    stored = json.loads(meta["mdiqa_config"])
    # Files written before native crops existed were trained on the resized input.
    stored.setdefault("crop_mode", "resize")
    stored.setdefault("noise_stats", False)
    model = MDIQA(MDIQAConfig.from_dict(stored))
    model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return model.to(device)
