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
- Head: per-patch *logits* are pooled with eq. 2 and a softmax makes each scale's
  distribution; w has one channel per scale, broadcast over the points. The paper's
  sentence on w is ambiguous about its input, so ``weight_input`` picks f (MANIQA's
  wiring, default) or f'.
- Input: 1-channel CT windowed to the LDCTIQAC2023 HU window [-1000, 400], cropped
  [32:480, 32:480] of a 512 grid (proportionally for other sizes), resized (antialiased)
  to ``img_size``, normalised (x - 0.5) / 0.5.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from qgate.models._registry import register_model
from qgate.models.layers import ChannelAttention, DeformAlign, LayerNorm2d
from qgate.models.preprocess import ArrayLike, as_tensor, hu_to_unit, resize2d

__all__ = [
    "MDIQA",
    "MDIQA_CFGS",
    "MDIQAConfig",
    "MDIQADataConfig",
    "gaussian_targets",
    "load_mdiqa",
    "mdiqa_preprocess",
    "mdiqa_preprocess_unit",
    "mdiqa_small",
    "mdiqa_tiny",
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
    in_chans: int = 1  # 1: windowed CT; 3: the same channel repeated (RGB-style stems)
    hu_window: tuple[float, float] = (-1000.0, 400.0)  # LDCTIQAC2023 (FACTS)
    crop: tuple[float, float] = (32 / 512, 480 / 512)  # rows/cols kept, as fractions
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

    def __post_init__(self) -> None:
        # YAML/JSON give lists: store tuples so configs stay hashable and comparable.
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans}")
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
    )


def mdiqa_preprocess_unit(x01: ArrayLike, data_cfg: MDIQADataConfig) -> torch.Tensor:
    """Crop, resize and normalise slices already windowed to [0, 1].

    ``x01``: (B, H, W), e.g. LDCTIQAC2023 TIFFs (already in the MD-IQA HU window).
    Returns (B, in_chans, img, img) float32 on the input's device.
    """
    x = as_tensor(x01)
    if x.ndim != 3:
        raise ValueError(f"expected (B, H, W) slices, got shape {tuple(x.shape)}")
    _, h, w = x.shape
    lo, hi = data_cfg.crop
    # [32:480] of 512, scaled to the actual matrix size.
    r0, r1 = round(lo * h), round(hi * h)
    c0, c1 = round(lo * w), round(hi * w)
    # Anti-aliased bilinear (resize2d): plain bilinear shrinking aliases the noise we score.
    x = resize2d(x[:, None, r0:r1, c0:c1], data_cfg.img_size)
    x = (x - data_cfg.mean) / data_cfg.std
    if data_cfg.in_chans == 3:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


def mdiqa_preprocess(hu: ArrayLike, data_cfg: MDIQADataConfig) -> torch.Tensor:
    """HU slices (B, H, W) -> model input (B, in_chans, img, img): window, crop, resize.

    The one preprocessing of training and inference; runs on ``hu``'s device.
    """
    return mdiqa_preprocess_unit(hu_to_unit(hu, data_cfg.hu_window), data_cfg)


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
    model = MDIQA(MDIQAConfig.from_dict(json.loads(meta["mdiqa_config"])))
    model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return model.to(device)
