"""CT preprocessing shared by the models, their training and the worker.

Everything here is plain torch (numpy arrays are accepted and converted), works on any
device and never imports ``qgate.models``: training, serving and the other models import
it, so that the pixels a model was trained on are the pixels it is served (timm's
``resolve_model_data_config`` habit; each model config holds its input config below).

Tensors are (..., rows, cols) unless stated; HU in, float32 out.

Contents
--------
- :func:`window` / :func:`hu_to_unit`: HU to [0, 1].
- :func:`gaussian_blur`, :func:`high_pass`: the Noise2Quality high-pass image
  ``I - upsample(downsample(GaussianBlur(I)))`` (one Laplacian-pyramid level).
- :func:`resize2d`, :func:`local_rms`, :func:`depth_indices`: resampling.
- :func:`ssim_map`: the Noise2Quality target (Gaussian 11 x 11, sigma 1.5).
- :class:`N2QInputConfig` + :func:`prepare_n2q_input`,
  :class:`ChestInputConfig` + :func:`prepare_chest_input`: a model's full input pipeline.
- :func:`inference_context`, :func:`device_layout`: how inputs meet the device (bf16
  autocast and channels_last on CUDA, plain fp32 on CPU).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from qgate.core.physics import WINDOWS

__all__ = [
    "ChestInputConfig",
    "N2QInputConfig",
    "as_tensor",
    "below_floor",
    "depth_indices",
    "device_layout",
    "gaussian_blur",
    "gaussian_kernel1d",
    "high_pass",
    "hu_to_unit",
    "inference_context",
    "local_rms",
    "prepare_chest_input",
    "prepare_n2q_input",
    "resize2d",
    "ssim_map",
    "window",
]

ArrayLike = np.ndarray | torch.Tensor


def as_tensor(x: ArrayLike, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A float tensor view/copy of ``x`` on its own device (numpy goes to CPU)."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


def _float(x: ArrayLike) -> torch.Tensor:
    """``x`` as a floating tensor, keeping a floating tensor's dtype and device."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x
    return as_tensor(x)


def _as_4d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """(..., H, W) -> (N, 1, H, W), remembering the leading shape."""
    if x.ndim < 2:
        raise ValueError(f"need at least 2-D (rows, cols), got shape {tuple(x.shape)}")
    lead = x.shape[:-2]
    return x.reshape(-1, 1, *x.shape[-2:]), lead


def window(hu: ArrayLike, center: float, width: float) -> torch.Tensor:
    """Display window ``center``/``width`` (HU) mapped linearly to [0, 1], clipped."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    lo = center - width / 2.0
    return ((as_tensor(hu) - lo) / width).clamp_(0.0, 1.0)


def hu_to_unit(hu: ArrayLike, hu_range: tuple[float, float]) -> torch.Tensor:
    """Clip HU to ``hu_range`` = (low, high) and map it linearly to [0, 1]."""
    lo, hi = hu_range
    if not hi > lo:
        raise ValueError(f"hu_range must be (low, high), got {hu_range}")
    return window(hu, (lo + hi) / 2.0, hi - lo)


def gaussian_kernel1d(
    sigma: float,
    *,
    truncate: float = 2.0,
    radius: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius ``ceil(truncate * sigma)`` (>= 1) unless given."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if radius is None:
        radius = max(1, math.ceil(truncate * sigma - 1e-9))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(
    x: ArrayLike, sigma: float, *, truncate: float = 2.0, radius: int | None = None
) -> torch.Tensor:
    """Separable Gaussian blur over the last two axes, reflect padding at the borders.

    Reflect padding keeps a constant image constant (and so the high-pass exactly zero).
    """
    x4, lead = _as_4d(_float(x))
    k = gaussian_kernel1d(sigma, truncate=truncate, radius=radius, dtype=torch.float64).tolist()
    r = len(k) // 2
    h, w = x4.shape[-2:]
    # Reflect padding needs r < size; fall back to replicate for tiny images.
    xp = F.pad(x4, (r, r, r, r), mode="reflect" if r < min(h, w) else "replicate")
    # Shifted multiply-adds: several times faster on CPU than a 1-channel conv2d.
    if xp.requires_grad:  # out-of-place, for autograd
        t = xp[..., 0:w] * k[0]
        for i in range(1, 2 * r + 1):
            t = t + k[i] * xp[..., i : i + w]
        y = t[..., 0:h, :] * k[0]
        for i in range(1, 2 * r + 1):
            y = y + k[i] * t[..., i : i + h, :]
    else:
        t = xp[..., 0:w] * k[0]
        for i in range(1, 2 * r + 1):
            t.add_(xp[..., i : i + w], alpha=k[i])
        y = t[..., 0:h, :] * k[0]
        for i in range(1, 2 * r + 1):
            y.add_(t[..., i : i + h, :], alpha=k[i])
    return y.reshape(*lead, h, w)


def resize2d(
    x: ArrayLike,
    size: int | tuple[int, int],
    *,
    mode: Literal["bilinear", "area", "nearest"] = "bilinear",
) -> torch.Tensor:
    """Resize the last two axes to ``size``; bilinear is anti-aliased when shrinking."""
    t = _float(x)
    out_hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(t.shape[-2:]) == out_hw:
        return t
    x4, lead = _as_4d(t)
    if mode == "bilinear":
        y = F.interpolate(x4, size=out_hw, mode="bilinear", align_corners=False, antialias=True)
    elif mode == "area":
        y = F.adaptive_avg_pool2d(x4, out_hw)
    else:
        y = F.interpolate(x4, size=out_hw, mode="nearest-exact")
    return y.reshape(*lead, *out_hw)


def high_pass(x: ArrayLike, *, sigma: float = 1.0, factor: int = 2) -> torch.Tensor:
    """High-pass image ``I - upsample(downsample(GaussianBlur(I)))``.

    One level of a Laplacian pyramid (``cv2.pyrDown``/``pyrUp`` style): blur with
    ``sigma`` (1 px is close to the 5-tap pyramid kernel), area-downsample by ``factor``,
    bilinear-upsample back to the input grid, subtract. Constants give exactly 0 and
    linear ramps 0 away from the border, so the result has ~zero mean and keeps noise,
    edges and fine texture: what differs between dose levels and kernels.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    x4, lead = _as_4d(_float(x))
    h, w = x4.shape[-2:]
    low = gaussian_blur(x4, sigma)
    if factor > 1:
        low = F.adaptive_avg_pool2d(low, (math.ceil(h / factor), math.ceil(w / factor)))
        low = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (x4 - low).reshape(*lead, h, w)


def local_rms(x: ArrayLike, size: int | tuple[int, int]) -> torch.Tensor:
    """Root-mean-square of ``x`` over the area each output pixel of ``size`` covers.

    Used to carry the native-resolution noise level through a downsampling that would
    otherwise average it away.
    """
    return resize2d(_float(x) ** 2, size, mode="area").clamp_min(0.0).sqrt()


def depth_indices(
    n_slices: int, depth: int, mode: Literal["even", "center"] = "even"
) -> np.ndarray:
    """Which of ``n_slices`` to take for a ``depth``-slice model input.

    ``even``: ``depth`` slices spread evenly over the series (nearest slice, no
    averaging, so each keeps its own noise). ``center``: ``depth`` consecutive slices
    around the middle. Short series repeat slices (nearest) to fill ``depth``.
    """
    if n_slices < 1 or depth < 1:
        raise ValueError(f"need n_slices >= 1 and depth >= 1, got {n_slices}, {depth}")
    if mode == "even" or n_slices <= depth:
        # Centres of depth equal bins, rounded to the nearest slice.
        pos = (np.arange(depth) + 0.5) * n_slices / depth - 0.5
        return np.clip(np.rint(pos), 0, n_slices - 1).astype(np.int64)
    if mode == "center":
        start = (n_slices - depth) // 2
        return np.arange(start, start + depth, dtype=np.int64)
    raise ValueError(f"unknown depth mode {mode!r}")


def ssim_map(
    x: ArrayLike,
    y: ArrayLike,
    *,
    win_size: int = 11,
    sigma: float = 1.5,
    k: tuple[float, float] = (0.01, 0.03),
    data_range: float = 1.0,
) -> torch.Tensor:
    """Per-pixel SSIM between ``x`` and ``y`` (same shape, (..., H, W)), in [-1, 1].

    Wang et al. 2004 with a ``win_size`` Gaussian window of ``sigma`` (the
    Noise2Quality target: 11 x 11, 1.5, K = (0.01, 0.03), data range 1 on the windowed
    image). Borders use reflect padding so the map has the input's size.
    """
    a, b = _float(x), _float(y)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a4, lead = _as_4d(a)
    b4, _ = _as_4d(b)
    h, w = a4.shape[-2:]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(t, sigma, radius=win_size // 2)

    mu_a, mu_b = blur(a4), blur(b4)
    s_aa = blur(a4 * a4) - mu_a**2
    s_bb = blur(b4 * b4) - mu_b**2
    s_ab = blur(a4 * b4) - mu_a * mu_b
    c1, c2 = (k[0] * data_range) ** 2, (k[1] * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2)
    return (num / den).reshape(*lead, h, w)


# --------------------------------------------------------------------------- Noise2Quality


@dataclass(frozen=True)
class N2QInputConfig:
    """Noise2Quality input: window, resize, then [image, high-pass image].

    Parameters
    ----------
    window_center, window_width : float
        HU window mapped to [0, 1] (public notebook: C 40 / W 300).
    size : int or None
        ``None`` (OUR default): no resampling, the slice at its own pixel grid, so the
        noise texture the SSIM map and the dose class depend on reaches the network at
        full strength (the notebook resized to 256, which averages 512-pixel noise down
        about 2x and mixes the pixel scale into the labels). An int: square input of that
        size (anti-aliased resize; the notebook's 256).
    highpass : bool
        Add the high-pass channel (the paper's 2-channel input; ``False`` is the
        "U-Net without HPF" ablation).
    highpass_sigma : float
        Blur of the high-pass, in pixels of the model input. OUR choice: 1.0, close to
        the 5-tap pyramid kernel; the paper does not give it.
    highpass_factor : int
        Down/up-sampling factor of the high-pass (one pyramid level: 2).
    tile : int or None
        OUR choice (issue 10): serve a slice larger than ``tile`` as ``tile`` x ``tile``
        windows of the prepared input (maps averaged where windows overlap, dose
        probabilities averaged weighted by each window's in-window pixels; see
        :func:`qgate.models.n2q.forward_tiled`), the context size the model was trained
        on. Every
        InstanceNorm normalises over its input's extent, so a whole 512 px slice (mostly
        air around the body) is another input distribution than the 128 px training
        crops: on the independent simulator the whole-slice mean drifted with the body's
        share of the slice. ``None``: the whole slice in one pass.
    tile_stride : int or None
        Step between windows (``None``: ``tile``, no overlap); the last window is flush
        with the border.
    floor_hu : float or None
        OUR choice (issue 10): the map is **1** wherever every pixel of the SSIM support
        (``floor_support`` pixels square, on the map's grid) is below ``floor_hu``. The
        label is SSIM in the C40/W400 window, whose floor is -160 HU: where the slice
        lies below it over the whole support, the slice and its noiseless reference are
        both the window's floor there, and SSIM of two equal constant patches is exactly
        1. The network only approximates this (0.77-0.96 over air on held-out slices,
        more air on some anatomies than others). ``None``: the network's map everywhere.
    floor_support : int
        Side of that support in pixels: the label SSIM's Gaussian window (11 px).
    local_std : bool
        OUR choice (issue 10, round 12): add a channel with the local standard deviation
        of the slice in the label's window (C40/W400, clipped) under the label SSIM's
        Gaussian (sigma 1.5 px), x 4. SSIM's contrast-structure term is set by the local
        variance of the reference against that of the noise; the image shows their sum,
        and a ReLU network forms a local variance (a square) only approximately. Tried in
        round 12 against the map's flatness across content (round 11's region table):
        fine-tunes left the channel's weights near zero and the scores unchanged
        (REPORT.md), so it stays off. ``False``: 2 channels.
    """

    window_center: float = 40.0
    window_width: float = 300.0
    size: int | None = None
    highpass: bool = True
    highpass_sigma: float = 1.0
    highpass_factor: int = 2
    tile: int | None = None
    tile_stride: int | None = None
    floor_hu: float | None = -160.0
    floor_support: int = 11
    local_std: bool = False

    def __post_init__(self) -> None:
        if self.floor_support < 1 or self.floor_support % 2 == 0:
            raise ValueError(f"floor_support must be odd and >= 1, got {self.floor_support}")
        if self.window_width <= 0:
            raise ValueError(f"window_width must be > 0, got {self.window_width}")
        if self.size is not None and self.size < 16:
            raise ValueError(f"size must be None or >= 16, got {self.size}")
        if self.tile is not None and self.tile < 16:
            raise ValueError(f"tile must be None or >= 16, got {self.tile}")
        if self.tile_stride is not None and not (
            self.tile is not None and 1 <= self.tile_stride <= self.tile
        ):
            raise ValueError("tile_stride needs a tile and must lie in [1, tile]")

    @property
    def in_chans(self) -> int:
        return (2 if self.highpass else 1) + int(self.local_std)


# the label's window and SSIM Gaussian (qgate.core.physics.ssim_map), for ``local_std``
LABEL_WINDOW = WINDOWS["abdomen"]
SSIM_SIGMA = 1.5


def local_std_channel(t: torch.Tensor, size: int | None) -> torch.Tensor:
    """(S, H, W) HU -> (S, 1, H', W'): 4 x the local std in the label's window."""
    lw = window(t, *LABEL_WINDOW)
    if size is not None:
        lw = resize2d(lw, size)
    # radius 5: the label SSIM's 11 px window
    m = gaussian_blur(torch.stack([lw, lw * lw], 1), SSIM_SIGMA, radius=5)
    return (4.0 * (m[:, 1] - m[:, 0] ** 2).clamp_min(0.0).sqrt())[:, None]


def prepare_n2q_input(hu: ArrayLike, cfg: N2QInputConfig) -> torch.Tensor:
    """HU slices (S, H, W) or (H, W) -> model input (S, C, H', W'), float32.

    Order: window to [0, 1] (clipped), resize to ``size`` when set (anti-aliased
    bilinear; ``None`` keeps the native grid, H' = H), then the high-pass of the windowed
    image as channel 1 (and with ``cfg.local_std`` the local std as the last channel) —
    all on the grid of the predicted SSIM map. Runs on ``hu``'s device.
    """
    t = as_tensor(hu)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise ValueError(f"hu must be (slices, rows, cols), got shape {tuple(t.shape)}")
    img = window(t, cfg.window_center, cfg.window_width)
    if cfg.size is not None:
        img = resize2d(img, cfg.size)
    img = img[:, None]
    chans = [img]
    if cfg.highpass:
        chans.append(high_pass(img, sigma=cfg.highpass_sigma, factor=cfg.highpass_factor))
    if cfg.local_std:
        chans.append(local_std_channel(t, cfg.size))
    return torch.cat(chans, dim=1) if len(chans) > 1 else img.contiguous()


def below_floor(hu: ArrayLike, cfg: N2QInputConfig) -> torch.Tensor | None:
    """(S, H', W') bool on the model input's grid: every pixel of the ``floor_support``
    square around it is below ``cfg.floor_hu`` (see :class:`N2QInputConfig`); ``None``
    when the rule is off. Runs on ``hu``'s device."""
    if cfg.floor_hu is None:
        return None
    t = as_tensor(hu)
    if t.ndim == 2:
        t = t[None]
    low = (t < cfg.floor_hu).float()
    if cfg.size is not None:
        low = (resize2d(low, cfg.size, mode="area") >= 1.0 - 1e-6).float()  # wholly below
    k = cfg.floor_support
    # a min filter: the neighbourhood is all below iff its max of "not below" is 0
    # (separable: rows, then columns; the same result as one k x k pool, 2.5x faster)
    above = F.max_pool2d(1.0 - low[:, None], (k, 1), stride=1, padding=(k // 2, 0))
    above = F.max_pool2d(above, (1, k), stride=1, padding=(0, k // 2))
    return above[:, 0] < 0.5


# --------------------------------------------------------------------------- Chest CT-IQA


@dataclass(frozen=True)
class ChestInputConfig:
    """Chest CT-IQA input: a short 3-D volume (1, C, depth, size, size).

    The paper gives no input size or normalisation; everything here is OUR choice.

    Parameters
    ----------
    depth : int
        Slices in the model input (32), picked by ``depth_mode``.
    depth_mode : {"even", "center"}
        ``even``: spread over the whole series, nearest slice (the paper feeds the whole
        sequence); ``center``: consecutive slices around the middle.
    size : int
        In-plane size (128): the whole slice is resized (anti-aliased), keeping the FOV.
    hu_range : tuple of float
        Image channel: HU clipped to this range and mapped to [0, 1]. Wide (-1000..1000)
        so both lung and soft-tissue contrast survive: the window/kernel class is read from
        the image, not from a display window.
    noise_channel : bool
        Add a channel with the native-resolution noise/sharpness level:
        ``log1p(local_rms(high_pass(HU)) / noise_ref_hu)`` over each output pixel's area.
        Resizing 512 -> 128 averages the noise texture away; this channel keeps what the
        dose and kernel classes (and SNR) depend on. ``False`` gives the paper's
        single-channel grey-level input.
    noise_ref_hu : float
        HU that maps to log1p(1) in the noise channel (10 HU: routine soft-tissue noise).
    highpass_sigma : float
        Blur of the high-pass, in native pixels.
    extra_sigmas : tuple of float
        More noise channels, one per high-pass blur here (native pixels; ours, issue 10).
        With two scales the network sees the noise's spectrum, not only its amplitude: a
        sharp (lung, bone) kernel puts its noise at the finest scale, a smooth one at
        coarser ones, and the dose is the amplitude relative to that.
    fov_mm : float or None
        Place every slice on a square field of this many mm (centred; cropped, or padded
        with air and zero noise) before resizing to ``size``, so one input pixel is always
        ``fov_mm / size`` mm and the patient's size in the input is their physical size.
        The noise a dose gives depends on that size (attenuation); ``None`` resizes the
        whole slice, whatever its pixel spacing (ours, issue 10).
    pixel_channel : bool
        Add a constant channel ``log2(pixel_mm / 0.7)``: per-pixel noise at one dose
        depends on the reconstruction pixel, which the image alone does not show (ours).
        Both need the pixel spacing (``prepare_chest_input(..., pixel_mm=)``).
    noise_stat : {"rms", "mad"}
        How a noise channel summarises the high-pass over each output pixel's area:
        ``rms`` (root mean square), or ``mad`` (1.4826 x the median absolute value: a
        noise sigma that edges and vessels, a minority of the pixels, hardly move; ours).
    """

    depth: int = 32
    depth_mode: Literal["even", "center"] = "even"
    size: int = 128
    hu_range: tuple[float, float] = (-1000.0, 1000.0)
    noise_channel: bool = True
    noise_ref_hu: float = 10.0
    highpass_sigma: float = 1.0
    extra_sigmas: tuple[float, ...] = ()
    fov_mm: float | None = None
    pixel_channel: bool = False
    noise_stat: Literal["rms", "mad"] = "rms"

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.extra_sigmas):
            raise ValueError(f"extra_sigmas must be > 0, got {self.extra_sigmas}")
        if self.depth < 1 or self.size < 32:
            raise ValueError(f"need depth >= 1 and size >= 32, got {self.depth}, {self.size}")
        if self.depth_mode not in ("even", "center"):
            raise ValueError(f"depth_mode must be 'even' or 'center', got {self.depth_mode!r}")
        if not self.hu_range[1] > self.hu_range[0]:
            raise ValueError(f"hu_range must be (low, high), got {self.hu_range}")
        if self.noise_ref_hu <= 0:
            raise ValueError(f"noise_ref_hu must be > 0, got {self.noise_ref_hu}")
        if self.noise_stat not in ("rms", "mad"):
            raise ValueError(f"noise_stat must be 'rms' or 'mad', got {self.noise_stat!r}")
        if self.fov_mm is not None and self.fov_mm <= 0:
            raise ValueError(f"fov_mm must be > 0, got {self.fov_mm}")

    @property
    def in_chans(self) -> int:
        return 1 + int(self.noise_channel) + len(self.extra_sigmas) + int(self.pixel_channel)

    @property
    def needs_pixel_mm(self) -> bool:
        return self.fov_mm is not None or self.pixel_channel


def local_mad(x: ArrayLike, size: int) -> torch.Tensor:
    """1.4826 x the median of ``|x|`` over the area each output pixel of ``size`` x ``size``
    covers (the area is first made a whole number of pixels by nearest resampling)."""
    t = _float(x).abs()
    x4, lead = _as_4d(t)
    h, w = x4.shape[-2:]
    k = max(1, math.ceil(max(h, w) / size))
    if (h, w) != (k * size, k * size):
        x4 = F.interpolate(x4, size=(k * size, k * size), mode="nearest")
    cols = F.unfold(x4, kernel_size=k, stride=k)  # (N, k*k, size*size)
    med = cols.median(dim=1).values.reshape(-1, 1, size, size)
    return (1.4826 * med).reshape(*lead, size, size)


def to_field(x: torch.Tensor, n: int, fill: float) -> torch.Tensor:
    """The last two axes centred on an ``n`` x ``n`` field: cropped, or padded with
    ``fill``."""
    h, w = x.shape[-2:]
    top, left = (h - n) // 2, (w - n) // 2
    # F.pad crops where the padding is negative
    return F.pad(x, (-left, n - w + left, -top, n - h + top), value=fill)


def prepare_chest_input(
    hu: ArrayLike, cfg: ChestInputConfig, *, pixel_mm: float | None = None
) -> torch.Tensor:
    """A series in HU (S, H, W) -> model input (1, C, depth, size, size), float32.

    ``pixel_mm`` (in-plane pixel spacing) is needed when ``cfg.fov_mm`` or
    ``cfg.pixel_channel`` is set. Runs on ``hu``'s device (pass a CUDA tensor to
    preprocess on the GPU).
    """
    t = as_tensor(hu)
    if t.ndim != 3:
        raise ValueError(f"hu must be (slices, rows, cols), got shape {tuple(t.shape)}")
    if cfg.needs_pixel_mm and not (pixel_mm and pixel_mm > 0):
        raise ValueError(f"this input needs the pixel spacing in mm, got {pixel_mm!r}")
    idx = torch.from_numpy(depth_indices(t.shape[0], cfg.depth, cfg.depth_mode))
    vol = t.index_select(0, idx.to(t.device))
    field = None if cfg.fov_mm is None else max(1, round(cfg.fov_mm / float(pixel_mm)))  # type: ignore[arg-type]

    def placed(x: torch.Tensor, fill: float) -> torch.Tensor:
        return x if field is None else to_field(x, field, fill)

    chans = [resize2d(placed(hu_to_unit(vol, cfg.hu_range), 0.0), cfg.size)]
    # the high-pass runs on the slice as acquired (no padded edge), the field after it
    stat = local_mad if cfg.noise_stat == "mad" else local_rms
    if cfg.noise_channel:
        hp = placed(high_pass(vol, sigma=cfg.highpass_sigma), 0.0)
        chans.append(torch.log1p(stat(hp, cfg.size) / cfg.noise_ref_hu))
    for sigma in cfg.extra_sigmas:
        hp = placed(high_pass(vol, sigma=sigma), 0.0)
        chans.append(torch.log1p(stat(hp, cfg.size) / cfg.noise_ref_hu))
    if cfg.pixel_channel:
        chans.append(torch.full_like(chans[0], math.log2(float(pixel_mm) / 0.7)))  # type: ignore[arg-type]
    return torch.stack(chans, dim=0)[None].contiguous()


# --------------------------------------------------------------------------- device


@contextlib.contextmanager
def inference_context(device: torch.device | str, *, amp: bool = True) -> Iterator[None]:
    """``inference_mode``, plus bf16 autocast on CUDA when ``amp``.

    CPU stays fp32: bf16 convolutions are slower than fp32 on most CPUs.
    """
    dev = torch.device(device)
    with torch.inference_mode():
        if amp and dev.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield


def device_layout(x: torch.Tensor) -> torch.Tensor:
    """channels_last (4-D) / channels_last_3d (5-D) on CUDA; unchanged elsewhere."""
    if x.device.type != "cuda":
        return x
    if x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.ndim == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x
