"""Size and build time of the quality SR for one synthetic series (no scorers run).

Builds one synthetic CT series (qgate.synth, headers only are used; the pixel size does
not change the SR), hand-made scorer outputs shaped like the default scorers' (noise and
snr: every slice; MD-IQA: ``--mdiqa-slices`` scored, Noise2Quality ``--n2q-slices``, the
others NaN; Chest CT-IQA: series outputs only), and times
:func:`qgate.report.build_quality_sr` (wall time, median of ``--reps`` after one warm-up)
for each ``--source-images`` mode, alternating, in one process. Counts the content items
of the document tree (every item of every ContentSequence), its IMAGE items and the
encoded size.

    nice -n 19 .venv/bin/python benchmarks/sr_build.py --slices 300 --reps 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid

from qgate.report import QualityReport, build_quality_sr
from qgate.report.sc import select_slices
from qgate.score.scorers.base import ScoreOutput, SeriesVolume
from qgate.synth import make_ct_series


def _with_nan(n: int, idx: list[int], rng: np.random.Generator) -> list[float]:
    out = [float("nan")] * n
    for i in idx:
        out[i] = round(float(rng.uniform(0, 1)), 4)
    return out


def synthetic_report(n: int, mdiqa_slices: int, n2q_slices: int) -> QualityReport:
    series = make_ct_series(n, 16, 16, noise_hu=14.0)
    for ds in series:
        del ds.PixelData  # the SR needs headers only
    volume = SeriesVolume(
        hu=np.zeros((n, 16, 16), np.float32),
        pixel_spacing=tuple(float(x) for x in series[0].PixelSpacing),
        slice_thickness=float(series[0].SliceThickness),
        slice_positions=tuple(float(d.ImagePositionPatient[2]) for d in series),
        sop_instance_uids=tuple(d.SOPInstanceUID for d in series),
        frame_numbers=(1,) * n,
        series_instance_uid=series[0].SeriesInstanceUID,
        study_instance_uid=series[0].StudyInstanceUID,
        sop_class_uid=series[0].SOPClassUID,
    )
    rng = np.random.default_rng(0)
    every = list(range(n))
    md_idx = select_slices(n, mdiqa_slices)
    n2q_idx = select_slices(n, n2q_slices)
    scores = {
        "noise": ScoreOutput(
            series={"noise_slices_measured": n, "noise_sigma_hu": 14.2, "noise_sigma_hu_p90": 16.0},
            slices={"noise_sigma_hu": _with_nan(n, every, rng)},
            units={"noise_sigma_hu": "HU", "noise_sigma_hu_p90": "HU"},
        ),
        "snr": ScoreOutput(
            series={"snr_roi_count": 120, "snr": 3.1},
            slices={"snr": _with_nan(n, every, rng)},
            units={"snr": "1", "snr_roi_count": "1"},
        ),
        "mdiqa": ScoreOutput(
            series={"score": 2.9, "score_argmax": 3.0, "slices_scored": len(md_idx)},
            slices={
                "slice_scores": _with_nan(n, md_idx, rng),
                "slice_scores_argmax": _with_nan(n, md_idx, rng),
            },
        ),
        "n2q": ScoreOutput(
            series={
                "mean_quality": 0.91,
                "body_quality": 0.85,
                "dose_class": 100,
                "slices_scored": len(n2q_idx),
            },
            slices={
                "mean_quality": _with_nan(n, n2q_idx, rng),
                "body_quality": _with_nan(n, n2q_idx, rng),
            },
            units={"dose_class": "%"},
        ),
        "chestiqa": ScoreOutput(
            series={
                "window_class": "soft_tissue",
                "dose_class": "high",
                "snr": 4.2,
                "brisque": 30.1,
                "score": 7.2,
                "lung_window_probability": 0.02,
                "high_dose_probability": 0.97,
            },
        ),
    }
    return QualityReport(
        source_datasets=series,
        volume=volume,
        scores=scores,
        versions={name: "1.0.0" for name in scores},
        decision="pass",
    )


def _items(seq: object) -> Iterator[Dataset]:
    for item in seq or []:  # type: ignore[attr-defined]
        yield item
        yield from _items(item.get("ContentSequence"))


def measure(report: QualityReport, mode: str | None) -> tuple[float, Dataset]:
    kwargs = {} if mode is None else {"source_images": mode}
    t0 = time.perf_counter()
    sr = build_quality_sr(report, series_instance_uid=generate_uid(), series_number=9901, **kwargs)
    return time.perf_counter() - t0, sr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--mdiqa-slices", type=int, default=64)
    ap.add_argument("--n2q-slices", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--source-images",
        nargs="+",
        default=["all", "scored"],
        help="modes to compare; 'default' calls the builder without the argument",
    )
    args = ap.parse_args()
    report = synthetic_report(args.slices, args.mdiqa_slices, args.n2q_slices)
    modes = [None if m == "default" else m for m in args.source_images]
    times: dict[str | None, list[float]] = {m: [] for m in modes}
    docs: dict[str | None, Dataset] = {}
    for m in modes:  # warm-up
        measure(report, m)
    for _ in range(args.reps):
        for m in modes:
            seconds, docs[m] = measure(report, m)
            times[m].append(seconds)
    print(
        f"{platform.machine()} python {platform.python_version()}, {args.slices} slices, "
        f"mdiqa {args.mdiqa_slices}, n2q {args.n2q_slices}, {args.reps} reps"
    )
    print("| source images | content items | IMAGE items | bytes | build s (runs) | median s |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for m in modes:
        items = list(_items(docs[m].ContentSequence))
        images = sum(1 for i in items if i.ValueType == "IMAGE")
        buf = DicomBytesIO()
        docs[m].save_as(buf, enforce_file_format=True)
        runs = ", ".join(f"{t:.3f}" for t in times[m])
        print(
            f"| {m or 'default'} | {len(items)} | {images} | {len(buf.getvalue())} | {runs} "
            f"| {statistics.median(times[m]):.3f} |"
        )
    if len(modes) == 2:
        a, b = (statistics.median(times[m]) for m in modes)
        print(f"ratio {modes[1] or 'default'} / {modes[0] or 'default'}: {b / a:.3f}")


if __name__ == "__main__":
    main()
