"""The gate decision against thresholds."""

from __future__ import annotations

from qgate.core.config import Threshold
from qgate.decide.thresholds import DEFAULT_THRESHOLDS, Decision, decide
from qgate.score.scorers import ScoreOutput

NOISE_MAX = Threshold(scorer="noise", output="noise_sigma_hu", max=25.0)
SNR_MIN = Threshold(scorer="snr", output="snr", min=30.0)


def _noise(value: float) -> ScoreOutput:
    return ScoreOutput(series={"noise_sigma_hu": value}, units={"noise_sigma_hu": "HU"})


def test_pass_when_within_limits() -> None:
    result = decide({"noise": _noise(12.0), "snr": {"snr": 80.0}}, [NOISE_MAX, SNR_MIN])
    assert result == Decision(decision="pass", reasons=[])


def test_flag_above_max_with_unit() -> None:
    result = decide({"noise": _noise(38.2)}, [NOISE_MAX])
    assert result.decision == "flag"
    assert result.reasons == ["noise: noise_sigma_hu 38.2 HU is above the limit 25 HU"]


def test_flag_below_min_dict_forms_and_custom_reason() -> None:
    threshold = Threshold(scorer="snr", output="snr", min=30.0, reason="too noisy")
    as_dict = {"series": {"snr": 12.345}, "units": {"snr": "1"}}
    for score in (as_dict, {"snr": 12.345}):
        result = decide({"snr": score}, [threshold])
        assert result.decision == "flag"
        assert result.reasons == ["snr: snr 12.3 is below the limit 30 (too noisy)"]


def test_limits_are_inclusive() -> None:
    assert decide({"noise": _noise(25.0)}, [NOISE_MAX]).decision == "pass"


def test_missing_outputs_flag_instead_of_crashing() -> None:
    result = decide({"noise": ScoreOutput(series={})}, [NOISE_MAX, SNR_MIN])
    assert result.decision == "flag"
    assert result.reasons == [
        "noise: output noise_sigma_hu missing",
        "snr: output snr missing (scorer did not run)",
    ]


def test_non_numeric_values_flag() -> None:
    for bad in (float("nan"), "high", None, True):
        result = decide({"noise": {"noise_sigma_hu": bad}}, [NOISE_MAX])
        assert result.decision == "flag", bad
        assert len(result.reasons) == 1


def test_multiple_reasons_in_threshold_order() -> None:
    result = decide({"noise": _noise(40.0), "snr": {"snr": 10.0}}, [SNR_MIN, NOISE_MAX])
    assert [r.split(":")[0] for r in result.reasons] == ["snr", "noise"]


def test_unconfigured_scores_are_ignored() -> None:
    assert decide({"other": {"x": 1e9}}, []).decision == "pass"


def test_default_thresholds() -> None:
    by_scorer = {t.scorer: t for t in DEFAULT_THRESHOLDS}
    assert by_scorer["noise"].output == "noise_sigma_hu" and by_scorer["noise"].max == 30.0
    assert by_scorer["snr"].output == "snr" and by_scorer["snr"].min == 25.0
    good = {"noise": _noise(12.0), "snr": {"snr": 90.0}}
    assert decide(good, DEFAULT_THRESHOLDS).decision == "pass"
    bad = decide({"noise": _noise(45.0), "snr": {"snr": 20.0}}, DEFAULT_THRESHOLDS)
    assert bad.decision == "flag" and len(bad.reasons) == 2
