"""Chest CT-IQA (qgate.models.chestiqa): shapes, heads, loss, quality fit, predict, weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qgate.models import create_model, list_models
from qgate.models.chestiqa import (
    PAPER_COEF,
    PAPER_INTERCEPT,
    ChestIQANet,
    ChestIQAOutput,
    ChestIQATargets,
    QualityFit,
    predict_chestiqa,
)
from qgate.models.preprocess import ChestInputConfig

SMALL_INPUT = ChestInputConfig(depth=6, size=32)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models on shared cores: one thread avoids thread-pool contention (10x faster).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


def test_registered_and_sized() -> None:
    assert {"chestiqa_small", "chestiqa_tiny"} <= set(list_models("chestiqa"))
    small, tiny = create_model("chestiqa_small"), create_model("chestiqa_tiny")
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < 2_500_000  # < 10 MB in float32
    assert sum(p.numel() for p in tiny.parameters()) < n_small / 3
    assert isinstance(small, ChestIQANet) and len(small.features) == 5  # the paper's 5 parts
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in small.modules())


def test_forward_shapes_any_depth() -> None:
    model = create_model("chestiqa_tiny").eval()
    with torch.no_grad():
        for depth in (1, 6):
            out = model(torch.randn(2, 2, depth, 32, 32))
            assert isinstance(out, ChestIQAOutput)
            assert out.window_logits.shape == (2, 2) and out.dose_logits.shape == (2, 2)
            assert out.snr.shape == (2,) and out.brisque.shape == (2,)
            assert model.score(out).shape == (2,)
    assert (
        create_model("chestiqa_tiny", input=ChestInputConfig(noise_channel=False)).cfg.in_chans == 1
    )


def test_quality_fit_default_is_the_papers() -> None:
    fit = QualityFit()
    assert torch.allclose(fit.coef, torch.tensor(PAPER_COEF))
    # lung (1), low dose (0), SNR 60 (x 0.05 = 3), BRISQUE 40 (x 0.01 = 0.4), by hand:
    expected = 6.1930 - 0.0536 * 1 - 0.0256 * 0 - 0.1192 * 3.0 + 1.3802 * 0.4
    assert expected == pytest.approx(6.33388)
    score = fit(torch.tensor([[1.0, 0.0, 60.0, 40.0]]))
    assert float(score[0]) == pytest.approx(expected, abs=1e-5)
    assert float(fit(torch.zeros(1, 4))[0]) == pytest.approx(PAPER_INTERCEPT, abs=1e-6)


def test_quality_refit_recovers_known_coefficients() -> None:
    rng = np.random.default_rng(0)
    n = 60
    feats = np.column_stack(
        [rng.random(n), rng.random(n), rng.uniform(20, 120, n), rng.uniform(10, 70, n)]
    )
    true_coef = np.array([0.5, 1.5, 0.04, -0.8])  # per *scaled* feature
    scaled = feats * np.array([1.0, 1.0, 0.05, 0.01])
    scores = 3.0 + scaled @ true_coef
    fit = QualityFit()
    res = fit.refit(feats, scores)
    assert np.allclose(res.coef, true_coef, atol=1e-6)
    assert res.intercept == pytest.approx(3.0, abs=1e-6)
    assert res.rmse < 1e-6 and res.plcc == pytest.approx(1.0) and res.n == n
    assert float(fit(torch.tensor(feats[:1], dtype=torch.float32))[0]) == pytest.approx(
        scores[0], abs=1e-4
    )
    shrunk = QualityFit().refit(feats, scores, ridge=10.0)
    assert np.abs(shrunk.coef).sum() < np.abs(true_coef).sum()
    with pytest.raises(ValueError):
        fit.refit(feats[:, :3], scores)


def test_loss_weights_50_50_5_1() -> None:
    model = create_model("chestiqa_tiny")
    out = ChestIQAOutput(
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([[0.0, 2.0]]),
        torch.tensor([3.0]),
        torch.tensor([30.0]),
    )
    tgt = ChestIQATargets(
        torch.tensor([1]), torch.tensor([0]), torch.tensor([5.0]), torch.tensor([40.0])
    )
    total, parts = model.loss(out, tgt)
    ce = torch.nn.functional.cross_entropy
    assert torch.isclose(parts["window"], ce(out.window_logits, tgt.window))
    assert float(parts["snr"]) == pytest.approx(4.0) and float(parts["brisque"]) == pytest.approx(
        100.0
    )
    expected = 50 * parts["window"] + 50 * parts["dose"] + 5 * 4.0 + 1 * 100.0
    assert torch.isclose(total, expected)
    # Standardised regression loss: errors in units of the target std.
    norm = create_model("chestiqa_tiny", normalised_reg_loss=True)
    norm.set_target_stats(snr=(0.0, 2.0), brisque=(0.0, 10.0))
    parts_n = norm.loss(out, ChestIQATargets(snr=tgt.snr, brisque=tgt.brisque))[1]
    assert float(parts_n["snr"]) == pytest.approx(1.0) and float(
        parts_n["brisque"]
    ) == pytest.approx(1.0)
    assert set(parts_n) == {"snr", "brisque"}


def _toy_batch(g: torch.Generator, n: int) -> tuple[torch.Tensor, ChestIQATargets]:
    # Window from the grey level, dose from the noise; SNR and BRISQUE follow them.
    win = torch.randint(0, 2, (n,), generator=g)
    dose = torch.randint(0, 2, (n,), generator=g)
    sigma = torch.where(dose == 1, 0.05, 0.2)
    level = torch.where(win == 1, 0.2, 0.6)
    img = level.view(n, 1, 1, 1) + sigma.view(n, 1, 1, 1) * torch.randn(n, 4, 32, 32, generator=g)
    noise_ch = torch.log(sigma).view(n, 1, 1, 1) + 0.1 * torch.randn(n, 4, 32, 32, generator=g)
    return torch.stack([img, noise_ch], 1), ChestIQATargets(win, dose, 1.0 / sigma, 100 * level)


def test_learns_an_input_dependent_target() -> None:
    g = torch.Generator().manual_seed(0)
    # Standardised regression loss: in raw units (the paper's) BRISQUE's MSE swamps a
    # 20-step batch-of-8 signal with its noise.
    model = create_model("chestiqa_tiny", normalised_reg_loss=True)
    model.set_target_stats(snr=(12.5, 7.5), brisque=(40.0, 20.0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        x, t = _toy_batch(g, 8)
        loss, _ = model.loss(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Seeds 0-7 give 0.25-0.61; a model that cannot see its input stays near 1.
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])


def test_predict_labels_and_score() -> None:
    model = create_model("chestiqa_tiny", input=SMALL_INPUT)
    hu = np.random.default_rng(0).normal(-200, 300, (9, 48, 48)).astype(np.float32)

    def force(cls: int) -> None:
        with torch.no_grad():
            for head in (model.window_head, model.dose_head):
                head[-1].weight.zero_()
                head[-1].bias.copy_(torch.tensor([5.0, -5.0] if cls == 0 else [-5.0, 5.0]))

    force(1)
    pred = predict_chestiqa(model, hu)
    assert (pred.window_class, pred.dose_class) == ("lung", "high")
    assert pred.window_prob > 0.99 and pred.dose_prob > 0.99
    force(0)
    pred = predict_chestiqa(model, hu)
    assert (pred.window_class, pred.dose_class) == ("soft_tissue", "low")
    by_hand = model.quality(torch.tensor([pred.features]))
    assert pred.score == pytest.approx(float(by_hand[0]), abs=1e-5)
    assert pred.features[2] == pytest.approx(pred.snr) and pred.features[3] == pytest.approx(
        pred.brisque
    )
    assert set(pred.series_json()) == {"window_class", "dose_class", "snr", "brisque", "score"}


def test_target_stats_parameterise_the_regressions() -> None:
    model = create_model("chestiqa_tiny").eval()
    x = torch.randn(1, 2, 4, 32, 32)
    with torch.no_grad():
        z = model(x)
        model.set_target_stats(snr=(60.0, 20.0), brisque=(40.0, 10.0))
        out = model(x)
    assert float(out.snr[0]) == pytest.approx(60.0 + 20.0 * float(z.snr[0]), abs=1e-4)
    assert float(out.brisque[0]) == pytest.approx(40.0 + 10.0 * float(z.brisque[0]), abs=1e-4)


def test_safetensors_round_trip_keeps_refit_and_stats(tmp_path: Path) -> None:
    model = create_model("chestiqa_tiny").eval()
    model.set_target_stats(snr=(60.0, 20.0), brisque=(40.0, 10.0))
    rng = np.random.default_rng(1)
    model.quality.refit(rng.random((10, 4)), rng.random(10))
    path = tmp_path / "chestiqa_tiny.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = create_model("chestiqa_tiny", weights=path).eval()
    assert torch.equal(loaded.quality.coef, model.quality.coef)
    assert torch.equal(loaded.reg_mean, model.reg_mean)
    x = torch.randn(1, 2, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.score(model(x)), loaded.score(loaded(x)))
