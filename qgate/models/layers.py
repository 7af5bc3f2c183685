"""Small building blocks shared by qgate's models.

A leaf module, as ``timm/layers`` is: it imports torch, torchvision and timm's layers, and
never ``qgate.models``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops import DeformConv2d

__all__ = [
    "AlignGeometry",
    "ChannelAttention",
    "DeformAlign",
    "InstanceNorm2d",
    "LayerNorm2d",
    "StatNorm",
    "align_geometry",
    "texture_log_energy",
]


class InstanceNorm2d(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` (affine, no running statistics) computed as a per-sample,
    per-channel ``var_mean`` and one ``addcmul``: the same function and parameters (a
    drop-in for weights saved from ``nn.InstanceNorm2d``), without the reshape to
    (1, B*C, H, W) that torch's kernel makes, which copies a channels_last input twice.
    On 2 CPU cores that made Noise2Quality's forward ~1.2x faster (issue 10)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or not self.affine or self.track_running_stats:
            return super().forward(x)
        if x.shape[2] * x.shape[3] <= 1:  # torch's own check: no statistics from 1 pixel
            raise ValueError(
                f"Expected more than 1 spatial element, got input size {list(x.shape)}"
            )
        b, c = x.shape[:2]
        if x.is_contiguous(memory_format=torch.channels_last):
            # reduce over pixels with channels innermost: a view, and 2x faster than (2, 3)
            var, mean = torch.var_mean(x.permute(0, 2, 3, 1).reshape(b, -1, c), 1, correction=0)
            var, mean = var[:, :, None, None], mean[:, :, None, None]
        else:
            var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
        scale = self.weight[:, None, None] * torch.rsqrt(var + self.eps)
        return torch.addcmul(self.bias[:, None, None] - mean * scale, x, scale)


@dataclass(frozen=True)
class AlignGeometry:
    """How a (src x src) feature map is brought onto a (dst x dst) grid.

    The map is first resized to ``resize_to`` (``None``: left as is), then a deformable
    conv with ``stride``, ``kernel`` and ``padding`` samples exactly ``dst x dst`` outputs.
    """

    resize_to: int | None
    stride: int
    kernel: int
    padding: int


def align_geometry(src: int, dst: int) -> AlignGeometry:
    """Geometry of a deformable conv that maps a ``src``-sized map to a ``dst``-sized grid.

    Finer maps are sampled with ``stride = src / dst`` *on the fine map itself*, so the CT
    noise texture they carry is not averaged away by a resize first; the kernel covers
    at least one stride cell (``kernel = max(3, stride)``). Coarser maps are upsampled to
    the grid and sampled with a 3x3, stride-1 kernel.
    """
    if src <= 0 or dst <= 0:
        raise ValueError(f"sizes must be positive, got src={src}, dst={dst}")
    stride = max(1, round(src / dst))
    resize_to = None if src == dst * stride else dst * stride
    kernel = max(3, stride)
    # out = floor((dst*stride + 2p - k) / stride) + 1 == dst for this padding.
    padding = (kernel - stride + 1) // 2
    return AlignGeometry(resize_to=resize_to, stride=stride, kernel=kernel, padding=padding)


class DeformAlign(nn.Module):
    """Align a CNN feature map to a guide (ViT) grid with a deformable convolution.

    The sampling offsets (and DCNv2 modulation masks) are predicted from the guide
    features, so where the CNN is sampled is decided by the transformer. The offset conv
    starts at zero: the module begins as a plain strided conv and learns to deform.
    """

    def __init__(
        self,
        in_chs: int,
        guide_chs: int,
        out_chs: int,
        src_size: int,
        dst_size: int,
        *,
        modulated: bool = True,
    ) -> None:
        super().__init__()
        self.geometry = align_geometry(src_size, dst_size)
        self.dst_size = dst_size
        self.modulated = modulated
        k = self.geometry.kernel
        n_off = (3 if modulated else 2) * k * k
        self.offset = nn.Conv2d(guide_chs, n_off, kernel_size=3, padding=1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.dcn = DeformConv2d(
            in_chs,
            out_chs,
            kernel_size=k,
            stride=self.geometry.stride,
            padding=self.geometry.padding,
        )
        self.norm = LayerNorm2d(out_chs)

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        if g.resize_to is not None:
            x = F.interpolate(
                x, size=(g.resize_to, g.resize_to), mode="bilinear", align_corners=False
            )
        off = self.offset(guide)
        # torchvision's deform_conv2d has no bf16 CPU kernel and sampling positions want
        # full precision anyway: run it in the weights' dtype (fp32) whatever autocast does.
        dt = self.dcn.weight.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            off = off.to(dt)
            k2 = g.kernel * g.kernel
            mask = torch.sigmoid(off[:, 2 * k2 :]).contiguous() if self.modulated else None
            y = self.dcn(x.to(dt).contiguous(), off[:, : 2 * k2].contiguous(), mask)
        return self.norm(y)


class ChannelAttention(nn.Module):
    """Cross-covariance (channel) attention over tokens, XCiT-style, with a residual.

    Attention weights are (head_dim x head_dim) between channels, so it mixes the
    channels of the aligned multi-scale CNN features at any resolution (MANIQA's
    transposed attention needs a fixed token count; this one does not).
    """

    def __init__(self, dim: int, num_heads: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, C, H, W) -> same shape."""
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        qkv = self.qkv(self.norm(t)).reshape(b, h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 4, 1).unbind(0)  # each (B, heads, head_dim, N)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        out = (attn.softmax(dim=-1) @ v).permute(0, 3, 1, 2).reshape(b, h * w, c)
        t = t + self.proj(out)
        return t.transpose(1, 2).reshape(b, c, h, w)


def texture_log_energy(conv: nn.Conv2d, x: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Native-scale texture statistics that normalisation layers would divide out.

    ``conv`` (a model's first conv, with its learnt filters) is applied, with no norm
    after it, to ``x`` minus its 3 x 3 local mean (the fine texture: noise, thin streaks,
    edges; not the grey level, which would swamp it). Per output channel: the mean of
    log(h^2 + 1e-6) over the pixels where ``inside`` (B, 1, H, W), resized to the conv's
    output grid by area, is >= 0.5 (all pixels where none is). Returns (B, out_channels),
    float32. The dose of a CT slice is a global noise amplitude: Instance/LayerNorm
    remove exactly that from every feature, these statistics keep it.
    """
    fine = x - F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    h = conv(fine).float()
    m = inside.float()
    if m.shape[-2:] != h.shape[-2:]:
        m = (F.adaptive_avg_pool2d(m, h.shape[-2:]) >= 0.5).float()
    n = m.sum(dim=(-2, -1))
    m = torch.where(n[..., None, None] > 0, m, torch.ones_like(m))
    e = torch.log(h * h + 1e-6)
    return (e * m).sum(dim=(-2, -1)) / m.sum(dim=(-2, -1))


class StatNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` for the texture statistics that also takes a batch of one.

    A one-sample batch (e.g. the last batch of a fine-tune) has no batch variance: it is
    normalised with the running statistics instead, training or not. Same parameters and
    buffers as ``BatchNorm1d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)
