"""Issue 10: on a tiny ladder of the independent simulator (scikit-image radon/iradon, never
used for training) over held-out real CT (pydicom's CT_small.dcm, eval-only), every
learned score falls strictly with dose and with views, and none is constant on a ladder."""

from __future__ import annotations

import itertools

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from training.baselines import series_volume
from training.independent import EvalAnatomy, denoise, qgate_scorers, simulate_anatomy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ladder_scores() -> list[dict[str, float]]:
    import torch

    torch.set_num_threads(2)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    anatomy = EvalAnatomy("ct_small", denoise(hu)[None], float(ds.PixelSpacing[0]), "unknown")
    score = qgate_scorers()["qgate"]
    from qgate.score.scorers.base import create_scorer

    chest = create_scorer("chestiqa")
    rows = []
    for s in simulate_anatomy(anatomy):
        r = {
            "range": s.range,
            "ladder": s.ladder,
            "dose": s.dose,
            "views": s.views_step,
            "ssim": s.ssim,
            **score(s.hu, s.pixel_mm),
        }
        r["chest score"] = float(chest.score(series_volume(s.hu, s.pixel_mm)).series["score"])
        rows.append(r)
    return rows


def _ladder(rows: list[dict[str, float]], rng: str, ladder: str) -> list[dict[str, float]]:
    first = [r for r in rows if r["range"] == rng and r["dose"] == 1.0 and r["views"] == 1]
    rest = [r for r in rows if r["range"] == rng and r["ladder"] == ladder and r not in first]
    key = (lambda r: -r["dose"]) if ladder == "dose" else (lambda r: r["views"])
    return first + sorted(rest, key=key)


@pytest.mark.parametrize("rng", ["routine", "sharp"])
@pytest.mark.parametrize("ladder", ["dose", "views"])
@pytest.mark.parametrize("measure", ["MD-IQA score", "N2Q mean quality"])
def test_learned_scores_fall_strictly(
    ladder_scores: list[dict[str, float]], rng: str, ladder: str, measure: str
) -> None:
    rows = _ladder(ladder_scores, rng, ladder)
    assert len(rows) == 5
    truth = [r["ssim"] for r in rows]
    assert all(a > b for a, b in itertools.pairwise(truth)), truth  # the ladder itself
    vals = [r[measure] for r in rows]
    assert all(a > b for a, b in itertools.pairwise(vals)), (measure, vals)


@pytest.mark.parametrize("measure", ["MD-IQA score", "N2Q mean quality", "chest score"])
def test_no_model_is_constant_on_a_ladder(
    ladder_scores: list[dict[str, float]], measure: str
) -> None:
    for rng in ("routine", "sharp"):
        for ladder in ("dose", "views"):
            vals = [r[measure] for r in _ladder(ladder_scores, rng, ladder)]
            assert np.ptp(vals) > 1e-3, (measure, rng, ladder, vals)


def test_region_bias_adds_up_to_the_whole_slice_error() -> None:
    """The per-region table of the N2Q map's error: the regions' contributions sum to the
    error of the whole-slice mean, and the reference's classes are what they say."""
    from training.independent import REGIONS, RegionBias, Series, regions

    ref = np.full((64, 64), 40.0, np.float32)  # flat soft tissue
    ref[:, :16] = -1000.0  # air: clipped
    ref[20:44, 30:34] = 140.0  # a 100 HU bar: busy around it
    cls = regions(ref)
    assert cls[5, 5] == REGIONS.index("clipped") and cls[60, 60] == REGIONS.index("flat")
    assert cls[30, 31] == REGIONS.index("busy")
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.2, 1.0, (1, 64, 64)).astype(np.float32)
    pred = np.clip(truth + rng.normal(0.05, 0.1, truth.shape), 0, 1).astype(np.float32)
    s = Series("a", "routine", "dose", 1.0, 1, ref[None], 0.7, 0.0, 0.0, 0.0, truth, cls[None])
    bias = RegionBias()
    bias.add(s, pred)
    rows = [r for r in bias.table()["routine"] if r["anatomy"] == "all"]
    assert [r["region"] for r in rows] == list(REGIONS)  # all four occur here
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert sum(r["contribution"] for r in rows) == pytest.approx(float((pred - truth).mean()))
