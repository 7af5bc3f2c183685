"""The linear dose ladder (training.ct.fastsim) against the full simulator (issue 10)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training.ct import LowDoseSimulator, ScanParams
from training.ct.fastsim import ladder, max_linear_error


def _ellipse(n: int, px: float, a_mm: float = 120.0, b_mm: float = 85.0) -> torch.Tensor:
    c = (torch.arange(n) - n / 2 + 0.5) * px
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    hu = torch.full((n, n), -1000.0)
    hu[(xx / a_mm) ** 2 + (yy / b_mm) ** 2 < 1] = 0.0
    return hu[None].repeat(3, 1, 1)


@pytest.mark.parametrize("kernel", ["standard", "sharp"])
def test_noise_matches_full_simulator(kernel: str) -> None:
    torch.set_num_threads(2)
    n, px = 128, 2.8
    sim = LowDoseSimulator(ScanParams.binned(4, kernel=kernel), device="cpu")
    hu = _ellipse(n, px)
    bases = ladder(
        sim, hu, px, doses=(1.0, 0.25, 0.05), views_steps=(1, 4), generator=sim.generator(0)
    )
    line = sim.project(hu, px)
    clean = sim.reconstruct(line, px, n)
    # the noiseless part is the same reconstruction
    assert torch.allclose(bases[1].clean, clean, atol=1e-3)
    c = slice(n // 2 - 16, n // 2 + 16)
    for dose in (1.0, 0.25, 0.05):
        assert max_linear_error(sim, line, dose) < 0.02
        full = sim.reconstruct(sim.acquire(line, dose, sim.generator(1)), px, n)
        sd_full = float((full - clean)[:, c, c].std())
        sd_fast = float((bases[1].at(dose) - clean)[:, c, c].std())
        assert sd_fast == pytest.approx(sd_full, rel=0.12), (dose, sd_fast, sd_full)
    # noise rises as 1/sqrt(dose), fewer views give more noise and streaks
    s = [float((bases[1].at(d) - clean)[:, c, c].std()) for d in (1.0, 0.25, 0.05)]
    assert s[0] < s[1] < s[2]
    assert s[1] / s[0] == pytest.approx(2.0, rel=0.1)
    assert float((bases[4].at(1.0) - clean)[:, c, c].std()) > s[0]


def test_grid_crops_cover_the_slice() -> None:
    from qgate.models.mdiqa import grid_centers

    c = grid_centers((512, 512), 128, 3)
    assert c.shape == (9, 2)
    assert float(c.min()) == 64.0 and float(c.max()) == 448.0  # flush with both borders
    assert grid_centers((128, 128), 128, 3).shape == (1, 2)
    assert grid_centers((256, 512), 128, 3).shape == (6, 2)


def test_dose_classes_are_fractions_of_routine() -> None:
    from training.datasets.randomized import ROUTINE_EFF
    from training.fit.randomized import DOSE_LEVELS, dose_class

    eff = torch.tensor([1.0, 0.5, 0.25, 0.1, 0.05, 4.0]) * ROUTINE_EFF
    got = [DOSE_LEVELS[i] for i in dose_class(eff).tolist()]
    assert got == [100, 50, 25, 10, 5, 100]


def test_coarse_blocks_average_and_pad_with_air() -> None:
    from training.datasets.randomized import _downsample, _pad_to

    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 256, 256, generator=g) * 40.0
    small = _downsample(img, 4)
    assert small.shape == (2, 64, 64)
    # a 4 x 4 area mean of white noise has a quarter of its std
    assert float(small.std()) == pytest.approx(10.0, rel=0.1)
    assert torch.allclose(small[0, 0, 0], img[0, :4, :4].mean())
    assert _downsample(img, 1) is img
    padded = _pad_to(small, 160, -1024.0)
    assert padded.shape == (2, 160, 160)
    assert float(padded[0, 0, 0]) == -1024.0 and float(padded[0, -1, -1]) == -1024.0
    assert torch.equal(padded[:, 48:112, 48:112], small)
    assert _pad_to(img, 160, 0.0) is img


def test_rank_pairs_join_one_place_at_two_qualities() -> None:
    from training.fit.randomized import rank_pairs

    # block 0: group 0 at three qualities, group 1 once; block 1: unpaired (-1)
    mean = torch.tensor([0.9, 0.5, 0.2, 0.7, 0.8, 0.3])
    data = {
        "ssim": mean[:, None, None].expand(-1, 4, 4).clone(),
        "block": torch.tensor([0, 0, 0, 0, 1, 1]),
        "group": torch.tensor([0, 0, 0, 1, -1, -1]),
    }
    got = {tuple(p) for p in rank_pairs(data).tolist()}
    assert got == {(0, 1), (0, 2), (1, 2)}
    # pairs closer than the gap are left out; no paired block: no pairs
    assert len(rank_pairs({**data, "ssim": data["ssim"] * 0 + 0.5})) == 0
    assert len(rank_pairs({**data, "group": torch.full((6,), -1)})) == 0


def test_rank_loss_and_tied_windows() -> None:
    from training.fit.randomized import _windows, rank_loss

    # right order by at least half the label gap: no loss; wrong order: the full shortfall
    assert float(rank_loss(torch.tensor([3.0, 1.0]), torch.tensor([3.0, 1.0]))) == 0.0
    assert float(rank_loss(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0]))) == 1.5
    g = torch.Generator().manual_seed(0)
    hu = torch.arange(6 * 32 * 32, dtype=torch.float32).reshape(6, 32, 32) % 977
    pairs = torch.stack([hu[0], hu[0], hu[1], hu[1], hu[2], hu[3]])
    x, _ = _windows(pairs, torch.ones_like(pairs), 16, g, tied=2)
    assert torch.equal(x[0], x[1]) and torch.equal(x[2], x[3])  # one window per pair


@pytest.mark.slow
def test_paired_block_keeps_one_place_across_images() -> None:
    import numpy as np

    from training.datasets.randomized import RandomizedConfig, build_block

    torch.set_num_threads(2)
    # block 1 of seed 2 draws a sparse step; phantom anatomy (no real sources needed)
    cfg = RandomizedConfig(block=1, seed=2, paired=True, sparse_per_block=2, p_sparse=1.0)
    out = build_block(1, cfg, [], {})
    groups = out["group"]
    assert set(groups.tolist()) == set(range(cfg.crops_per_image))
    steps = sorted(set(out["views_step"].tolist()))
    assert len(steps) == 3 and steps[0] == 1  # full views and two distinct sparse steps
    for gid in range(cfg.crops_per_image):
        crops = out["hu"][groups == gid].astype(np.float32)
        ssim = out["ssim"][groups == gid].astype(np.float32).mean(axis=(1, 2))
        # one place: every image's crop is the same anatomy (high correlation), at
        # different qualities (different SSIM)
        for c in crops[1:]:
            assert np.corrcoef(crops[0].ravel(), c.ravel())[0, 1] > 0.5
        assert ssim.max() - ssim.min() > 0.01


def test_chest_soft_kernels_follow_the_pixel() -> None:
    """Round 9: a soft kernel's cutoff is a fraction of the reconstruction pixel's Nyquist, so
    at 1.0 mm its noise stays correlated where the detector-relative 'standard' is white."""
    import numpy as np

    from training.ct.params import resolve_kernel
    from training.datasets.chest_dr import ChestDRConfig, _class_doses, soft_kernel

    params = ScanParams(n_views=576)
    cfg = ChestDRConfig(soft_cutoff=(0.6, 1.0))
    rng = np.random.default_rng(0)
    for px in (0.6, 0.8, 1.0):
        for _ in range(20):
            window, cut = resolve_kernel(soft_kernel(rng, cfg, params, px))
            lp_mm = cut * 0.5 / params.iso_pitch_mm  # the cutoff in line pairs per mm
            assert window in ("hann", "cosine", "hamming")
            assert lp_mm <= 0.5 / px + 1e-3 and (lp_mm >= 0.6 * 0.5 / px - 1e-3 or cut == 1.0)
    # the routine scales every class dose; the tube output divides it
    a = _class_doses(np.random.default_rng(1), (0.6, 1.6), 3, 2.0, routine=1.0)
    b = _class_doses(np.random.default_rng(1), (0.6, 1.6), 3, 2.0, routine=0.25)
    assert np.allclose(a, 4 * np.asarray(b)) and all(0.3 <= d <= 0.8 for d in a)

    # pure noise through both kernels at 1.0 mm: neighbour correlation of the soft one is
    # clearly higher than the white-ish detector-relative 'standard'
    torch.set_num_threads(2)
    geo = ScanParams(geometry="parallel", n_views=180, n_det=320, det_pitch_mm=0.6)
    sim = LowDoseSimulator(geo, device="cpu")
    noise = torch.randn(1, 180, 320, generator=torch.Generator().manual_seed(0))
    soft = soft_kernel(np.random.default_rng(2), ChestDRConfig(soft_cutoff=(0.9, 0.9)), geo, 1.0)

    def corr(kernel: str) -> float:
        img = sim.reconstruct(noise, 1.0, 160, kernel=kernel)[0, 40:120, 40:120]
        img = img - img.mean()
        return float((img[:, 1:] * img[:, :-1]).mean() / (img * img).mean())

    assert corr(soft) > corr("standard") + 0.15, (corr(soft), corr("standard"))


def test_noise_dose_classes_follow_noise_relative_to_the_kernel() -> None:
    """Round 9: the dose class read as noise / kernel gain against one threshold, set by the
    median training chest at the edge of the dose spans; a sharper kernel has more gain."""
    from training.datasets.chest_dr import kernel_gain, noise_dose_classes

    soft, sharp = kernel_gain("parallel", "hann:0.6", 1.0), kernel_gain("parallel", "sharp", 1.0)
    assert 0 < soft < sharp / 2
    gains = torch.tensor([soft, soft, sharp, sharp, soft, sharp], dtype=torch.float32)
    # patient factor 4 at routine for the chests, 1.5 for the phantom (last two): the
    # threshold is the chests' 4 / sqrt(0.46) in noise / gain
    eff = torch.tensor([1.0, 0.25, 1.0, 0.25, 0.25, 1.0])
    patient = torch.tensor([4.0, 4.0, 4.0, 4.0, 1.5, 1.5])
    train = {
        "noise_hu": (patient / eff.sqrt() * gains).float(),
        "kernel_gain": gains,
        "eff_dose": eff,
        "chest": torch.tensor([1, 1, 1, 1, 0, 0]),
        "dose_class": torch.tensor([1, 0, 1, 0, 0, 1]),
    }
    val = {k: v[:2].clone() for k, v in train.items()}
    tau = noise_dose_classes(train, val)
    assert tau == pytest.approx(4.0 / 0.46**0.5, rel=1e-4)
    # the chests keep their class; the quiet (small) phantom at a quarter dose reads high
    assert train["dose_class"].tolist() == [1, 0, 1, 0, 1, 1]
    assert val["dose_class"].tolist() == [1, 0]
    # the issue's scale instead: the edge in HU of a Hann kernel on the clinical scanner
    from training.datasets.chest_dr import EDGE_KERNEL, ISSUE_EDGE_HU

    tau = noise_dose_classes(train, edge_hu=ISSUE_EDGE_HU)
    assert tau == pytest.approx(ISSUE_EDGE_HU / kernel_gain(*EDGE_KERNEL))
    rel = train["noise_hu"] / train["kernel_gain"]
    assert train["dose_class"].tolist() == (rel < tau).long().tolist()


@pytest.mark.slow
def test_chest_block_round9_recipe(tmp_path: Path) -> None:
    """One chest block of the round-9 recipe (phantom only, no real CT needed): both kernel
    classes, the dose spans of the whole photon budget, a pixel-relative soft kernel, and
    noise labels that agree with the simulated classes for this (typical) chest."""
    import json

    import numpy as np

    from training.datasets.chest_dr import (
        ISSUE_EDGE_HU,
        ChestDRConfig,
        build_block,
        load_chest_blocks,
        noise_dose_classes,
    )

    torch.set_num_threads(2)
    cfg = ChestDRConfig(p_phantom=1.0, routine=1.0, soft_cutoff=(0.6, 1.0), val_fraction=0.0)
    block = build_block(0, cfg, [], {})
    meta = json.loads(block["meta"].tobytes())
    assert meta["kernels"]["0"].split(":")[0] in ("hann", "cosine", "hamming")
    assert block["window_class"].tolist() == [0, 0, 1, 1]
    assert block["dose_class"].tolist() == [1, 0, 1, 0]
    eff = block["eff_dose"]
    assert 0.6 <= eff[0] <= 1.6 and 0.12 <= eff[1] <= 0.35
    n = block["noise_hu"]
    assert n[0] < n[1] and n[2] < n[3] and n[0] < n[2]  # dose and kernel both show
    (tmp_path / "blocks").mkdir()
    np.savez(tmp_path / "blocks" / "00000.npz", **block)
    train = load_chest_blocks([tmp_path], "train", gains=True)
    assert train["kernel_gain"][0] < train["kernel_gain"][2]
    noise_dose_classes(train, edge_hu=ISSUE_EDGE_HU)
    assert train["dose_class"].tolist() == [1, 0, 1, 0], (n.tolist(), train["kernel_gain"])


def test_pixel_kernels_and_fine_scanners_reach_the_pixel_nyquist() -> None:
    """Round 10: a kernel drawn in the pixel's frequency cuts off at (soft: 0.5-1.0 of) the
    pixel's Nyquist; only a scanner sampling finer than the pixel can carry noise up to it,
    so at 0.4 mm a fine scanner's ramp gives finer (less correlated) noise than the
    0.7 mm-sampled one's."""
    import numpy as np

    from training.ct.params import resolve_kernel
    from training.datasets.randomized import FINE_GEOMETRIES, GEOMETRIES, pixel_kernel

    rng = np.random.default_rng(0)
    for geo in (*GEOMETRIES.values(), *FINE_GEOMETRIES.values()):
        for px in (0.4, 0.7, 1.0):
            for _ in range(20):
                window, cut = resolve_kernel(pixel_kernel(rng, geo.iso_pitch_mm, px))
                lp_mm = cut * 0.5 / geo.iso_pitch_mm
                assert lp_mm <= 0.5 / px + 1e-3
                if window in ("ramp", "shepp-logan") and cut < 1.0:
                    assert lp_mm == pytest.approx(0.5 / px, rel=1e-2)
    for geo in FINE_GEOMETRIES.values():  # never capped by the detector at 0.4 mm
        assert geo.iso_pitch_mm < 0.4

    torch.set_num_threads(2)

    def corr(geo: ScanParams) -> float:
        # a ramp at the 0.4 mm pixel's Nyquist, as far as the detector allows
        kernel = f"ramp:{min(1.0, geo.iso_pitch_mm / 0.4):.3f}"
        sim = LowDoseSimulator(geo.with_(n_views=256), device="cpu")
        noise = torch.randn(1, 256, geo.n_det, generator=torch.Generator().manual_seed(0))
        img = sim.reconstruct(noise, 0.4, 160, kernel=kernel)[0, 40:120, 40:120]
        img = img - img.mean()
        return float((img[:, 1:] * img[:, :-1]).mean() / (img * img).mean())

    fine = FINE_GEOMETRIES["parallel-fine"]
    coarse = GEOMETRIES["parallel"]
    assert corr(fine) < corr(coarse) - 0.2, (corr(fine), corr(coarse))


def test_fine_sampling_scales_the_photons_with_the_pixel() -> None:
    import copy

    import numpy as np

    from training.datasets.randomized import (
        FINE_GEOMETRIES,
        GEOMETRIES,
        RandomizedConfig,
        draw_acquisition,
        fine_sampling,
    )

    base = draw_acquisition(np.random.default_rng(3), RandomizedConfig())
    off = fine_sampling(np.random.default_rng(0), RandomizedConfig(), copy.deepcopy(base))
    assert off == base  # the defaults leave earlier recipes alone
    on = RandomizedConfig(p_fine=1.0, pixel_kernels=1.0)
    for seed in range(10):
        acq = fine_sampling(np.random.default_rng(seed), on, copy.deepcopy(base))
        assert acq.geometry in FINE_GEOMETRIES and acq.geometry not in GEOMETRIES
        assert acq.output == pytest.approx(base.output * (0.7 / base.pixel_mm) ** 3)
        assert acq.kernel.split(":")[0] in ("hann", "cosine", "hamming", "shepp-logan", "ramp")


def test_a_textured_object_keeps_part_of_the_source_noise() -> None:
    """``p_texture``: a weaker denoise leaves the source's own noise in the object (and so
    in the label's reference); the default (3x its noise) removes it."""
    import numpy as np

    from training.datasets.randomized import OBJECT_N, clean_object

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256] - 127.5
    body = (yy**2 + xx**2) < 110**2
    src = np.where(body, 40.0 + rng.normal(0.0, 20.0, (256, 256)), -1024.0).astype(np.float32)
    core = np.zeros((OBJECT_N, OBJECT_N), bool)
    c = OBJECT_N // 2
    core[c - 40 : c + 40, c - 40 : c + 40] = True

    def texture(strength: float) -> float:
        obj = clean_object(src, 1.0, real=True, strength=strength)
        return float(obj[core].std())

    clean, weak, raw = texture(3.0), texture(1.0), texture(0.0)
    assert clean < 6.0 < weak < raw  # HU
    assert raw == pytest.approx(20.0, rel=0.1)  # no filter: the source as it is


@pytest.mark.slow
def test_chest_texture_is_structure_and_leaves_the_recipe_alone() -> None:
    """``ChestDRConfig.p_texture`` (round 13): a textured block keeps part of the source's
    own noise in its objects, so in the reference, not in the noise labels; everything
    else the block draws (split, source, scanner, pixel, kernels, doses) stays as without."""
    import json

    import numpy as np

    from training.datasets.chest_dr import ChestDRConfig, build_block
    from training.datasets.randomized import Source

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256] - 127.5
    body = (yy / 100) ** 2 + (xx / 120) ** 2 < 1
    lungs = ((yy / 60) ** 2 + ((np.abs(xx) - 55) / 40) ** 2) < 1
    sl = np.where(body, np.where(lungs, -800.0, 40.0), -1024.0)
    hu = (sl + np.where(body, rng.normal(0.0, 25.0, (12, 256, 256)), 0.0)).astype(np.int16)
    src = Source("synthetic_chest", hu, (2.0, 1.4, 1.4), "chest")
    torch.set_num_threads(2)
    base = ChestDRConfig(depth=2, p_phantom=0.0, routine=1.0, soft_cutoff=(0.6, 1.0))
    plain = build_block(0, base, [src], {})
    textured = build_block(0, replace(base, p_texture=1.0), [src], {})
    m0, m1 = (json.loads(b["meta"].tobytes()) for b in (plain, textured))
    s0, s1 = m0.pop("source"), m1.pop("source")
    assert ":t" not in s0 and s1.startswith(s0 + ":t")
    assert m0 == m1
    for k in ("window_class", "dose_class", "eff_dose"):
        assert plain[k].tolist() == textured[k].tolist()
    # the texture is structure: the noise labels hardly move...
    np.testing.assert_allclose(textured["noise_hu"], plain["noise_hu"], rtol=0.1)
    # ...but the object, and so the image, holds more of it
    assert float(s1.rsplit(":t", 1)[1]) < 1.0  # this seed's draw: a weak denoise
    assert float(textured["x"][0, 1].astype(np.float32).mean()) > float(
        plain["x"][0, 1].astype(np.float32).mean()
    )
