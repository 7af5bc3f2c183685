"""Shared CT preprocessing (qgate.models.preprocess): windows, high-pass, resampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qgate.models.preprocess import (
    ChestInputConfig,
    N2QInputConfig,
    depth_indices,
    device_layout,
    gaussian_blur,
    high_pass,
    hu_to_unit,
    inference_context,
    local_rms,
    prepare_chest_input,
    prepare_n2q_input,
    resize2d,
    ssim_map,
    window,
)


def test_window_maps_c40_w300_to_unit_range() -> None:
    hu = np.array([-1000.0, -110.0, 40.0, 190.0, 3000.0], dtype=np.float32)
    out = window(hu, 40.0, 300.0)
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert torch.allclose(
        hu_to_unit(torch.tensor([-1000.0, 0.0, 1000.0]), (-1000, 1000)),
        torch.tensor([0.0, 0.5, 1.0]),
    )
    with pytest.raises(ValueError):
        window(hu, 40.0, 0.0)


def test_high_pass_removes_constants_and_low_frequencies() -> None:
    const = torch.full((2, 64, 64), 0.7)
    assert high_pass(const).abs().max() < 1e-6

    i = torch.arange(64.0)
    low = torch.cos(2 * math.pi * i / 64)[:, None] * torch.cos(2 * math.pi * i / 64)[None, :]
    assert high_pass(low).std() < 0.05 * low.std()

    ramp = (0.01 * i)[None, :].expand(64, 64)
    assert high_pass(ramp)[4:-4, 4:-4].abs().max() < 1e-5  # exact away from the border


def test_high_pass_keeps_noise_with_zero_mean() -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 64, 64, generator=g)
    hp = high_pass(noise + 5.0)  # an offset must not leak through
    assert abs(float(hp.mean())) < 0.01
    assert float(hp.std() / noise.std()) > 0.8


def test_blur_fast_path_matches_autograd_path() -> None:
    x = torch.rand(2, 1, 20, 24)
    fast = gaussian_blur(x, 1.5)
    slow = gaussian_blur(x.clone().requires_grad_(True), 1.5)
    assert torch.allclose(fast, slow.detach(), atol=1e-6)
    assert torch.allclose(gaussian_blur(torch.ones(8, 8), 1.0), torch.ones(8, 8))


def test_ssim_map_identity_and_noise() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 32, generator=g)
    assert torch.allclose(ssim_map(x, x), torch.ones(32, 32), atol=1e-5)
    s_low = ssim_map(x, x + 0.05 * torch.randn(32, 32, generator=g))
    s_high = ssim_map(x, x + 0.3 * torch.randn(32, 32, generator=g))
    assert s_high.mean() < s_low.mean() < 1.0
    assert s_high.min() >= -1.0 and s_low.shape == (32, 32)


def test_resampling_helpers() -> None:
    assert resize2d(torch.ones(3, 50, 40), 16).shape == (3, 16, 16)
    assert torch.allclose(local_rms(torch.full((2, 32, 32), -3.0), 8), torch.full((2, 8, 8), 3.0))
    assert depth_indices(100, 4).tolist() == [12, 37, 62, 87]
    assert depth_indices(3, 5).tolist() == [0, 0, 1, 2, 2]  # short series repeat slices
    assert depth_indices(10, 4, "center").tolist() == [3, 4, 5, 6]


def test_prepare_n2q_input() -> None:
    hu = np.random.default_rng(0).normal(40, 50, (3, 40, 48)).astype(np.float32)
    x = prepare_n2q_input(hu, N2QInputConfig(size=32))
    assert x.shape == (3, 2, 32, 32) and x.dtype == torch.float32
    assert float(x[:, 0].min()) >= 0.0 and float(x[:, 0].max()) <= 1.0
    assert prepare_n2q_input(hu[0], N2QInputConfig(size=32, highpass=False)).shape == (1, 1, 32, 32)


def test_n2q_local_std_channel_reads_the_label_windows_local_std() -> None:
    """The channel is 4 x the local std in the label's C40/W400 window: zero on a constant
    slice, ~20/400 x 4 on 20 HU of white noise, and the std of an edge where there is one."""
    cfg = N2QInputConfig(local_std=True)
    assert cfg.in_chans == 3
    flat = prepare_n2q_input(np.full((1, 48, 48), 40.0, np.float32), cfg)
    assert flat.shape == (1, 3, 48, 48) and float(flat[:, 2].abs().max()) < 1e-6
    noise = np.random.default_rng(0).normal(40, 20, (2, 96, 96)).astype(np.float32)
    got = float(prepare_n2q_input(noise, cfg)[:, 2, 8:-8, 8:-8].mean())
    assert 0.17 < got < 0.21  # a Gaussian-weighted sample std reads a little under 0.2
    edge = np.full((1, 48, 48), 0.0, np.float32)
    edge[:, :, 24:] = 200.0  # 0.5 of the window apart: 4 x std ~1 at the edge, 0 far off
    ch = prepare_n2q_input(edge, cfg)[0, 2]
    assert float(ch[:, 23].min()) > 0.7 and float(ch[:, 4].max()) < 1e-6


def test_prepare_chest_input_noise_channel_tracks_noise() -> None:
    rng = np.random.default_rng(0)
    cfg = ChestInputConfig(depth=4, size=32)
    quiet = prepare_chest_input(rng.normal(40, 10, (6, 64, 64)).astype(np.float32), cfg)
    noisy = prepare_chest_input(rng.normal(40, 40, (6, 64, 64)).astype(np.float32), cfg)
    assert quiet.shape == (1, 2, 4, 32, 32)
    assert float(noisy[0, 1].mean()) > float(quiet[0, 1].mean()) + 0.5
    # The image channel cannot see it: 512 -> 128-style averaging hides the noise.
    single = prepare_chest_input(
        np.zeros((2, 64, 64), np.float32), ChestInputConfig(depth=3, size=32, noise_channel=False)
    )
    assert single.shape == (1, 1, 3, 32, 32)


def test_prepare_chest_input_physical_field() -> None:
    """With ``fov_mm`` a body keeps its size in mm whatever the pixel spacing, the padding
    is air with no noise, and the pixel channel carries log2(spacing / 0.7)."""
    rng = np.random.default_rng(0)
    cfg = ChestInputConfig(depth=2, size=32, fov_mm=96.0, pixel_channel=True)
    assert cfg.in_chans == 3 and cfg.needs_pixel_mm

    def disc(n: int, px: float) -> np.ndarray:
        yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
        body = (np.hypot(yy, xx) * px) < 24.0  # 48 mm across
        hu = np.where(body, 40.0, -1000.0) + body * rng.normal(0, 20, (n, n))
        return np.stack([hu, hu]).astype(np.float32)

    fine = prepare_chest_input(disc(250, 0.5), cfg, pixel_mm=0.5)  # 125 mm: cropped
    coarse = prepare_chest_input(disc(64, 1.0), cfg, pixel_mm=1.0)  # 64 mm: padded
    assert fine.shape == coarse.shape == (1, 3, 2, 32, 32)
    # 48 mm of body on a 96 mm field of 32 px: 16 px across in both
    for x in (fine, coarse):
        across = int((x[0, 0, 0, 16] > 0.3).sum())
        assert 15 <= across <= 17, across
    assert float(coarse[0, 1, 0, 0, 0]) == 0.0  # padded corner: no noise
    assert float(coarse[0, 1, 0, 16, 16]) > 0.5  # body: the noise
    assert float(fine[0, 2].mean()) == pytest.approx(np.log2(0.5 / 0.7), abs=1e-6)
    assert float(coarse[0, 2].mean()) == pytest.approx(np.log2(1.0 / 0.7), abs=1e-6)
    with pytest.raises(ValueError, match="pixel spacing"):
        prepare_chest_input(disc(64, 1.0), cfg)


def test_chest_noise_channel_mad_ignores_edges() -> None:
    """``noise_stat="mad"`` reads far less of sparse edges than the RMS does (the high-pass
    spreads an edge over a few rows, so it still reads some)."""
    rng = np.random.default_rng(1)
    hu = rng.normal(40, 10, (2, 192, 192)).astype(np.float32)
    hu[:, ::30, :] += 600.0
    mad = prepare_chest_input(hu, ChestInputConfig(depth=2, size=32, noise_stat="mad"))
    rms = prepare_chest_input(hu, ChestInputConfig(depth=2, size=32))
    clean = prepare_chest_input(
        rng.normal(40, 10, (2, 192, 192)).astype(np.float32),
        ChestInputConfig(depth=2, size=32, noise_stat="mad"),
    )
    # the noise channel is log1p(sigma / 10 HU)
    sigma_clean = float(np.expm1(clean[0, 1]).mean() * 10)
    sigma_mad = float(np.expm1(mad[0, 1]).mean() * 10)
    sigma_rms = float(np.expm1(rms[0, 1]).mean() * 10)
    assert 4.0 < sigma_clean < sigma_mad < 0.4 * sigma_rms, (sigma_clean, sigma_mad, sigma_rms)
    with pytest.raises(ValueError, match="noise_stat"):
        ChestInputConfig(noise_stat="max")  # type: ignore[arg-type]


def test_device_helpers_on_cpu() -> None:
    x = torch.zeros(1, 2, 8, 8)
    assert device_layout(x) is x
    with inference_context("cpu"):
        assert torch.is_inference_mode_enabled()
        assert not torch.is_autocast_enabled("cpu")
