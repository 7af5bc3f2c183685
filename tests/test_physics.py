"""Physics of the low-dose simulator, at small sizes (128-pixel images, 4x binned scanner).

What is checked, and against what:
* the projector against exact line integrals of ellipses, and against scikit-image's radon;
* FBP against scikit-image's iradon (parallel beam, and fan beam against parallel);
* noise sigma ~ 1/sqrt(dose) over 25-100 % dose, on both noise paths;
* the kernels order the noise power spectrum: sharper, more high-frequency noise;
* sparse views give streaks (structure along rays), not just more noise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.data import shepp_logan_phantom
from skimage.transform import iradon, radon, resize

from training.ct import CTOperator, LowDoseSimulator, ScanParams, resolve_kernel

N = 128
PX = 2.8  # mm: a 358 mm field, like 512 pixels of 0.7 mm
SMALL = ScanParams.binned(4)  # 288 views, 184 channels of the default fan


@pytest.fixture(scope="module")
def sim() -> LowDoseSimulator:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return LowDoseSimulator(SMALL, device="cpu")


def _disc(radius_mm: float, hu: float = 0.0, n: int = N, px: float = PX) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n]
    c = (n - 1) / 2
    r = np.hypot(yy - c, xx - c) * px
    return np.where(r <= radius_mm, hu, -1000.0).astype(np.float32)


def _radius(n: int = N, px: float = PX) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n]
    c = (n - 1) / 2
    return np.hypot(yy - c, xx - c) * px


def test_kernel_names() -> None:
    assert resolve_kernel("sharp") == ("ramp", 1.0)
    assert resolve_kernel("smooth") == ("hann", 0.7)
    assert resolve_kernel("shepp-logan:0.5") == ("shepp-logan", 0.5)
    with pytest.raises(ValueError):
        resolve_kernel("b30f")
    with pytest.raises(ValueError):
        ScanParams(kernel="hann:1.5")


def test_symmetry_and_cache_match_direct_computation() -> None:
    """The 90-degree symmetry and the grid cache change nothing but the speed."""
    img = torch.tensor(_disc(120.0, 0.0)) * 0 + torch.rand(N, N) * 0.02
    fast = CTOperator(SMALL, N, PX, device="cpu")
    slow = CTOperator(SMALL, N, PX, device="cpu", cache_bytes=0)
    slow.sym, slow.n_base = 1, SMALL.n_views
    s_fast, s_slow = fast.project(img), slow.project(img)
    assert torch.allclose(s_fast, s_slow, atol=1e-4)
    views = fast.sparse_views(3)
    r_fast = fast.fbp(s_fast[:, ::3], views)
    r_slow = slow.fbp(s_slow[:, ::3], views)
    assert torch.allclose(r_fast, r_slow, atol=1e-6)


def test_fan_projector_matches_exact_ellipse_integrals() -> None:
    """Line integrals of a rasterised ellipse phantom against the exact chord lengths."""
    op = CTOperator(SMALL, N, PX, device="cpu")
    ellipses = [  # x0, y0, a, b (mm), angle, mu (1/mm)
        (0.0, 0.0, 150.0, 110.0, 0.3, 0.02),
        (40.0, -30.0, 30.0, 50.0, -0.5, 0.01),
        (-50.0, 20.0, 20.0, 20.0, 0.0, 0.03),
    ]
    ss = 4  # supersampled rasterisation: area-weighted pixels
    sub = ((np.arange(N * ss) + 0.5) / ss - 0.5 - (N - 1) / 2) * PX
    yy, xx = np.meshgrid(sub, sub, indexing="ij")
    img = np.zeros_like(xx)
    for x0, y0, a, b, phi, mu in ellipses:
        c, s = math.cos(phi), math.sin(phi)
        u, v = (xx - x0) * c + (yy - y0) * s, -(xx - x0) * s + (yy - y0) * c
        img += mu * ((u / a) ** 2 + (v / b) ** 2 <= 1)
    img = img.reshape(N, ss, N, ss).mean((1, 3)).astype(np.float32)
    sino = op.project(torch.tensor(img))[0].double().numpy()

    ox, oy, dx, dy = (t.numpy() for t in op._rays(torch.arange(SMALL.n_views)))
    ox, oy = ox * PX, oy * PX
    exact = np.zeros_like(sino)
    for x0, y0, a, b, phi, mu in ellipses:
        c, s = math.cos(phi), math.sin(phi)
        px_, py_ = (ox - x0) * c + (oy - y0) * s, -(ox - x0) * s + (oy - y0) * c
        qx, qy = dx * c + dy * s, -dx * s + dy * c
        qa = (qx / a) ** 2 + (qy / b) ** 2
        qb = 2 * (px_ * qx / a**2 + py_ * qy / b**2)
        qc = (px_ / a) ** 2 + (py_ / b) ** 2 - 1
        disc = qb * qb - 4 * qa * qc
        exact += mu * np.where(disc > 0, np.sqrt(np.maximum(disc, 0)) / qa, 0.0)
    hit = exact > 0.5
    rel = np.abs(sino - exact)[hit] / exact[hit]
    assert np.sqrt(((sino - exact)[hit] ** 2).mean()) / np.sqrt((exact[hit] ** 2).mean()) < 0.01
    assert np.median(rel) < 0.005


def _shepp(n: int) -> np.ndarray:
    img = resize(shepp_logan_phantom(), (n, n), anti_aliasing=True).astype(np.float32)
    img[_radius(n, 1.0) > (n - 1) / 2 - 1] = 0
    return img


def test_parallel_beam_agrees_with_skimage() -> None:
    """Sinogram within 1 % (relative RMS) and FBP within 1 % of the range of radon/iradon.

    Odd size so that both put the rotation centre on the centre pixel. scikit-image turns
    the other way: its angle theta is our -theta, i.e. our view V - v, detector reversed.
    """
    n, v = 127, 180
    img = _shepp(n)
    theta = np.arange(v) * 180.0 / v
    sk = radon(img, theta=theta, circle=True)  # (D, V)
    params = ScanParams(geometry="parallel", n_views=v, n_det=n, det_pitch_mm=1.0)
    op = CTOperator(params, n, 1.0, device="cpu")
    ours = op.project(torch.tensor(img))[0].numpy().T  # (D, V)
    mapped = np.concatenate((ours[:, :1], ours[::-1, :0:-1]), axis=1)
    rel = np.sqrt(((mapped - sk) ** 2).mean()) / np.sqrt((sk**2).mean())
    assert rel < 0.01
    inside = _radius(n, 1.0) < (n - 1) / 2 - 2
    for window in ("ramp", "shepp-logan", "hann"):
        ref = iradon(sk, theta=theta, filter_name=window, circle=True)
        rec = op.fbp(op.project(torch.tensor(img)), kernel=window)[0].numpy()
        diff = np.sqrt(((rec - ref)[inside] ** 2).mean())
        err = np.sqrt(((ref - img)[inside] ** 2).mean())
        assert diff < 0.01 * (img.max() - img.min()), window
        assert diff < 0.25 * err, window  # the two agree far better than either with truth


def test_fan_beam_fbp_agrees_with_skimage() -> None:
    """Fan-beam FBP of a phantom against scikit-image's (parallel) iradon: within 2 %."""
    n = 127
    img = _shepp(n) * 0.02
    op = CTOperator(SMALL, n, PX, device="cpu")
    theta = np.arange(360) * 0.5
    inside = _radius(n, 1.0) < (n - 1) / 2 - 2
    for window in ("ramp", "hann"):
        rec = op.fbp(op.project(torch.tensor(img)), kernel=window)[0].numpy()
        ref = iradon(radon(img, theta, circle=True), theta, filter_name=window, circle=True)
        diff = np.sqrt(((rec - ref)[inside] ** 2).mean())
        assert diff < 0.02 * (img.max() - img.min()), window


def test_water_reconstructs_to_zero_hu(sim: LowDoseSimulator) -> None:
    hu = torch.tensor(_disc(100.0))
    line = sim.project(hu, PX)
    inner = _radius() < 80
    for kernel in ("smooth", "standard", "sharp"):
        rec = sim.reconstruct(line, PX, N, kernel=kernel)[0].numpy()
        assert abs(rec[inner].mean()) < 3.0, kernel
        assert abs(np.median(rec[_radius() > 170]) + 1000) < 5.0, kernel


def _noise_sigma(sim: LowDoseSimulator, line: torch.Tensor, dose: float, seed: int) -> float:
    g = sim.generator(seed)
    noisy = sim.acquire(line, dose, g)
    rec = sim.reconstruct(noisy, PX, N)
    clean = sim.reconstruct(line[:1], PX, N)
    roi = torch.tensor(_radius() < 60)
    return float((rec - clean)[:, roi].std())


def test_noise_scales_as_inverse_sqrt_dose(sim: LowDoseSimulator) -> None:
    """Water cylinder (20 cm), 25-100 % dose: sigma * sqrt(dose) constant within 10 %."""
    line = sim.project(torch.tensor(_disc(100.0)), PX).expand(6, -1, -1).contiguous()
    doses = (1.0, 0.5, 0.25)
    sig = {d: _noise_sigma(sim, line, d, seed=i) for i, d in enumerate(doses)}
    ref = sig[1.0]
    for d in doses:
        assert sig[d] * math.sqrt(d) == pytest.approx(ref, rel=0.10), (d, sig)


def test_dose_reduction_from_full_dose_scales_too(sim: LowDoseSimulator) -> None:
    """The Zeng path: a full-dose scan reduced to d has the noise of a scan at d."""
    line = sim.project(torch.tensor(_disc(100.0)), PX).expand(6, -1, -1).contiguous()
    full = sim.acquire(line, 1.0, sim.generator(1))
    clean = sim.reconstruct(line[:1], PX, N)
    roi = torch.tensor(_radius() < 60)
    sig_full = float((sim.reconstruct(full, PX, N) - clean)[:, roi].std())
    for i, d in enumerate((0.5, 0.25)):
        low = sim.reduce_dose(full, d, sim.generator(10 + i))
        sig = float((sim.reconstruct(low, PX, N) - clean)[:, roi].std())
        assert sig * math.sqrt(d) == pytest.approx(sig_full, rel=0.10), (d, sig, sig_full)


def _nps_radial(noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged 2-D NPS of noise-only ROIs (B, M, M); frequency in cycles/pixel."""
    roi = noise - noise.mean(axis=(1, 2), keepdims=True)
    ps = (np.abs(np.fft.fftshift(np.fft.fft2(roi), axes=(1, 2))) ** 2).mean(0)
    m = roi.shape[-1]
    f = np.fft.fftshift(np.fft.fftfreq(m))
    fr = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    bins = np.linspace(0, 0.5, 11)
    idx = np.digitize(fr.ravel(), bins) - 1
    prof = np.array([ps.ravel()[idx == i].mean() for i in range(10)])
    return (bins[:-1] + bins[1:]) / 2, prof


def test_sharper_kernels_shift_noise_power_to_high_frequency(sim: LowDoseSimulator) -> None:
    line = sim.project(torch.tensor(_disc(120.0)), PX).expand(6, -1, -1).contiguous()
    noisy = sim.acquire(line, 0.25, sim.generator(3))
    c = N // 2
    mean_f, hf_frac = {}, {}
    for kernel in ("smooth", "standard", "sharp"):
        rec = sim.reconstruct(noisy, PX, N, kernel=kernel)
        clean = sim.reconstruct(line[:1], PX, N, kernel=kernel)
        noise = (rec - clean)[:, c - 24 : c + 24, c - 24 : c + 24].numpy()
        f, prof = _nps_radial(noise)
        mean_f[kernel] = float((f * prof).sum() / prof.sum())
        hf_frac[kernel] = float(prof[f > 0.25].sum() / prof.sum())
    assert mean_f["smooth"] < mean_f["standard"] < mean_f["sharp"], mean_f
    assert hf_frac["smooth"] < hf_frac["standard"] < hf_frac["sharp"], hf_frac
    assert hf_frac["sharp"] > 1.5 * hf_frac["smooth"], hf_frac


def _anisotropy(err: np.ndarray, r_lo: float = 40.0, r_hi: float = 100.0) -> float:
    """Angular over radial variance of an error image on a polar grid about the centre.

    Streaks through a wire at the centre are radial lines: across them (along the angle)
    the error swings, along them (along the radius) it stays put, so the ratio is large.
    Noise is about isotropic, so the ratio is about 1. Rings (the mean at each radius) are
    removed first so that they count for neither.
    """
    t = torch.tensor(err, dtype=torch.float32)[None, None]
    theta = torch.linspace(0, 2 * math.pi, 720 + 1)[:-1]
    radii = torch.linspace(r_lo, r_hi, 64)
    rr, tt = torch.meshgrid(radii, theta, indexing="ij")
    scale = 2 / ((N - 1) * PX)
    grid = torch.stack((rr * torch.cos(tt) * scale, rr * torch.sin(tt) * scale), -1)[None]
    polar = torch.nn.functional.grid_sample(t, grid, align_corners=True)[0, 0]
    polar = polar - polar.mean(1, keepdim=True)
    return float(polar.var(1).mean() / polar.var(0).mean())


def test_sparse_views_make_streaks_not_just_noise(sim: LowDoseSimulator) -> None:
    """A thin dense wire in water. With 1/8 of the views (36) it streaks radially; the
    noise of a 5 % dose scan is isotropic. Both are measured against the all-view,
    full-dose reconstruction."""
    hu = _disc(110.0)
    hu[_radius() <= 3.0] = 3000.0
    line = sim.project(torch.tensor(hu), PX)
    full = sim.reconstruct(line, PX, N)[0].numpy()
    streak = sim.reconstruct(line, PX, N, views_step=8)[0].numpy() - full
    noisy = sim.acquire(line, 0.05, sim.generator(5))
    noise = sim.reconstruct(noisy, PX, N)[0].numpy() - full
    annulus = (_radius() > 40) & (_radius() < 100)
    assert streak[annulus].std() > 10.0  # large, not rounding error
    a_streak, a_noise = _anisotropy(streak), _anisotropy(noise)
    assert a_streak > 3.0, a_streak
    assert a_noise < 1.5, a_noise
    # More views, fewer streaks: all views reproduce the reference exactly.
    two = sim.reconstruct(line, PX, N, views_step=2)[0].numpy() - full
    assert two[annulus].std() < 0.2 * streak[annulus].std()


def test_simulate_end_to_end(sim: LowDoseSimulator) -> None:
    hu = torch.tensor(np.stack([_disc(100.0), _disc(120.0, 40.0)]))
    res = sim.simulate(hu, PX, 0.25, views_step=2, generator=sim.generator(0))
    assert res.low.shape == res.full.shape == (2, N, N)
    assert res.clean is None
    res2 = sim.simulate(hu, PX, 0.25, generator=sim.generator(0), noiseless_input=True)
    assert res2.clean is not None
    roi = torch.tensor(_radius() < 60)
    # Phantom path: the full-dose image carries its own noise; low dose has more.
    assert (res2.full - res2.clean)[:, roi].std() > 0.5
    assert (res2.low - res2.clean)[:, roi].std() > 1.5 * (res2.full - res2.clean)[:, roi].std()
    with pytest.raises(ValueError):
        sim.simulate(hu, PX, 1.5)
    with pytest.raises(ValueError):
        sim.simulate(hu, PX, 0.5, views_step=7)  # 288 views are not divisible by 7
