"""Noise2Quality (qgate.models.n2q): shapes, output range, loss, learning, predict, weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qgate.models import create_model, list_models
from qgate.models.n2q import N2QConfig, N2QNet, N2QOutput, N2QTargets, predict_n2q
from qgate.models.preprocess import N2QInputConfig, gaussian_blur, high_pass


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models on shared cores: one thread avoids thread-pool contention (10x faster).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


def test_registered_and_sized() -> None:
    assert {"n2q_small", "n2q_tiny"} <= set(list_models("n2q"))
    small, tiny = create_model("n2q_small"), create_model("n2q_tiny")
    n_small = sum(p.numel() for p in small.parameters())
    n_tiny = sum(p.numel() for p in tiny.parameters())
    assert n_small < 2_500_000  # < 10 MB in float32
    assert n_tiny < n_small / 3
    assert isinstance(small, N2QNet) and small.cfg.widths == (16, 32, 64, 128, 256)
    # Pooled bottleneck (paper) + the 16 native-scale noise statistics (ours).
    assert small.dose_head.in_features == 256 + 16 and small.dose_head.out_features == 5
    assert small.encoder[0][0].in_channels == 2  # [image, high-pass], as in the paper
    paper = create_model("n2q_small", noise_stats=False)
    assert paper.dose_head.in_features == 256 and paper.noise_to_map is None
    assert small.cfg.input.size is None  # native grid: no resize


def test_noise_stats_track_the_noise_level() -> None:
    """The dose head's native-scale statistics rise with the noise InstanceNorm hides."""
    from qgate.models.preprocess import prepare_n2q_input

    model = create_model("n2q_tiny").eval()
    g = torch.Generator().manual_seed(0)
    base = torch.full((1, 64, 64), 40.0)
    stats = []
    for sigma in (2.0, 8.0, 32.0):
        hu = base + sigma * torch.randn(1, 64, 64, generator=g)
        with torch.no_grad():
            stats.append(model.noise_stats(prepare_n2q_input(hu, model.data_config)).mean())
    assert float(stats[0]) < float(stats[1]) < float(stats[2])
    # Native grid: the input keeps the slice's size.
    assert prepare_n2q_input(base, model.data_config).shape == (1, 2, 64, 64)


def test_forward_shapes_and_tanh_range() -> None:
    model = create_model("n2q_tiny").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 2, 48, 40))
        assert isinstance(out, N2QOutput)
        assert out.quality_map.shape == (2, 1, 48, 40)
        assert out.dose_logits.shape == (2, 5)
        # Untrained: a flat map near init_quality; any input stays inside SSIM's range.
        assert abs(float(out.quality_map.mean()) - 0.5) < 0.1
        wild = model(1e4 * torch.randn(2, 2, 32, 32)).quality_map
        assert float(wild.abs().max()) <= 1.0
        channels_last = model(
            torch.randn(2, 2, 32, 32).contiguous(memory_format=torch.channels_last)
        )
        assert channels_last.quality_map.shape == (2, 1, 32, 32)


def test_hpf_ablation_changes_input_channels() -> None:
    model = create_model("n2q_tiny", input=N2QInputConfig(highpass=False))
    assert model.cfg.in_chans == 1 and model.encoder[0][0].in_channels == 1
    with pytest.raises(TypeError):
        create_model("n2q_tiny", no_such_field=1)


def test_loss_is_map_mse_plus_alpha_ce() -> None:
    model = create_model("n2q_tiny")
    out = N2QOutput(
        torch.full((2, 1, 4, 4), 0.5), torch.tensor([[2.0, 0, 0, 0, 0], [0, 1, 0, 0, 0]])
    )
    tgt = N2QTargets(torch.full((2, 1, 4, 4), 0.7), torch.tensor([0, 1]))
    total, parts = model.loss(out, tgt)
    ce = torch.nn.functional.cross_entropy(out.dose_logits, tgt.dose)
    assert torch.isclose(parts["map"], torch.tensor(0.04))
    assert torch.isclose(total, 0.04 + 0.01 * ce)
    assert set(model.loss(out, N2QTargets(tgt.quality_map))[1]) == {"map"}


def _toy_batch(g: torch.Generator, n: int) -> tuple[torch.Tensor, N2QTargets]:
    # Smooth random images; the target map is the image, the class its mean brightness.
    z = gaussian_blur(torch.randn(n, 32, 32, generator=g), 2.0)
    lo, hi = z.amin((1, 2), keepdim=True), z.amax((1, 2), keepdim=True)
    z = (z - lo) / (hi - lo)
    dose = (z.mean((1, 2)) * 5).clamp(0, 4.99).long()
    return torch.stack([z, high_pass(z)], 1), N2QTargets(z[:, None].contiguous(), dose)


def test_learns_an_input_dependent_target() -> None:
    g = torch.Generator().manual_seed(0)
    model = create_model("n2q_tiny")
    x_val, t_val = _toy_batch(g, 16)

    def val() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            parts = model.loss(model(x_val), t_val)[1]
        model.train()
        return {k: float(v) for k, v in parts.items()}

    before = val()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(20):
        x, t = _toy_batch(g, 8)
        loss, _ = model.loss(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val()
    assert after["map"] < 0.5 * before["map"]
    assert after["dose"] < before["dose"]


def test_predict_maps_mask_mean_and_dose_class() -> None:
    cfg = N2QConfig(widths=(8, 16, 32, 64, 128), input=N2QInputConfig(size=64))
    model = N2QNet(cfg)
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 60, (3, 80, 96)).astype(np.float32)
    mask = np.zeros(hu.shape, bool)
    mask[0, 10:50, 20:70] = True
    mask[1] = True  # slice 2 keeps an empty mask
    pred = predict_n2q(model, hu, mask, batch_size=2)
    assert pred.maps is not None and pred.maps.shape == (3, 80, 96)
    assert pred.maps.dtype == np.float32 and np.abs(pred.maps).max() <= 1.0
    expected = pred.maps[mask].mean()
    assert pred.mean_quality == pytest.approx(float(expected), abs=1e-5)
    assert pred.slice_quality[0] == pytest.approx(float(pred.maps[0][mask[0]].mean()), abs=1e-5)
    assert np.isnan(pred.slice_quality[2])
    assert pred.dose_class in (5, 10, 25, 50, 75)
    assert pred.dose_probs.shape == (3, 5)
    assert np.allclose(pred.dose_probs.sum(1), 1.0, atol=1e-5)
    assert set(pred.series_json()) == {"mean_quality", "dose_class"}
    assert len(pred.slice_dose_class) == 3

    small = predict_n2q(model, hu[0], None, map_size="model", return_maps=True)
    assert small.maps is not None and small.maps.shape == (1, 64, 64)
    assert predict_n2q(model, hu[:1], return_maps=False).maps is None
    # Forcing the dose head's bias picks the class.
    with torch.no_grad():
        model.dose_head.bias.copy_(torch.tensor([0.0, 0, 0, 50.0, 0]))
    assert predict_n2q(model, hu[:1], return_maps=False).dose_class == 50


def test_safetensors_round_trip(tmp_path: Path) -> None:
    model = create_model("n2q_tiny").eval()
    path = tmp_path / "n2q_tiny.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = create_model("n2q_tiny", weights=path).eval()
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x).quality_map, loaded(x).quality_map)
    with pytest.raises((ValueError, RuntimeError)):  # shape mismatch
        create_model("n2q_small", weights=path)


def test_noise_stats_take_a_batch_of_one_in_training() -> None:
    """The statistics' norm falls back to its running statistics for a single sample."""
    model = create_model("n2q_tiny").train()
    out = model(torch.rand(1, 2, 32, 32))
    assert out.dose_logits.shape == (1, 5)


def test_tiled_serving_is_the_model_on_each_window() -> None:
    """``input.tile``: the map of a window is the model on that window alone (stride =
    tile: no overlap), overlaps are averaged, dose probabilities are the windows' mean,
    and a slice no larger than a tile is served whole."""
    from dataclasses import replace

    from qgate.models.n2q import forward_tiled

    model = create_model("n2q_tiny").eval()
    x = torch.rand(2, 2, 256, 192)
    with torch.inference_mode():
        out = forward_tiled(model, x, 128)
        assert out.quality_map.shape == (2, 1, 256, 192)
        top_left = model(x[:, :, :128, :128])
        tl = top_left.quality_map[..., :64]  # columns 64-127 are shared with the next window
        assert torch.allclose(out.quality_map[:, :, :128, :64], tl, atol=1e-5)
        # columns: windows at 0 and 64 (the last flush with the border): averaged overlap
        right = model(x[:, :, :128, 64:])
        both = (top_left.quality_map[..., 64:] + right.quality_map[..., :64]) / 2
        assert torch.allclose(out.quality_map[:, :, :128, 64:128], both, atol=1e-5)
        assert torch.allclose(out.dose_logits.exp().sum(dim=1), torch.ones(2), atol=1e-5)
        small = torch.rand(1, 2, 96, 96)
        assert torch.equal(forward_tiled(model, small, 128).quality_map, model(small).quality_map)
    tiled = create_model("n2q_tiny", input=replace(N2QInputConfig(), tile=128, tile_stride=96))
    tiled.load_state_dict(model.state_dict())
    hu = np.random.default_rng(0).normal(40, 30, (1, 300, 300)).astype(np.float32)
    p = predict_n2q(tiled, hu)
    assert p.maps is not None and p.maps.shape == (1, 300, 300)
    assert np.isfinite(p.maps).all()
    with pytest.raises(ValueError):
        N2QInputConfig(tile=128, tile_stride=200)


@pytest.mark.parametrize("channels_last", [False, True])
def test_instance_norm_is_torchs_function(channels_last: bool) -> None:
    from qgate.models.layers import InstanceNorm2d

    torch.manual_seed(0)
    ours, ref = InstanceNorm2d(6, affine=True), torch.nn.InstanceNorm2d(6, affine=True)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 2.0, 6))
            m.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    x = torch.randn(3, 6, 20, 24) * 5 + 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    # same parameter names: weights saved from torch's module load unchanged
    assert ours.state_dict().keys() == ref.state_dict().keys()
    with pytest.raises(ValueError, match="spatial element"):  # as torch: no stats of 1 pixel
        ours(torch.randn(2, 6, 1, 1))


def test_map_is_one_where_the_slice_is_below_the_label_floor() -> None:
    """``input.floor_hu``: where every pixel of the SSIM support is below the label
    window's floor, the map is exactly 1; next to tissue and with the rule off it is the
    network's."""
    from dataclasses import replace

    from qgate.models.preprocess import below_floor

    rng = np.random.default_rng(0)
    hu = np.full((1, 96, 96), -1000.0, np.float32) + rng.normal(0, 20, (1, 96, 96)).astype(
        np.float32
    )
    hu[:, 30:60, 30:60] = 40 + rng.normal(0, 20, (1, 30, 30))  # a block of tissue
    cfg = N2QInputConfig()
    assert cfg.floor_hu == -160.0 and cfg.floor_support == 11
    floor = below_floor(hu, cfg)
    assert floor is not None and floor.shape == (1, 96, 96)
    assert bool(floor[0, 0, 0]) and bool(floor[0, 90, 90])
    assert not floor[0, 30:60, 30:60].any()
    assert not bool(floor[0, 45, 25]) and bool(floor[0, 45, 24])  # 5 px margin, 11 px support
    model = create_model("n2q_tiny").eval()
    on = predict_n2q(model, hu)
    off_model = create_model("n2q_tiny", input=replace(cfg, floor_hu=None)).eval()
    off_model.load_state_dict(model.state_dict())
    off = predict_n2q(off_model, hu)
    assert on.maps is not None and off.maps is not None
    mask = floor[0].numpy()
    assert (on.maps[0][mask] == 1.0).all()
    assert not (off.maps[0][mask] == 1.0).all()  # the network alone does not give 1 there
    np.testing.assert_allclose(on.maps[0][~mask], off.maps[0][~mask], atol=1e-6)
    with pytest.raises(ValueError):
        N2QInputConfig(floor_support=4)
