"""Image-domain measures shared by training and the service, so they cannot drift apart.

* :func:`window` - HU to [0, 1] for a window (centre, width).
* :func:`high_pass` - Noise2Quality's second input channel, ``I - up(down(blur(I)))``;
  :func:`resize`, :func:`local_rms` - how native-resolution images reach model size.
* :func:`ssim_map` - the per-pixel SSIM of Wang et al. (2004) with an 11 x 11 Gaussian
  window, sigma 1.5, K = (0.01, 0.03), symmetric borders: the same numbers as
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, full=True)``.
* :func:`snr_label`, :func:`brisque_label` - the classical labels of Chest CT-IQA;
  :func:`body_mask` - the patient's body, which they and the score proxy are read in.

Torch functions take (H, W) or (B, H, W) tensors and run on the tensor's device.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Named windows (centre, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),  # the soft-tissue window MD-IQA's score proxy is read in
    "n2q": (40.0, 300.0),  # Noise2Quality: centre 40, width 300
    "mediastinum": (40.0, 400.0),  # Chest CT-IQA soft-tissue series
    "lung": (-600.0, 1500.0),  # Chest CT-IQA lung series
    "ldctiqa": (-300.0, 1400.0),  # LDCTIQAC2023 storage window, HU [-1000, 400]
}


def window(hu: torch.Tensor, center: float, width: float) -> torch.Tensor:
    """Map HU linearly so that [center - width/2, center + width/2] -> [0, 1], clipped."""
    lo = center - width / 2.0
    return ((hu - lo) / width).clamp(0.0, 1.0)


def _batch(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if x.ndim == 2:
        return x[None, None], True
    if x.ndim == 3:
        return x[:, None], False
    raise ValueError(f"expected (H, W) or (B, H, W), got shape {tuple(x.shape)}")


def _unbatch(x: torch.Tensor, single: bool) -> torch.Tensor:
    return x[0, 0] if single else x[:, 0]


def _gauss1d(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return (g / g.sum()).to(torch.float32)


def _sym_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    """Symmetric ('abc|cba') padding of the last two dims, as scipy.ndimage's 'reflect'."""
    x = torch.cat((x[..., :p, :].flip(-2), x, x[..., -p:, :].flip(-2)), dim=-2)
    return torch.cat((x[..., :p].flip(-1), x, x[..., -p:].flip(-1)), dim=-1)


def _gauss_filter(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian of (B, C, H, W) with symmetric borders, same size out."""
    g = _gauss1d(size, sigma, x.device)
    c = x.shape[1]
    p = size // 2
    x = _sym_pad(x, p)
    x = F.conv2d(x, g.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-pixel SSIM between ``x`` and ``y`` (same shape, (H, W) or (B, H, W))."""
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    xb, single = _batch(x.to(torch.float32))
    yb, _ = _batch(y.to(torch.float32))
    stack = torch.cat((xb, yb, xb * xb, yb * yb, xb * yb), dim=1)
    mx, my, mxx, myy, mxy = _gauss_filter(stack, win_size, sigma).unbind(1)
    vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return _unbatch(s[:, None], single)


def high_pass(img: torch.Tensor, *, sigma: float = 1.0, factor: int = 2) -> torch.Tensor:
    """Noise2Quality's high-pass channel: ``I - upsample(downsample(GaussianBlur(I)))``.

    Gaussian blur (sigma in pixels, radius ceil(2 sigma), reflect borders), area
    downsampling by ``factor``, bilinear upsampling back. The paper gives the form, not
    the numbers; these are ours, and the same as ``qgate.models.preprocess.high_pass``.
    """
    xb, single = _batch(img.to(torch.float32))
    r = max(1, math.ceil(2 * sigma - 1e-9))
    g = _gauss1d(2 * r + 1, sigma, xb.device)
    h, w = xb.shape[-2:]
    low = F.pad(xb, (r, r, r, r), mode="reflect")
    low = F.conv2d(low, g.view(1, 1, -1, 1))
    low = F.conv2d(low, g.view(1, 1, 1, -1))
    if factor > 1:
        low = F.adaptive_avg_pool2d(low, (math.ceil(h / factor), math.ceil(w / factor)))
        low = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return _unbatch(xb - low, single)


def resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """Square resize of (H, W) or (B, H, W): bilinear, anti-aliased when shrinking - the
    resize the models' inputs get (``qgate.models.preprocess.resize2d``), so training data
    made at native resolution and resized here match what the service feeds them."""
    xb, single = _batch(img.to(torch.float32))
    if tuple(xb.shape[-2:]) == (size, size):
        return img.to(torch.float32)
    out = F.interpolate(xb, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return _unbatch(out, single)


def local_rms(img: torch.Tensor, size: int) -> torch.Tensor:
    """RMS of (H, W) or (B, H, W) over the area of each pixel of a ``size`` x ``size`` grid:
    carries the native-resolution noise level through a downsampling."""
    xb, single = _batch(img.to(torch.float32))
    out = F.adaptive_avg_pool2d(xb * xb, (size, size)).clamp_min(0).sqrt()
    return _unbatch(out, single)


def snr_label(
    hu: np.ndarray,
    body: np.ndarray | None = None,
    *,
    block: tuple[int, int, int] = (4, 16, 16),
    min_inside: float = 0.9,
) -> float:
    """Chest CT-IQA's SNR: mean / std of the signal in sub-volumes, pooled by the median.

    The signal is ``HU + 1000`` (attenuation relative to air; HU itself is ~0 for water and
    negative for fat and lung, which makes mean/std meaningless). Sub-volumes of ``block``
    voxels (slices, rows, cols) that lie at least ``min_inside`` inside the body count. The
    paper averaged sub-volume SNRs; the median is our choice (robust to edge blocks).
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim == 2:
        hu = hu[None]
    if body is None:
        body = body_mask(hu)
    bz, by, bx = (min(b, s) for b, s in zip(block, hu.shape, strict=True))
    z, y, x = (s // b for s, b in zip(hu.shape, (bz, by, bx), strict=True))
    sig = hu[: z * bz, : y * by, : x * bx] + 1000.0
    m = np.asarray(body, dtype=bool)
    if m.ndim == 2:
        m = np.broadcast_to(m, hu.shape)
    m = m[: z * bz, : y * by, : x * bx]
    blocks = sig.reshape(z, bz, y, by, x, bx).transpose(0, 2, 4, 1, 3, 5).reshape(z * y * x, -1)
    inside = m.reshape(z, bz, y, by, x, bx).transpose(0, 2, 4, 1, 3, 5).reshape(z * y * x, -1)
    keep = inside.mean(1) >= min_inside
    if not keep.any():
        return float("nan")
    b = blocks[keep]
    std = b.std(1)
    snr = b.mean(1) / np.maximum(std, 1e-3)
    return float(np.median(snr))


def body_mask(hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """The patient's body per slice ((H, W) or (Z, H, W) HU): above ``threshold``, holes
    (lungs, gas) filled, largest connected component only (drops the table)."""
    from scipy import ndimage

    hu = np.asarray(hu)
    squeeze = hu.ndim == 2
    stack = hu[None] if squeeze else hu
    out = np.zeros(stack.shape, dtype=bool)
    for i, sl in enumerate(stack):
        m = ndimage.binary_opening(sl > threshold, iterations=2)
        lab, n = ndimage.label(m)
        if n == 0:
            continue
        sizes = ndimage.sum(m, lab, index=np.arange(1, n + 1))
        out[i] = ndimage.binary_fill_holes(lab == (1 + int(np.argmax(sizes))))
    return out[0] if squeeze else out


_BRISQUE: Any = None


def brisque_label(gray01: np.ndarray) -> float:
    """BRISQUE (lower is better) of one windowed slice in [0, 1], via the ``brisque``
    package (its LIVE-trained SVR, offline). It wants (H, W, 3) uint8."""
    global _BRISQUE  # import-time registry-like cache of the loaded SVR model
    if _BRISQUE is None:
        from brisque import BRISQUE

        _BRISQUE = BRISQUE(url=False)
    g = np.clip(np.asarray(gray01, dtype=np.float32), 0.0, 1.0)
    u8 = np.round(g * 255.0).astype(np.uint8)
    with warnings.catch_warnings():  # the package trips numpy deprecations; not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(_BRISQUE.score(np.repeat(u8[..., None], 3, axis=2)))
