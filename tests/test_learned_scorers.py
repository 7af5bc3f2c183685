"""The learned scorers (qgate.score.scorers.learned): outputs, subsampling, weights, pipeline.

Weights are random-init tiny models written to a temporary folder: these tests check the
plumbing (keys, types, ranges, lengths, maps, errors), never the quality of the scores.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qgate.core.config import LearnedScorerConfig, SliceScorerConfig, load_settings
from qgate.report.sc import select_slices
from qgate.score.pipeline import build_scorers, scores_json
from qgate.score.scorers import SeriesVolume, create_scorer
from qgate.score.scorers.learned import (
    ChestIQAScorer,
    MDIQAScorer,
    N2QScorer,
    WeightsNotFoundError,
    load_model,
    resolve_device,
    subsample_indices,
)
from qgate.synth import phantom_slice

N_SLICES = 7
SIZE = 96


def write_random_weights(folder: Path) -> dict[str, Path]:
    """Random-init tiny weights for the three scorers, as the scorers load them.

    MD-IQA through its own save helper (config in the metadata); Noise2Quality with the
    ``qgate_model`` metadata; Chest CT-IQA as a bare state dict (variant found by fit).
    """
    from qgate.models import create_model, save_mdiqa

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    paths = {f: folder / f"{f}.safetensors" for f in ("mdiqa", "n2q", "chestiqa")}
    save_mdiqa(create_model("mdiqa_tiny"), paths["mdiqa"])  # type: ignore[arg-type]
    n2q = create_model("n2q_tiny").state_dict()
    save_file(
        {k: v.contiguous() for k, v in n2q.items()},
        str(paths["n2q"]),
        metadata={"qgate_model": "n2q_tiny"},
    )
    chest = create_model("chestiqa_tiny").state_dict()
    save_file({k: v.contiguous() for k, v in chest.items()}, str(paths["chestiqa"]))
    return paths


def synthetic_volume(n: int = N_SLICES, size: int = SIZE, noise: float = 15.0) -> SeriesVolume:
    rng = np.random.default_rng(0)
    clean = np.stack([phantom_slice(size, size, i / max(n - 1, 1)) for i in range(n)])
    hu = clean + rng.normal(0, noise, (n, size, size)).astype(np.float32)
    return SeriesVolume(
        hu=hu.astype(np.float32),
        pixel_spacing=(0.8, 0.8),
        slice_thickness=2.5,
        slice_positions=tuple(2.5 * i for i in range(n)),
        sop_instance_uids=tuple(f"1.2.3.{i + 1}" for i in range(n)),
        frame_numbers=(1,) * n,
        series_instance_uid="1.2.3",
        study_instance_uid="1.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models on shared cores: one thread avoids thread-pool contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_random_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def volume() -> SeriesVolume:
    return synthetic_volume()


def _slice_cfg(path: Path, max_slices: int | None = None) -> SliceScorerConfig:
    return SliceScorerConfig(weights=path, max_slices=max_slices, batch_size=4)


def test_mdiqa_outputs(weights: dict[str, Path], volume: SeriesVolume) -> None:
    scorer = create_scorer("mdiqa", config=_slice_cfg(weights["mdiqa"]), device="cpu")
    assert isinstance(scorer, MDIQAScorer) and scorer.name == "mdiqa"
    out = scorer.score(volume)
    assert set(out.series) == {"score", "score_argmax", "slices_scored"}
    for key in ("score", "score_argmax"):
        assert isinstance(out.series[key], float) and 0.0 <= out.series[key] <= 4.0
    assert out.series["slices_scored"] == N_SLICES
    assert set(out.slices) == {"slice_scores", "slice_scores_argmax"}
    for values in out.slices.values():
        assert len(values) == N_SLICES
        assert all(isinstance(v, float) and 0.0 <= v <= 4.0 for v in values)
    assert out.series["score"] == pytest.approx(np.mean(out.slices["slice_scores"]), abs=1e-3)
    assert out.maps == [] and set(out.units) >= set(out.series)


def test_n2q_outputs_and_map(weights: dict[str, Path], volume: SeriesVolume) -> None:
    scorer = create_scorer("n2q", config=_slice_cfg(weights["n2q"]), device="cpu")
    assert isinstance(scorer, N2QScorer)
    out = scorer.score(volume)
    assert set(out.series) == {"mean_quality", "body_quality", "dose_class", "slices_scored"}
    assert isinstance(out.series["mean_quality"], float)
    # SSIM's meaningful range for users: the map is clipped to [0, 1]
    assert 0.0 <= out.series["mean_quality"] <= 1.0
    assert 0.0 <= out.series["body_quality"] <= 1.0
    assert out.series["dose_class"] in scorer.n2q.cfg.dose_levels
    assert isinstance(out.series["dose_class"], int)
    assert out.units["dose_class"] == "%" and out.units["mean_quality"] == "1"
    per_slice = out.slices["mean_quality"]
    assert len(per_slice) == N_SLICES and all(0.0 <= v <= 1.0 for v in per_slice)

    (qmap,) = out.maps
    assert qmap.name == "quality" and qmap.unit == "1"
    assert qmap.display_range == (0.0, 1.0) and qmap.higher_is_better is True
    size = scorer.n2q.data_config.size or SIZE  # None: the native grid
    assert qmap.values.shape == (N_SLICES, size, size) and qmap.values.dtype == np.float32
    # exactly 1 only below the label window's floor (N2QInputConfig.floor_hu), else tanh < 1
    assert np.isfinite(qmap.values).all() and np.abs(qmap.values).max() <= 1.0


def test_chestiqa_outputs(weights: dict[str, Path], volume: SeriesVolume) -> None:
    scorer = create_scorer(
        "chestiqa", config=LearnedScorerConfig(weights=weights["chestiqa"]), device="cpu"
    )
    assert isinstance(scorer, ChestIQAScorer)
    assert type(scorer.chest).__name__ == "ChestIQANet"
    assert scorer.chest.cfg.widths == (8, 16, 32, 64, 128)  # found by fit: chestiqa_tiny
    out = scorer.score(volume)
    assert out.series["window_class"] in ("soft_tissue", "lung")
    assert out.series["dose_class"] in ("low", "high")
    for key in ("snr", "brisque", "score"):
        assert isinstance(out.series[key], float) and math.isfinite(out.series[key])
    for key in ("lung_window_probability", "high_dose_probability"):
        assert 0.0 <= out.series[key] <= 1.0
    assert out.slices == {} and out.maps == []


def test_subsampling(weights: dict[str, Path], volume: SeriesVolume) -> None:
    for n in range(1, 40):
        for k in range(2, 12):
            assert subsample_indices(n, k).tolist() == select_slices(n, k)
    assert subsample_indices(5, None).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        subsample_indices(5, 1)

    scored = [0, 3, 6]
    md = MDIQAScorer(_slice_cfg(weights["mdiqa"], max_slices=3), device="cpu").score(volume)
    n2q = N2QScorer(_slice_cfg(weights["n2q"], max_slices=3), device="cpu").score(volume)
    for out in (md, n2q):
        assert out.series["slices_scored"] == 3
        for values in out.slices.values():
            assert len(values) == N_SLICES
            assert [i for i, v in enumerate(values) if math.isfinite(v)] == scored
    mapped = np.isfinite(n2q.maps[0].values).all(axis=(1, 2))
    assert np.flatnonzero(mapped).tolist() == scored
    assert np.isnan(n2q.maps[0].values[~mapped]).all()
    assert md.series["score"] == pytest.approx(
        np.mean([md.slices["slice_scores"][i] for i in scored]), abs=1e-3
    )


def test_missing_and_unfit_weights(tmp_path: Path, weights: dict[str, Path]) -> None:
    missing = tmp_path / "none.safetensors"
    with pytest.raises(WeightsNotFoundError, match="n2q weights not found") as err:
        create_scorer("n2q", config=SliceScorerConfig(weights=missing), device="cpu")
    assert str(missing) in str(err.value) and "qgate-train fit --model n2q" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(ValueError, match="holds a 'n2q_tiny' model, not a chestiqa"):
        load_model("chestiqa", weights["n2q"])  # the metadata names another family
    with pytest.raises(ValueError, match="fit none of chestiqa_small, chestiqa_tiny"):
        load_model("chestiqa", weights["mdiqa"], variant=None)  # tries every chest variant
    with pytest.raises(ValueError, match="fit none of"):
        load_model("chestiqa", weights["chestiqa"], variant="chestiqa_small")
    with pytest.raises(ValueError, match=r"holds 'n2q_tiny', but scoring\.n2q\.variant"):
        load_model("n2q", weights["n2q"], variant="n2q_small")
    with pytest.raises(ValueError, match="not a mdiqa model"):
        load_model("mdiqa", weights["mdiqa"], variant="n2q_tiny")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model("mdiqa", junk)


def test_trained_config_overrides_are_honoured(tmp_path: Path, volume: SeriesVolume) -> None:
    """A file exported with config overrides (here the no-HPF ablation) rebuilds as such."""
    from qgate.models import create_model
    from qgate.models.preprocess import N2QInputConfig

    ablation = N2QInputConfig(highpass=False, window_center=50.0)
    model = create_model("n2q_tiny", input=ablation)
    path = tmp_path / "n2q-nohpf.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path),
        metadata={
            "qgate_model": "n2q_tiny",
            "qgate_overrides": json.dumps({"input": dataclasses.asdict(ablation)}),
        },
    )
    scorer = N2QScorer(SliceScorerConfig(weights=path, max_slices=2), device="cpu")
    assert scorer.n2q.data_config == ablation and scorer.n2q.cfg.in_chans == 1
    assert scorer.score(volume).series["slices_scored"] == 2


def test_device_and_version(weights: dict[str, Path]) -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")
    scorer = ChestIQAScorer(LearnedScorerConfig(weights=weights["chestiqa"]), device="cpu")
    assert scorer.version.startswith("1.0.0+") and len(scorer.version) == len("1.0.0+") + 12
    assert not scorer.model.training
    assert scorer.describe()["device"] == "cpu"


def test_pipeline_builds_from_settings(weights: dict[str, Path], volume: SeriesVolume) -> None:
    settings = load_settings(
        path=None,
        scoring={
            "scorers": ["noise", "mdiqa", "n2q", "chestiqa"],
            "device": "cpu",
            "torch_threads": 1,
            "mdiqa": {"weights": str(weights["mdiqa"]), "max_slices": 3},
            "n2q": {"weights": str(weights["n2q"]), "max_slices": 3, "batch_size": 2},
            "chestiqa": {"weights": str(weights["chestiqa"])},
        },
    )
    scorers = build_scorers(settings)
    assert [s.name for s in scorers] == ["noise", "mdiqa", "n2q", "chestiqa"]
    assert scorers[2].config.batch_size == 2  # type: ignore[attr-defined]
    outputs = {s.name: s.score(volume) for s in scorers}
    js = scores_json(outputs, {s.name: s.version for s in scorers})
    md = js["mdiqa"]
    # The names: scores.mdiqa.slice_scores at the top level, and under "slices".
    assert md["slice_scores"] == md["slices"]["slice_scores"]
    assert md["slice_scores"][1] is None and md["slice_scores"][0] is not None
    # Existing keys are unchanged: the classical scorers' per-slice lists stay in "slices".
    assert set(js["noise"]) == {*outputs["noise"].series, "slices", "version"}
    assert set(js["n2q"]) == {
        "mean_quality",
        "body_quality",
        "dose_class",
        "slices_scored",
        "slices",
        "version",
    }
    assert set(js["chestiqa"]) >= {"window_class", "dose_class", "snr", "brisque", "score"}
    with pytest.raises(Exception, match="extra"):
        load_settings(path=None, scoring={"n2q": {"max_slice": 3}})


@pytest.mark.parametrize("max_slices", [None, 3])
def test_a_volume_staged_on_the_device_scores_as_host_memory(
    weights: dict[str, Path], volume: SeriesVolume, max_slices: int | None
) -> None:
    # The worker stages volumes on CUDA (SeriesVolume.device_hu); here the "device" is
    # the CPU, which takes the same path through the scorers (the tensor is their input).
    staged = dataclasses.replace(volume, device_hu=torch.from_numpy(volume.hu.copy()))
    for name in ("mdiqa", "n2q", "chestiqa"):
        cfg = _slice_cfg(weights[name], max_slices) if name != "chestiqa" else None
        scorer = create_scorer(
            name, config=cfg or LearnedScorerConfig(weights=weights[name]), device="cpu"
        )
        host, on_device = scorer.score(volume), scorer.score(staged)
        assert json.dumps(on_device.series) == json.dumps(host.series), name
        assert json.dumps(on_device.slices) == json.dumps(host.slices), name
        for a, b in zip(host.maps, on_device.maps, strict=True):
            assert np.array_equal(a.values, b.values, equal_nan=True)


def test_default_slice_limits_match_the_example_config() -> None:
    """Noise2Quality scores 32 slices per series by default (its mean is stable; it costs
    ~10x MD-IQA per slice), MD-IQA 64; config.yaml shows the same numbers."""
    import yaml

    from qgate.core.config import Settings

    scoring = Settings().scoring
    assert (scoring.mdiqa.max_slices, scoring.n2q.max_slices) == (64, 32)
    example = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())["scoring"]
    assert example["mdiqa"]["max_slices"] == 64 and example["n2q"]["max_slices"] == 32


def test_chest_dose_edge_is_a_site_setting(weights: dict[str, Path], volume: SeriesVolume) -> None:
    """``scoring.chestiqa.high_dose_probability`` moves where ``dose_class`` turns "high";
    the probability itself does not change."""
    from qgate.core.config import ChestScorerConfig

    base = ChestIQAScorer(LearnedScorerConfig(weights=weights["chestiqa"]), device="cpu")
    assert isinstance(base.config, ChestScorerConfig) and base.config.high_dose_probability == 0.5
    p = base.score(volume).series["high_dose_probability"]
    out = {}
    for edge in (max(0.001, p - 0.01), min(0.999, p + 0.01)):
        cfg = ChestScorerConfig(weights=weights["chestiqa"], high_dose_probability=edge)
        res = ChestIQAScorer(cfg, device="cpu").score(volume).series
        assert res["high_dose_probability"] == p
        out[edge] = res["dose_class"]
    assert list(out.values()) == ["high", "low"]
    settings = load_settings(path=None, scoring={"chestiqa": {"high_dose_probability": 0.3}})
    assert settings.scoring.chestiqa.high_dose_probability == 0.3
    with pytest.raises(ValueError):
        load_settings(path=None, scoring={"chestiqa": {"high_dose_probability": 1.5}})
