"""MD-IQA: shapes, eq. 1-2, read-outs, losses, EMA, ablation switches, weights round trip.

All on a micro config (32 px, 8 px patches) so the file runs in seconds on 2 CPU cores.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from qgate.models import create_model, list_models
from qgate.models.layers import DeformAlign, align_geometry
from qgate.models.losses_mdiqa import (
    MDIQALossConfig,
    consistency_loss,
    ensemble_pseudo_labels,
    joint_loss,
    lambda3_at,
    supervised_loss,
)
from qgate.models.mdiqa import (
    MDIQA,
    MDIQAConfig,
    body_frame,
    extract_crops,
    gaussian_targets,
    load_mdiqa,
    mdiqa_channels,
    mdiqa_crops,
    mdiqa_preprocess,
    mdiqa_random_crops,
    pool_crop_logits,
    predict_argmax,
    predict_soft,
    resolve_data_config,
    save_mdiqa,
)
from qgate.models.preprocess import hu_to_unit
from training.ema import ModelEMA

# 32 px input, 4 x 4 token grid: ConvNeXt stages of 8, 4 and 2 px exercise the strided,
# the same-size and the upsampling alignment paths.
# One input channel, so the model tests can feed plain (B, 1, 32, 32) tensors; the
# two-window native-crop input has its own tests below.
MICRO: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 8,
    "num_points": 40,
    "drop_path_rate": 0.0,
    "in_chans": 1,
}


def micro(**kw: Any) -> MDIQA:
    torch.manual_seed(0)
    return create_model("mdiqa_tiny", **{**MICRO, **kw})


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    # One thread: on a shared 2-core runner, 2-thread OpenMP barriers stall badly.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_registered() -> None:
    assert {"mdiqa_tiny", "mdiqa_small"} <= set(list_models("mdiqa"))


def test_shapes_and_resize_preprocess() -> None:
    m = micro(crop_mode="resize").eval()
    cfg = m.cfg
    hu = torch.full((2, 512, 512), -1000.0)
    hu[:, 32:480, 32:480] = 400.0  # exactly the crop region is bright
    x = mdiqa_preprocess(hu, resolve_data_config(m))
    assert x.shape == (2, 1, 32, 32)
    # Crop [32:480] keeps only the bright square: all pixels at (1 - 0.5) / 0.5 = 1.
    assert torch.allclose(x, torch.ones_like(x))
    # Non-512 matrices are cropped proportionally and resized to img_size.
    odd = mdiqa_preprocess(torch.zeros(3, 256, 300), resolve_data_config(cfg))
    assert odd.shape == (3, 1, 32, 32)
    assert mdiqa_crops(torch.zeros(3, 256, 300), resolve_data_config(cfg)).shape == (
        3,
        1,
        1,
        32,
        32,
    )
    hu_pts = torch.tensor([-2000.0, -1000.0, -300.0, 400.0, 3000.0])
    assert hu_to_unit(hu_pts, cfg.hu_window).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    with torch.no_grad():
        f = m.forward_features(x)
        logits = m.forward_head(f)
    assert f.shape == (2, cfg.fuse_dim, 4, 4)
    assert logits.shape == (2, 3, 41) and logits.dtype == torch.float32
    rgb = micro(in_chans=3, crop_mode="resize").eval()
    x3 = mdiqa_preprocess(hu, resolve_data_config(rgb))
    assert x3.shape == (2, 3, 32, 32)
    with torch.no_grad():
        assert rgb(x3).shape == (2, 3, 41)


def _body(size: int = 256, noise: float = 10.0) -> torch.Tensor:
    """An off-centre soft-tissue ellipse (40 HU + noise) in air."""
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = ((yy - 0.6 * size) / (0.25 * size)) ** 2 + ((xx - 0.45 * size) / (0.35 * size)) ** 2
    hu = torch.where(inside < 1, torch.tensor(40.0), torch.tensor(-1000.0))
    return (hu + noise * torch.randn(size, size, generator=g) * (inside < 1))[None]


def test_native_crops_keep_the_pixels_and_lie_on_the_body() -> None:
    cfg = MDIQAConfig(img_size=32, patch_size=8, n_crops=4)
    dc = resolve_data_config(cfg)
    assert cfg.in_chans == 2 and dc.crop_mode == "native"
    hu = _body()
    crops = mdiqa_crops(hu, dc)
    assert crops.shape == (1, 4, 2, 32, 32)
    centre, spread = body_frame(hu)
    assert abs(float(centre[0, 0]) - 0.6 * 256) < 3 and abs(float(centre[0, 1]) - 0.45 * 256) < 3
    # The crops lie on the body: (almost) all soft tissue.
    wide, soft = crops[0, :, 0], crops[0, :, 1]
    tissue = (wide > 0.3) & (wide < 0.7)
    assert float(tissue.float().mean()) > 0.9
    # No resampling: the soft-tissue window C40/W400 shows the 10 HU of noise 3.5x larger
    # than the wide window does, and at its full pixel value (10 / 400 * 2 per unit).
    ratio = float(soft[tissue].std() / wide[tissue].std())
    assert ratio == pytest.approx(1400 / 400, rel=0.05)
    assert float(soft[tissue].std()) == pytest.approx(10 / 400 * 2, rel=0.1)
    # The single-input preprocessing is the centroid crop.
    x = mdiqa_preprocess(hu, dc)
    assert x.shape == (1, 2, 32, 32)
    expect = extract_crops(mdiqa_channels(hu, dc), centre[:, None], 32)[:, 0]
    assert torch.equal(x, expect)
    # Images smaller than a crop are padded with air, crops near the edge shifted inside.
    assert mdiqa_crops(torch.zeros(2, 20, 24), dc).shape == (2, 4, 2, 32, 32)
    # ...each channel with its own air value: a window's -1, the local-std channel's 0
    small = -1024.0 + torch.zeros(1, 20, 24)
    small[:, 5:15, 5:19] = 40.0 + 10.0 * torch.randn(
        1, 10, 14, generator=torch.Generator().manual_seed(1)
    )
    ls = mdiqa_crops(small, replace(dc, local_std=True, in_chans=3))[0, 0]
    assert ls.shape == (3, 32, 32)
    assert float(ls[0, 0, 0]) == -1.0 and float(ls[2, 0, 0]) == -1.0  # the windows' air
    assert float(ls[1, 0, 0]) == float(ls[1].min()) and 0.0 <= float(ls[1, 0, 0]) < 0.01
    edge = extract_crops(mdiqa_channels(hu, dc), torch.tensor([[[0.0, 255.0]]]), 32)
    assert edge.shape == (1, 1, 2, 32, 32)
    # Random training crops come from the same frame.
    g = torch.Generator().manual_seed(0)
    rc = mdiqa_random_crops(
        mdiqa_channels(hu, dc).expand(3, -1, -1, -1),
        centre.expand(3, 2),
        spread.expand(3, 2),
        32,
        g,
    )
    assert rc.shape == (3, 2, 32, 32)


def test_crop_pooling_averages_the_distributions() -> None:
    logits = torch.randn(2, 4, 3, 41)
    pooled = pool_crop_logits(logits)
    assert pooled.shape == (2, 3, 41)
    per_crop = predict_soft(logits.flatten(0, 1)).view(2, 4).mean(1)
    assert torch.allclose(predict_soft(pooled), per_crop, atol=1e-5)


@pytest.mark.parametrize(("src", "dst"), [(64, 16), (32, 16), (16, 16), (8, 16), (28, 14), (7, 14)])
def test_align_geometry_hits_grid(src: int, dst: int) -> None:
    g = align_geometry(src, dst)
    al = DeformAlign(4, 6, 5, src, dst)
    y = al(torch.randn(1, 4, src, src), torch.randn(1, 6, dst, dst))
    assert y.shape == (1, 5, dst, dst), g


def test_gradients_reach_deformable_offsets() -> None:
    m = micro().train()
    x = torch.randn(2, 1, 32, 32)
    loss = supervised_loss(m(x), torch.tensor([1.0, 3.0]), m.cfg).total
    loss.backward()
    for al in m.align:
        assert al.offset.weight.grad is not None
        assert al.offset.weight.grad.abs().sum() > 0  # offsets (and masks) are learned
        assert al.dcn.weight.grad.abs().sum() > 0
    assert m.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    assert m.cnn is not None and m.cnn.stem[0].weight.grad.abs().sum() > 0


def test_gaussian_targets_normalised_and_peaked() -> None:
    n, taus = 100, (0.01, 0.05, 0.1)
    s = torch.tensor([0.0, 1.2, 2.0, 4.0])
    y = gaussian_targets(s, num_points=n, taus=taus, max_score=4.0)
    assert y.shape == (4, 3, n + 1)
    assert torch.allclose(y.sum(-1), torch.ones(4, 3), atol=1e-5)
    u = (s / 4.0 * n).round().long()
    assert (y.argmax(-1) == u[:, None]).all()
    # Wider tau -> flatter distribution.
    assert (y[:, 0].max(-1).values > y[:, 2].max(-1).values).all()
    # Read-outs of the targets themselves recover the score (argmax exactly).
    assert torch.allclose(predict_argmax(y.log()), s, atol=1e-6)
    assert torch.allclose(predict_soft(y[:, :1].log())[1:3], s[1:3], atol=1e-3)


def test_readouts_in_range() -> None:
    torch.manual_seed(1)
    for scale in (0.1, 1.0, 30.0):
        logits = torch.randn(16, 3, 41) * scale
        for r in (predict_argmax(logits), predict_soft(logits)):
            assert r.shape == (16,)
            assert (r >= 0).all() and (r <= 4).all()
    m = micro().eval()
    with torch.no_grad():
        x = torch.randn(4, 1, 32, 32)
        for readout in ("soft", "argmax"):
            p = m.predict(x, readout)  # type: ignore[arg-type]
            assert ((p >= 0) & (p <= 4)).all()


def _noise_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth phantom + white noise; the score falls linearly with the noise level."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    base = (xx**2 + yy**2 < 0.6).float() * 0.6
    sigma = torch.linspace(0.0, 0.7, n)
    x = base + sigma[:, None, None] * torch.randn(n, 32, 32, generator=g)
    scores = 4.0 * (1.0 - sigma / 0.7)
    return x[:, None], scores


def test_learns_noise_level() -> None:
    m = micro(drop_rate=0.0).train()
    x, s = _noise_batch()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = supervised_loss(m(x), s, m.cfg).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    m.eval()
    with torch.no_grad():
        pred = m.predict(x, "soft")
    # Ranks by noise: the prediction correlates with the true score.
    assert torch.corrcoef(torch.stack([pred, s]))[0, 1] > 0.8


def test_losses_and_schedule() -> None:
    cfg = MDIQAConfig(num_points=40)
    torch.manual_seed(2)
    logits = torch.randn(4, 3, 41, requires_grad=True)
    s = torch.tensor([0.0, 1.0, 2.5, 4.0])
    perfect = gaussian_targets(s, num_points=40, taus=cfg.taus).clamp_min(1e-30).log()
    assert float(supervised_loss(perfect, s, cfg).total) < 0.05
    assert supervised_loss(logits, s, cfg).total.item() > 0.5
    pdf = supervised_loss(logits, s, cfg, MDIQALossConfig(l2_on="pdf"))
    assert pdf.total.requires_grad
    # Consistency is zero against itself, positive otherwise, and never trains the teacher.
    assert consistency_loss(logits, logits, cfg).item() == 0.0
    teacher = torch.randn(4, 3, 41, requires_grad=True)
    consistency_loss(logits, teacher, cfg).backward()
    assert teacher.grad is None and logits.grad is not None
    # Ensemble pseudo-labels (scores and distributions) feed L_pseudo.
    ps, pd = ensemble_pseudo_labels([perfect, perfect])
    assert torch.allclose(ps, predict_soft(perfect), atol=1e-5) and pd.shape == (4, 3, 41)
    out = joint_loss(
        labelled_logits=logits,
        labels=s,
        unlabelled_logits=logits,
        pseudo=pd,
        teacher_logits=teacher,
        step=400,
        cfg=cfg,
    )
    assert math.isclose(out.parts["lambda3"], 0.1, rel_tol=1e-6)
    # Warm-up: monotone, crosses lambda2 = 0.1 at step 400, reaches 1.
    vals = [lambda3_at(t) for t in range(0, 2000, 50)]
    assert all(a <= b for a, b in itertools.pairwise(vals))
    assert lambda3_at(0) < 0.01 and lambda3_at(399) < 0.1 < lambda3_at(401)
    assert math.isclose(lambda3_at(5000), 1.0)


def test_ema_update_math() -> None:
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(net, decay=0.997)
    e0 = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net.train()(torch.randn(4, 3))  # moves BN running stats and its integer counter
    ema.update(net)
    for k, v in ema.module.state_dict().items():
        m = net.state_dict()[k]
        if v.is_floating_point():
            assert torch.allclose(v, 0.997 * e0[k] + 0.003 * m, atol=1e-6), k
        else:
            assert torch.equal(v, m)
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training
    warm = ModelEMA(net, decay=0.997, warmup=True)
    assert warm.decay_at(0) == pytest.approx(0.1) and warm.decay_at(10**6) == 0.997


def test_ablation_switches() -> None:
    single = micro(taus=(0.05,)).eval()
    nocnn = micro(use_cnn=False).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert single(x).shape == (2, 1, 41)
        assert nocnn(x).shape == (2, 3, 41)
    assert nocnn.cnn is None
    assert not any(k.startswith(("cnn.", "align.")) for k in nocnn.state_dict())
    with torch.no_grad():
        assert micro(weight_input="scores").eval()(x).shape == (2, 3, 41)
    with pytest.raises(TypeError):
        create_model("mdiqa_tiny", not_a_field=1)
    with pytest.raises(ValueError):
        create_model("mdiqa_tiny", in_chans=4)
    with pytest.raises(ValueError):
        create_model("mdiqa_tiny", n_crops=3)


def test_autocast_channels_last() -> None:
    m = micro().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def test_weights_round_trip(tmp_path: Path) -> None:
    m = micro().eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = m(x)
    f32, bf16 = tmp_path / "m32.safetensors", tmp_path / "m16.safetensors"
    save_mdiqa(m, f32, dtype=None)
    save_mdiqa(m, bf16)
    assert bf16.stat().st_size < 0.6 * f32.stat().st_size
    again = create_model("mdiqa_tiny", weights=f32, **MICRO).eval()
    with torch.no_grad():
        assert torch.allclose(again(x), ref, atol=1e-5)
        # bf16 storage, fp32 compute: scores move by far less than a label step (0.2).
        half = load_mdiqa(bf16).eval()
        assert half.cfg == m.cfg
        assert (predict_soft(half(x)) - predict_soft(ref)).abs().max() < 0.05
    with pytest.raises((ValueError, RuntimeError)):
        create_model("mdiqa_tiny", weights=f32)  # 128 px default: shapes do not fit


def test_noise_stats_path_sees_the_noise_level() -> None:
    """The texture statistics rise with noise that LayerNorm hides; zero-initialised, the
    path leaves an untrained network's output unchanged."""
    m = micro(in_chans=2).eval()  # the default: with the statistics
    plain = micro(in_chans=2, noise_stats=False).eval()
    dc = resolve_data_config(m)
    stats = []
    for sigma in (2.0, 8.0, 32.0):
        crops = mdiqa_crops(_body(noise=sigma), dc)[0]
        with torch.no_grad():
            stats.append(float(m.noise_stats(crops).mean()))
    assert stats[0] < stats[1] < stats[2]
    missing, unexpected = m.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("noise_") for k in missing)
    x = mdiqa_crops(_body(), dc)[0]
    with torch.no_grad():
        assert torch.allclose(m(x), plain(x), atol=1e-5)
    assert m.noise_proj is not None and plain.noise_proj is None
