"""The linear dose ladder (training.ct.fastsim) against the full simulator (issue 10)."""

from __future__ import annotations

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
