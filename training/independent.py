"""An independent evaluation simulator, never used for training (issue 10).

The models are trained on :mod:`training.ct` (our torch fan/parallel projector, linearised
noise, bilateral-filtered real sources). This module checks them with everything
different:

* **implementation**: scikit-image's ``radon`` / ``iradon`` (rotation-based parallel beam
  over 180 degrees), not our projector or FBP;
* **noise**: the full non-linear chain per dose, Poisson counts ``I0 d exp(-p)`` plus
  Gaussian read-out noise, clipped at one count, then the log (no linearisation);
* **geometry and kernels**: parallel beam with ``views`` angles and as many detector bins as
  image columns; skimage's ``hann`` filter for the routine range and ``ramp`` for the
  sharp range (the filters' own definitions, not ours);
* **reference**: a real slice is made noiseless with scikit-image's non-local means
  (``denoise_nl_means`` at its own ``estimate_sigma``), not our bilateral filter; the
  truth is the SSIM of each series against the **noiseless reconstruction** of that object
  (same kernel, every view), computed with ``skimage.metrics.structural_similarity``
  (Gaussian 11 x 11, sigma 1.5, data range 1) in the abdominal window C40/W400, averaged
  over the whole slice and over the series' slices;
* **anatomy**: held-out real sources only (:data:`EVAL_SOURCES`): the eval-only test files
  of pydicom and pydicom-data, and whole volumes excluded from training
  (:data:`training.datasets.randomized.HELD_OUT`).

Two ranges, as the issue measured them: **routine** (smooth kernel, added noise ~3-20 HU,
views down to 1/16) and **sharp** (ramp kernel, noise ~20-300 HU). Each anatomy gets a
dose ladder (100/50/25/10/5 %, all views) and a views ladder (all, 1/2, 1/4, 1/8, 1/16
of the views, full dose) in each range.

    qgate-train evaluate-independent --out training/reports
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MU_WATER = 0.0195  # 1/mm (about 68 keV; our training simulator uses 0.0193)
WINDOW = (40.0, 400.0)
DOSES = (1.0, 0.5, 0.25, 0.1, 0.05)
VIEW_STEPS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Range:
    name: str
    kernel: str  # skimage iradon filter_name
    i0: float  # photons per ray at full dose
    sigma_e: float  # read-out noise, counts
    views: int = 360  # angles over 180 degrees


# i0 per range: chosen so that the full-dose noise added to a ~30 cm body at 0.7 mm is
# ~3-4 HU (routine, Hann) and ~25 HU (sharp, ramp); 5 % dose then adds ~15-20 HU and
# ~110 HU, and smaller pixels more (up to ~300 HU at 0.4 mm).
RANGES: dict[str, Range] = {
    "routine": Range("routine", "hann", 1.6e6, 5.0),
    "sharp": Range("sharp", "ramp", 2.4e5, 5.0),
}

# name in .cache/realct -> how many slices (evenly spread through the middle of the volume)
EVAL_SOURCES: dict[str, int] = {
    "pydicom_ct_small": 1,
    "pydicom_supria_head": 1,
    "pydicom_data_693": 1,
    "pydicom_data_ect_supplemental": 1,
    "mirp_lidc_0314": 2,
    "mirp_nsclc_lung1_001": 2,
    "mirp_crlm_1006": 2,
    "ibsi_sts_045": 1,
}


@dataclass
class EvalAnatomy:
    name: str
    hu: np.ndarray  # (S, N, N) noiseless object, HU
    pixel_mm: float
    anatomy: str


def _square(hu: np.ndarray) -> np.ndarray:
    h, w = hu.shape[-2:]
    n = max(h, w)
    out = np.full((*hu.shape[:-2], n, n), -1024.0, np.float32)
    out[..., (n - h) // 2 : (n - h) // 2 + h, (n - w) // 2 : (n - w) // 2 + w] = hu
    return out


def denoise(hu: np.ndarray) -> np.ndarray:
    """Non-local means at the slice's own estimated noise (scikit-image), in HU."""
    from skimage.restoration import denoise_nl_means, estimate_sigma

    x = np.clip(hu, -1024, 3071).astype(np.float64)
    sigma = float(estimate_sigma(x))
    if sigma <= 0:
        return x.astype(np.float32)
    out = denoise_nl_means(
        x, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True
    )
    return out.astype(np.float32)


def load_eval_anatomies(
    realct: str | Path = ".cache/realct", sources: dict[str, int] | None = None
) -> list[EvalAnatomy]:
    from training.datasets.randomized import HELD_OUT

    root = Path(realct)
    manifest = {e["name"]: e for e in json.loads((root / "manifest.json").read_text())["sources"]}
    out = []
    for name, n in (sources or EVAL_SOURCES).items():
        entry = manifest.get(name)
        if entry is None:
            continue
        if entry["role"] != "eval" and name not in HELD_OUT:
            raise ValueError(f"{name} is a training source; evaluate only on held-out ones")
        with np.load(root / entry["file"]) as z:
            vol, spacing = z["hu"].astype(np.float32), z["spacing"]
        body = (vol > -500).mean(axis=(1, 2))
        mid = np.nonzero(body >= 0.5 * body.max())[0]
        picks = np.unique(np.linspace(mid.min(), mid.max(), n + 2)[1:-1].round().astype(int))
        if len(vol) <= n:
            picks = np.arange(len(vol))
        hu = _square(np.stack([denoise(vol[k]) for k in picks]))
        out.append(EvalAnatomy(name, hu, float(spacing[1]), entry["anatomy"]))
    return out


# ------------------------------------------------------------------------- simulation
def _mu(hu: np.ndarray) -> np.ndarray:
    mu = MU_WATER * (1.0 + np.clip(hu, -1024, 3071) / 1000.0)
    n = hu.shape[-1]
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    mu[(yy**2 + xx**2) > (n / 2) ** 2] = 0.0  # radon(circle=True) sees the inscribed disc
    return np.clip(mu, 0, None)


def project(hu: np.ndarray, pixel_mm: float, views: int) -> np.ndarray:
    from skimage.transform import radon

    theta = np.linspace(0.0, 180.0, views, endpoint=False)
    return radon(_mu(hu), theta, circle=True) * pixel_mm  # line integrals (bins, views)


def reconstruct(sino: np.ndarray, pixel_mm: float, kernel: str, step: int = 1) -> np.ndarray:
    from skimage.transform import iradon

    views = sino.shape[1]
    theta = np.linspace(0.0, 180.0, views, endpoint=False)[::step]
    mu = iradon(
        sino[:, ::step] / pixel_mm, theta, circle=True, filter_name=kernel, interpolation="linear"
    )
    return (mu / MU_WATER - 1.0) * 1000.0


def acquire(line: np.ndarray, i0: float, sigma_e: float, rng: np.random.Generator) -> np.ndarray:
    mean = i0 * np.exp(-line)
    counts = rng.poisson(mean).astype(np.float64) + rng.normal(0.0, sigma_e, line.shape)
    return -np.log(np.clip(counts, 1.0, None) / i0)


def _win(x: np.ndarray) -> np.ndarray:
    c, w = WINDOW
    return np.clip((x - (c - w / 2)) / w, 0.0, 1.0)


# Where a predicted SSIM map errs, by what the reference shows under each pixel (in the
# window): ``clipped`` (below its floor or above its top: SSIM near 1 unless the noise
# crosses the window's edge), else by the reference's local std over 7 x 7 pixels: ``flat``
# (< 8 HU, where SSIM falls fastest with noise), ``mid``, ``busy`` (>= 20 HU: edges and
# texture, SSIM stays high).
REGIONS = ("clipped", "flat", "mid", "busy")


def regions(ref: np.ndarray) -> np.ndarray:
    """(N, N) uint8 index into :data:`REGIONS` for one reference slice (HU)."""
    from scipy.ndimage import uniform_filter

    rw = _win(ref.astype(np.float64))
    m = uniform_filter(rw, 7)
    sd = np.sqrt(np.clip(uniform_filter(rw * rw, 7) - m * m, 0.0, None))
    out = np.where(sd < 8 / WINDOW[1], 1, np.where(sd < 20 / WINDOW[1], 2, 3))
    out[(rw <= 0.0) | (rw >= 1.0)] = 0
    return out.astype(np.uint8)


def truth_ssim(
    low: np.ndarray, ref: np.ndarray, *, full: bool = False
) -> tuple[float, float] | tuple[float, float, np.ndarray]:
    """Whole-slice and body mean SSIM (C40/W400) of one slice against its reference, and
    with ``full`` the SSIM map."""
    from skimage.metrics import structural_similarity

    _, smap = structural_similarity(
        _win(low),
        _win(ref),
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        full=True,
    )
    body = ref > -500
    means = float(smap.mean()), float(smap[body].mean() if body.any() else smap.mean())
    return (*means, smap.astype(np.float32)) if full else means


@dataclass
class Series:
    anatomy: str
    range: str
    ladder: str  # "dose" or "views"
    dose: float
    views_step: int
    hu: np.ndarray  # (S, N, N)
    pixel_mm: float
    ssim: float
    ssim_body: float
    noise_hu: float  # std(series - reference) over soft tissue: the added noise
    truth_map: np.ndarray | None = None  # (S, N, N) SSIM map against the reference
    regions: np.ndarray | None = None  # (S, N, N) uint8 index into REGIONS


def simulate_anatomy(a: EvalAnatomy, rng_seed: int = 0) -> list[Series]:
    """Every series of both ranges for one anatomy."""
    out = []
    n = a.hu.shape[-1]
    for r in RANGES.values():
        views = max(90, min(r.views, round(r.views * n / 512)))
        views -= views % 16
        lines = [project(s, a.pixel_mm, views) for s in a.hu]
        refs = [reconstruct(ln, a.pixel_mm, r.kernel) for ln in lines]
        classes = np.stack([regions(ref) for ref in refs])
        rng = np.random.default_rng([rng_seed, zlib.crc32(a.name.encode()), len(r.name)])
        # one acquisition per dose (independent noise, as separate scans would be)
        plan = [("dose", d, 1) for d in DOSES] + [("views", 1.0, k) for k in VIEW_STEPS[1:]]
        for ladder_name, d, k in plan:
            imgs, ss, sb, nz, maps = [], [], [], [], []
            for ln, ref in zip(lines, refs, strict=True):
                low = reconstruct(acquire(ln, r.i0 * d, r.sigma_e, rng), a.pixel_mm, r.kernel, k)
                s1, s2, smap = truth_ssim(low, ref, full=True)
                soft = (ref > -150) & (ref < 150)
                imgs.append(low.astype(np.float32))
                maps.append(smap)
                ss.append(s1)
                sb.append(s2)
                nz.append(float((low - ref)[soft].std()) if soft.sum() > 50 else math.nan)
            out.append(
                Series(
                    a.name,
                    r.name,
                    ladder_name,
                    d,
                    k,
                    np.stack(imgs),
                    a.pixel_mm,
                    float(np.mean(ss)),
                    float(np.mean(sb)),
                    float(np.nanmean(nz)),
                    np.stack(maps),
                    classes,
                )
            )
    return out


# ------------------------------------------------------------------------- scoring
Scorer = Callable[[np.ndarray, float], dict[str, float]]


def qgate_scorers(weights_dir: str | Path | None = None) -> dict[str, Scorer]:
    """The service's scorers as the worker builds them (default config, every slice)."""
    from qgate.core.config import Settings
    from qgate.score.pipeline import build_scorers
    from training.baselines import series_volume

    settings = Settings()
    sc = settings.scoring
    names = ["noise", "mdiqa", "n2q"]
    updates: dict[str, Any] = {"scorers": names}
    for fam in ("mdiqa", "n2q"):
        cfg = getattr(sc, fam)
        changes: dict[str, Any] = {}
        if weights_dir is not None:
            changes["weights"] = str(Path(weights_dir) / f"{fam}.safetensors")
        updates[fam] = cfg.model_copy(update=changes)
    settings = settings.model_copy(update={"scoring": sc.model_copy(update=updates)})
    scorers = {s.name: s for s in build_scorers(settings)}

    def run(hu: np.ndarray, px: float) -> dict[str, float]:
        vol = series_volume(hu, px)
        res: dict[str, float] = {}
        res["noise sigma (HU)"] = float(
            scorers["noise"].score(vol).series.get("noise_sigma_hu", math.nan)
        )
        res["MD-IQA score"] = float(scorers["mdiqa"].score(vol).series["score"])
        n2q_out = scorers["n2q"].score(vol)
        n2q = n2q_out.series
        res["N2Q mean quality"] = float(n2q["mean_quality"])
        res["N2Q dose class"] = float(n2q.get("dose_class") or math.nan)
        maps = [m.values for m in n2q_out.maps if m.name == "quality"]
        if maps:
            res[N2Q_MAP] = np.clip(maps[0], 0.0, 1.0)  # type: ignore[assignment]
        return res

    return {"qgate": run}


N2Q_MAP = "N2Q map"  # a scorer result's key for the (S, N, N) map; not a row value


class RegionBias:
    """Sums of the true and the N2Q-predicted SSIM per (range, anatomy, region), with the
    anatomies also pooled as ``all``."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, str, int], np.ndarray] = {}

    def add(self, s: Series, pred: np.ndarray) -> None:
        if s.truth_map is None or s.regions is None or pred.shape != s.truth_map.shape:
            return
        for k in range(len(REGIONS)):
            m = s.regions == k
            got = np.array([m.sum(), s.truth_map[m].sum(), pred[m].sum()], dtype=np.float64)
            for name in (s.anatomy, "all"):
                self.sums.setdefault((s.range, name, k), np.zeros(3))
                self.sums[(s.range, name, k)] += got

    def table(self) -> dict[str, list[dict[str, Any]]]:
        """Per range: one row per anatomy (``all`` first) and region: the share of pixels,
        the mean true and predicted SSIM, their difference, and what the region adds to
        the error of the whole-slice mean."""
        out: dict[str, list[dict[str, Any]]] = {}
        for rng_name in sorted({k[0] for k in self.sums}):
            names = sorted({k[1] for k in self.sums if k[0] == rng_name} - {"all"})
            rows = []
            for name in ["all", *names]:
                per = [self.sums.get((rng_name, name, k), np.zeros(3)) for k in range(len(REGIONS))]
                tot = sum(v[0] for v in per)
                for region, (n, t, p) in zip(REGIONS, per, strict=True):
                    if n:
                        rows.append(
                            {
                                "anatomy": name,
                                "region": region,
                                "share": float(n / tot),
                                "true": float(t / n),
                                "n2q": float(p / n),
                                "bias": float((p - t) / n),
                                "contribution": float((p - t) / tot),
                            }
                        )
            out[rng_name] = rows
        return out


# higher = better for every reported measure; the noise sigma is negated
ORIENT = {
    "noise sigma (HU)": -1.0,
    "MD-IQA score": 1.0,
    "N2Q mean quality": 1.0,
    "N2Q dose class": 1.0,
}


@dataclass
class RangeReport:
    name: str
    n_series: int
    correlations: dict[str, dict[str, float]] = field(default_factory=dict)
    ladders: list[dict[str, Any]] = field(default_factory=list)


def _strict(values: Sequence[float], falling: bool) -> bool:
    v = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(v)):
        return False
    d = np.diff(v)
    return bool(np.all(d < 0) if falling else np.all(d > 0))


def analyse(rows: list[dict[str, Any]], measures: Sequence[str]) -> dict[str, RangeReport]:
    from scipy.stats import pearsonr, spearmanr

    out = {}
    for rname in RANGES:
        rr = [r for r in rows if r["range"] == rname]
        rep = RangeReport(rname, len(rr))
        truth = np.array([r["ssim"] for r in rr])
        for m in measures:
            v = ORIENT.get(m, 1.0) * np.array([r[m] for r in rr], dtype=float)
            ok = np.isfinite(v)
            if ok.sum() < 3 or np.ptp(v[ok]) == 0:
                rep.correlations[m] = {"spearman": math.nan, "pearson": math.nan}
                continue
            rep.correlations[m] = {
                "spearman": float(spearmanr(v[ok], truth[ok]).statistic),
                "pearson": float(pearsonr(v[ok], truth[ok]).statistic),
            }
        for anat in sorted({r["anatomy"] for r in rr}):
            for lad in ("dose", "views"):
                series = [
                    r
                    for r in rr
                    if r["anatomy"] == anat
                    and (r["ladder"] == lad or (r["dose"] == 1.0 and r["views_step"] == 1))
                ]
                series.sort(key=lambda r: -r["dose"] if lad == "dose" else r["views_step"])
                for m in measures:
                    vals = [ORIENT.get(m, 1.0) * r[m] for r in series]
                    rep.ladders.append(
                        {
                            "anatomy": anat,
                            "ladder": lad,
                            "measure": m,
                            "values": [r[m] for r in series],
                            "truth": [r["ssim"] for r in series],
                            "monotone": _strict(vals, falling=True),
                            "constant": bool(np.ptp(np.asarray([r[m] for r in series])) == 0),
                        }
                    )
        out[rname] = rep
    return out


def run_independent(
    out_dir: str | Path,
    *,
    realct: str | Path = ".cache/realct",
    weights_dir: str | Path | None = None,
    sources: dict[str, int] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    anatomies = load_eval_anatomies(realct, sources)
    echo(f"{len(anatomies)} held-out anatomies: {', '.join(a.name for a in anatomies)}")
    score = qgate_scorers(weights_dir)["qgate"]
    rows: list[dict[str, Any]] = []
    bias = RegionBias()
    for a in anatomies:
        for s in simulate_anatomy(a):
            r = {k: v for k, v in asdict(s).items() if k not in ("hu", "truth_map", "regions")}
            r.update(score(s.hu, s.pixel_mm))
            pred = r.pop(N2Q_MAP, None)
            if pred is not None:
                bias.add(s, pred)
            r["n"] = int(s.hu.shape[-1])
            rows.append(r)
            echo(
                f"{a.name} {s.range} {s.ladder} d={s.dose} k={s.views_step}: "
                f"ssim {s.ssim:.3f} noise {s.noise_hu:.1f} HU  md {r['MD-IQA score']:.3f} "
                f"n2q {r['N2Q mean quality']:.3f} sigma {r['noise sigma (HU)']:.1f}"
            )
    measures = ["MD-IQA score", "N2Q mean quality", "noise sigma (HU)"]
    reports = analyse(rows, measures)
    result = {
        "ranges": {k: asdict(v) for k, v in RANGES.items()},
        "anatomies": [
            {
                "name": a.name,
                "anatomy": a.anatomy,
                "slices": int(a.hu.shape[0]),
                "size": int(a.hu.shape[-1]),
                "pixel_mm": a.pixel_mm,
            }
            for a in anatomies
        ],
        "rows": rows,
        "reports": {k: asdict(v) for k, v in reports.items()},
        "n2q_regions": bias.table(),
    }
    (out / "independent.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "INDEPENDENT.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Independent-simulator evaluation",
        "",
        "Written by `qgate-train evaluate-independent` (`training/independent.py`): "
        "scikit-image radon/iradon, non-linear Poisson + read-out noise, NL-means "
        "references, held-out real anatomy only. Truth: mean SSIM (C40/W400) of each "
        "series against the noiseless reconstruction.",
        "",
    ]
    lines += ["| anatomy | source class | slices | size | pixel mm |", "|---|---|---:|---:|---:|"]
    for a in result["anatomies"]:
        lines.append(
            f"| {a['name']} | {a['anatomy']} | {a['slices']} | {a['size']} | {a['pixel_mm']:.3f} |"
        )
    for rname, rep in result["reports"].items():
        rr = result["ranges"][rname]
        noise = [r["noise_hu"] for r in result["rows"] if r["range"] == rname]
        lines += [
            "",
            f"## {rname} range (kernel `{rr['kernel']}`, {rep['n_series']} series, "
            f"added noise {np.nanmin(noise):.1f}-{np.nanmax(noise):.1f} HU)",
            "",
            "| measure | Spearman vs true SSIM | Pearson | dose ladders monotone | "
            "views ladders monotone | ladders constant |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for m, c in rep["correlations"].items():
            lad = [x for x in rep["ladders"] if x["measure"] == m]
            dl = [x for x in lad if x["ladder"] == "dose"]
            vl = [x for x in lad if x["ladder"] == "views"]
            lines.append(
                f"| {m} | {c['spearman']:.3f} | {c['pearson']:.3f} | "
                f"{sum(x['monotone'] for x in dl)} of {len(dl)} | "
                f"{sum(x['monotone'] for x in vl)} of {len(vl)} | "
                f"{sum(x['constant'] for x in lad)} |"
            )
        lines += [
            "",
            "| anatomy | ladder | measure | values along the ladder | true SSIM | monotone |",
            "|---|---|---|---|---|---:|",
        ]
        for x in rep["ladders"]:
            vals = " / ".join(f"{v:.3f}" for v in x["values"])
            tru = " / ".join(f"{v:.3f}" for v in x["truth"])
            lines.append(
                f"| {x['anatomy']} | {x['ladder']} | {x['measure']} | {vals} | {tru} | "
                f"{'yes' if x['monotone'] else '**no**'} |"
            )
    regions_md = _regions_markdown(result.get("n2q_regions") or {})
    return "\n".join(lines + regions_md) + "\n"


def _regions_markdown(table: dict[str, list[dict[str, Any]]]) -> list[str]:
    if not table:
        return []
    lines = [
        "",
        "## Where the Noise2Quality map errs",
        "",
        "Each pixel of every series by what the reference shows there in the window: "
        "`clipped` (below -160 or above 240 HU), else the reference's local std over 7 x 7 "
        "pixels: `flat` (< 8 HU), `mid`, `busy` (>= 20 HU). Bias: mean predicted minus "
        "true SSIM; contribution: that region's share of the error of the whole-slice mean.",
    ]
    for rng_name, rows in table.items():
        lines += [
            "",
            f"### {rng_name} range",
            "",
            "| anatomy | region | share of pixels | true SSIM | N2Q | bias | contribution |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for x in rows:
            lines.append(
                f"| {x['anatomy']} | {x['region']} | {x['share']:.2f} | {x['true']:.3f} | "
                f"{x['n2q']:.3f} | {x['bias']:+.3f} | {x['contribution']:+.3f} |"
            )
    return lines


# ------------------------------------------------------------------------- Chest CT-IQA
# Dose is defined by photon fluence at the isocentre, the one physical quantity both
# simulators share: our reference, 1.5e6 photons per 0.705 mm reading per 1/1152 of a turn
# (``ScanParams``), is 3.9e8 photons per mm per radian; a 180-degree parallel scan reads
# each line once where a full fan turn reads it twice, so each reading gets twice that.
ROUTINE_FLUENCE = 1.5e6 / (1.2858 * 595.0 / 1085.6) / (2 * math.pi / 1152)
CHEST_SOURCES: dict[str, int] = {"mirp_lidc_0314": 2, "mirp_nsclc_lung1_001": 2}
CHEST_KERNELS = {"soft_tissue": "hann", "lung": "ramp"}
CHEST_DOSES = {"high": 1.0, "low": 0.25}


def routine_i0(pixel_mm: float, views: int) -> float:
    """Photons per ray of a routine-dose 180-degree parallel scan (see ROUTINE_FLUENCE and
    ``training.datasets.randomized.ROUTINE_EFF``, the routine share of that budget)."""
    from training.datasets.randomized import ROUTINE_EFF

    return ROUTINE_EFF * 2.0 * ROUTINE_FLUENCE * pixel_mm * (math.pi / views)


def chest_volumes(
    realct: str | Path = ".cache/realct",
    sources: dict[str, int] | None = None,
    depth: int = 6,
) -> list[EvalAnatomy]:
    """``depth`` contiguous slices at ``n`` levels of each held-out chest CT (through the
    lungs), made noiseless with NL-means."""
    from scipy.ndimage import binary_fill_holes

    from training.datasets.randomized import HELD_OUT

    root = Path(realct)
    manifest = {e["name"]: e for e in json.loads((root / "manifest.json").read_text())["sources"]}
    out = []
    for name, n in (sources or CHEST_SOURCES).items():
        if name not in manifest:
            continue
        if manifest[name]["role"] != "eval" and name not in HELD_OUT:
            raise ValueError(f"{name} is a training source")
        with np.load(root / manifest[name]["file"]) as z:
            vol, spacing = z["hu"], z["spacing"]
        lung = []
        for sl in vol:
            body = binary_fill_holes(sl > -500)
            lung.append(((sl < -500) & body).sum() / max(1, body.sum()))
        good = np.nonzero(np.asarray(lung) > 0.25)[0]
        if len(good) < depth:
            continue
        starts = np.linspace(good.min(), good.max() - depth, n + 2)[1:-1].round().astype(int)
        for s in starts:
            hu = _square(np.stack([denoise(vol[s + i].astype(np.float32)) for i in range(depth)]))
            out.append(EvalAnatomy(f"{name}@{s}", hu, float(spacing[1]), "chest"))
    return out


def chest_series(a: EvalAnatomy, views: int = 360, seed: int = 0) -> list[dict[str, Any]]:
    """Every (kernel class, dose class) volume of one chest anatomy, with its truth."""
    rng = np.random.default_rng([seed, zlib.crc32(a.name.encode())])
    lines = [project(s, a.pixel_mm, views) for s in a.hu]
    i0 = routine_i0(a.pixel_mm, views)
    rows = []
    for wc, kernel in CHEST_KERNELS.items():
        refs = [reconstruct(ln, a.pixel_mm, kernel) for ln in lines]
        for dc, d in CHEST_DOSES.items():
            vol = np.stack(
                [reconstruct(acquire(ln, i0 * d, 5.0, rng), a.pixel_mm, kernel) for ln in lines]
            ).astype(np.float32)
            ssim = float(np.mean([truth_ssim(v, r)[1] for v, r in zip(vol, refs, strict=True)]))
            soft = (np.stack(refs) > -150) & (np.stack(refs) < 150)
            texture, added = fine_texture_hu(np.stack(refs), vol - np.stack(refs))
            rows.append(
                {
                    "anatomy": a.name,
                    "window_class": wc,
                    "dose_class": dc,
                    "dose": d,
                    "kernel": kernel,
                    "hu": vol,
                    "pixel_mm": a.pixel_mm,
                    "ssim_body": ssim,
                    "noise_hu": float((vol - np.stack(refs))[soft].std()),
                    "reference_texture_hu": texture,
                    "added_noise_fine_hu": added,
                }
            )
    return rows


def fine_texture_hu(
    reference: np.ndarray, noise: np.ndarray, block: int = 8
) -> tuple[float, float]:
    """The fine-scale content of a volume's noiseless reference and of its added noise, in
    the same place: the median, over 8 x 8 blocks of soft tissue (reference within
    -150..150 HU throughout), of the std of a 1-px high-pass (:func:`high_pass`) of each.

    A reference made from a real slice keeps part of the source's own noise (NL-means at
    0.8 sigma, :func:`denoise`); in the image it adds to the simulated noise and looks
    like it, while the dose class counts the simulated noise only (round 13)."""
    from qgate.models.preprocess import high_pass
    from qgate.score.scorers.body import block_all, block_view

    ref = np.asarray(reference, np.float32)
    soft = block_all((ref > -150) & (ref < 150), block)
    if not soft.any():
        return math.nan, math.nan
    out = []
    for a in (ref, np.asarray(noise, np.float32)):
        hp = high_pass(a, sigma=1.0).numpy()
        out.append(float(np.median(block_view(hp, block).std(axis=(2, 4))[soft])))
    return out[0], out[1]


def training_dose_label(noise_hu: float, kernel: str, pixel_mm: float) -> dict[str, float]:
    """Where a held-out volume sits against the dose edges Chest CT-IQA trains on.

    ``label_edge_ratio_fan`` / ``_parallel``: round 9's label (``fit-chest --dose-label
    noise --noise-edge-hu 5.3``): the noise over the gain of the same window at the pixel's
    Nyquist on that training scanner, over the edge (below 1: ``high``); the two scanners'
    gains differ 1.5x per reading, so the same volume gets two answers.
    ``hann_equivalent_hu``: round 12's label (``--dose-label hann``): the noise through a
    Hann at the pixel's Nyquist instead of this kernel (the same on either scanner), to be
    compared with 5.3 HU."""
    from training.datasets.chest_dr import (
        EDGE_KERNEL,
        ISSUE_EDGE_HU,
        hann_equivalent_hu,
        kernel_gain,
        pixel_hann,
    )

    tau = ISSUE_EDGE_HU / kernel_gain(*EDGE_KERNEL)
    px = round(pixel_mm, 3)
    out = {}
    for geo, col in (("as-576v", "fan"), ("parallel", "parallel")):
        # the evaluation's windows are at the pixel's Nyquist: the same cutoff here
        k = pixel_hann(geo, px).replace("hann", kernel)
        out[f"label_edge_ratio_{col}"] = noise_hu / kernel_gain(geo, k, px) / tau
    out["hann_equivalent_hu"] = hann_equivalent_hu(
        noise_hu, "parallel", pixel_hann("parallel", px).replace("hann", kernel), px
    )
    return out


def run_chest(
    out_dir: str | Path,
    *,
    realct: str | Path = ".cache/realct",
    weights: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    import qgate.score.scorers.learned  # noqa: F401  (registers the learned scorers)
    from qgate.core.config import LearnedScorerConfig
    from qgate.score.scorers.base import create_scorer
    from training.baselines import series_volume

    cfg = LearnedScorerConfig(weights=Path(weights) if weights else None)
    scorer = create_scorer("chestiqa", config=cfg, device="cpu")
    rows = []
    for a in chest_volumes(realct):
        for r in chest_series(a):
            res = scorer.score(series_volume(r.pop("hu"), r["pixel_mm"])).series
            r.update({f"pred_{k}": v for k, v in res.items()})
            r.update(training_dose_label(r["noise_hu"], r["kernel"], r["pixel_mm"]))
            rows.append(r)
            echo(
                f"{a.name} {r['window_class']}/{r['dose_class']}: noise {r['noise_hu']:.1f} HU"
                f" -> {res['window_class']}/{res['dose_class']} score {res['score']:.2f}"
            )
    n = len(rows)
    win = sum(r["pred_window_class"] == r["window_class"] for r in rows) / max(1, n)
    dose = sum(r["pred_dose_class"] == r["dose_class"] for r in rows) / max(1, n)
    from scipy.stats import spearmanr

    rho = (
        float(spearmanr([r["pred_score"] for r in rows], [r["ssim_body"] for r in rows]).statistic)
        if n > 2
        else math.nan
    )
    # how often the training label itself would give the simulated class (see
    # training_dose_label): the ceiling a model of that label has on these volumes
    from training.datasets.chest_dr import ISSUE_EDGE_HU

    says_high = {
        "fan": lambda r: r["label_edge_ratio_fan"] < 1.0,
        "parallel": lambda r: r["label_edge_ratio_parallel"] < 1.0,
        "hann": lambda r: r["hann_equivalent_hu"] < ISSUE_EDGE_HU,
    }
    agree = {
        k: sum(f(r) == (r["dose_class"] == "high") for r in rows) / max(1, n)
        for k, f in says_high.items()
    }
    result = {
        "n": n,
        "window_accuracy": win,
        "dose_accuracy": dose,
        "training_label_agreement": agree,
        "score_spearman_vs_ssim": rho,
        "rows": rows,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "independent_chest.json").write_text(json.dumps(result, indent=1, default=float))
    return result


# ------------------------------------------------------------------------- default gate
# The issue's cases for the defaults a site can keep: a routine-dose series with a sharp
# (lung) kernel must pass; 5 % of routine dose, or 1/16 of the views, must be flagged.
GATE_CASES: dict[str, tuple[str, float, int, bool]] = {  # name -> kernel, dose, step, flag?
    "routine, smooth": ("hann", 1.0, 1, False),
    "routine, sharp (lung)": ("ramp", 1.0, 1, False),
    "5 % dose, smooth": ("hann", 0.05, 1, True),
    "5 % dose, sharp": ("ramp", 0.05, 1, True),
    "1/16 views, smooth": ("hann", 1.0, 16, True),
}


def gate_series(a: EvalAnatomy, views: int = 360, seed: int = 0) -> list[dict[str, Any]]:
    """The :data:`GATE_CASES` of one anatomy at routine dose (``routine_i0``)."""
    rng = np.random.default_rng([seed, zlib.crc32(a.name.encode()), 7])
    n = a.hu.shape[-1]
    v = max(90, min(views, round(views * n / 512)))
    v -= v % 16
    lines = [project(s, a.pixel_mm, v) for s in a.hu]
    i0 = routine_i0(a.pixel_mm, v)
    rows = []
    for name, (kernel, d, step, flag) in GATE_CASES.items():
        vol = np.stack(
            [reconstruct(acquire(ln, i0 * d, 5.0, rng), a.pixel_mm, kernel, step) for ln in lines]
        ).astype(np.float32)
        rows.append(
            {"anatomy": a.name, "case": name, "flag": flag, "hu": vol, "pixel_mm": a.pixel_mm}
        )
    return rows


def run_gate_cases(
    out_dir: str | Path,
    *,
    realct: str | Path = ".cache/realct",
    weights_dir: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Every learned output on the gate cases of every held-out anatomy."""
    score = qgate_scorers(weights_dir)["qgate"]
    rows = []
    for a in load_eval_anatomies(realct):
        for r in gate_series(a):
            r.update(score(r.pop("hu"), r["pixel_mm"]))
            r.pop(N2Q_MAP, None)
            rows.append(r)
            echo(f"{a.name} {r['case']}: " + ", ".join(f"{k} {r[k]:.3f}" for k in ORIENT))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "independent_gate.json").write_text(json.dumps(rows, indent=1))
    return rows
