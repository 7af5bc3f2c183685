"""Model cards for the shipped weights, filled from the evaluation's ``results.json``.

``python -m training.cards --results training/reports/results.json --recipe recipe.json``
writes ``qgate/weights/MODEL_CARD-{mdiqa,n2q,chestiqa}.md``: the data and the exact
commands (``recipe.json``: ``{"commands": {model: [...]}, "wall_s": {step: s}, "device":
...}``), the held-out evaluation table, intended use and limits, size and SHA-256.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from training.fit.export import read_metadata, sha256

WEIGHTS = Path(__file__).resolve().parents[1] / "qgate" / "weights"
FILES = {"mdiqa": "mdiqa", "n2q": "n2q", "chest": "chestiqa"}
TITLES = {"mdiqa": "MD-IQA", "n2q": "Noise2Quality", "chest": "Chest CT-IQA"}


def _f(v: Any, nd: int = 3) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return "n/a" if isinstance(v, float) and not math.isfinite(v) else f"{v:.{nd}f}"
    return str(v)


def _ladder_lines(results: dict[str, Any], scorer_prefix: str) -> list[str]:
    sec = next((v for k, v in results.items() if k.startswith("Monotonicity")), None)
    if not sec:
        return ["(no ladders run)"]
    out = ["| anatomy | ladder | values | monotone |", "|---|---|---|---|"]
    for r in sec["rows"]:
        if r["scorer"].startswith(scorer_prefix):
            vals = " / ".join(_f(v) for v in r["values"])
            rungs = " / ".join(r["rungs"])
            out.append(
                f"| {r['anatomy']} | {r['ladder']}: {rungs} | {vals} | "
                f"{'yes' if r['monotone'] else '**no**'} |"
            )
    return out


def _eval_lines(model: str, res: dict[str, Any]) -> list[str]:
    if model == "mdiqa":
        r = res["MD-IQA"]
        lines = ["| read-out | PLCC | SROCC | KROCC | Overall |", "|---|---:|---:|---:|---:|"]
        for k in ("soft", "argmax"):
            c = r[k]
            lines.append(
                f"| {k} | {_f(c['plcc'])} | {_f(c['srocc'])} | {_f(c['krocc'])} | "
                f"{_f(c['overall'])} |"
            )
        lines += ["", "| classical baseline (oriented) | SROCC | Overall |", "|---|---:|---:|"]
        for k, c in r["baselines"].items():
            lines.append(f"| {k} | {_f(c['srocc'])} | {_f(c['overall'])} |")
        return lines
    if model == "n2q":
        r = res["Noise2Quality"]
        m, d, q = r["map"], r["dose"], r["mean_quality"]
        lines = [
            "| map SSIM | map MSE | map NRMSE | dose accuracy | dose F1 | mean-quality SROCC |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {_f(m['ssim'])} | {_f(m['mse'], 4)} | {_f(m['nrmse'])} | {_f(d['accuracy'])} | "
            f"{_f(d['f1_macro'])} | {_f(q['srocc'])} |",
            "",
            "| classical baseline | SROCC vs true mean SSIM / dose accuracy |",
            "|---|---:|",
        ]
        for k, c in r["baselines"].items():
            v = c.get("srocc", c.get("accuracy"))
            lines.append(f"| {k} | {_f(v)} |")
        return lines
    r = res["Chest CT-IQA"]
    lines = [
        "| window acc | window F1 | dose acc | dose F1 | SNR SRCC | SNR PLCC | SNR RMSE | "
        "BRISQUE SRCC | BRISQUE PLCC | BRISQUE RMSE |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {_f(r['window']['accuracy'])} | {_f(r['window']['f1_macro'])} | "
        f"{_f(r['dose']['accuracy'])} | {_f(r['dose']['f1_macro'])} | {_f(r['snr']['srcc'])} | "
        f"{_f(r['snr']['plcc'])} | {_f(r['snr']['rmse'], 2)} | {_f(r['brisque']['srcc'])} | "
        f"{_f(r['brisque']['plcc'])} | {_f(r['brisque']['rmse'], 2)} |",
        "",
        "| classical baseline | window acc | dose acc | SNR SRCC |",
        "|---|---:|---:|---:|",
        f"| noise sigma, nearest class median | {_f(r['baselines']['window']['accuracy'])} | "
        f"{_f(r['baselines']['dose']['accuracy'])} | "
        f"{_f(r['baselines']['snr_noise_sigma']['srocc'])} |",
        f"| ROI SNR (qgate.scoring.snr) | | | {_f(r['baselines']['snr_roi']['srcc'])} |",
    ]
    return lines


USE = {
    "mdiqa": (
        "Slice-wise technical image quality of low-dose / sparse-view CT on the LDCTIQAC2023 "
        "0-4 scale (4 = full-dose quality), served as `scores.mdiqa.score` (mean over the "
        "scored slices, soft read-out) and `scores.mdiqa.slice_scores`. Use it to rank and "
        "flag series whose noise and streaks depart from routine-dose quality.",
        [
            "**At this budget it did not learn the dose signal** (held-out SROCC -0.03 on "
            "dose-only slices; it ranks sparse-view streaks, SROCC 0.37) and its scores are "
            "nearly flat along dose ladders: keep its gate thresholds off until retrained "
            "(training/reports/NOTES.md).",
            "Trained on simulated degradations of procedural phantoms and one real chest/"
            "abdomen CT, labelled by a full-reference score proxy (SSIM to full dose in the "
            "abdominal window, docs/simulator.md section 7), not by radiologists: it measures "
            "departure from routine dose, not diagnostic adequacy.",
            "The proxy's anchors (what score a quarter dose deserves) are our judgement; "
            "absolute scores on real scans may be offset; only the ranking was evaluated.",
            "Tiny CPU variant trained for a few epochs on 2 shared CPU cores: expect lower "
            "correlations than the paper's; retrain the small variant on a GPU "
            "(`--variant small --device cuda`) or on LDCTIQAC2023 when available.",
            "Not for MR, PET, CBCT, or non-axial reformats. Iterative/deep-learning "
            "reconstructions (noise texture unlike FBP) were not in the training data.",
        ],
    ),
    "n2q": (
        "Per-pixel SSIM-to-full-dose map of a CT slice (`scores.n2q.mean_quality`, mean over "
        "the body; the quality-map SC and Parametric Map) and a dose-level class "
        "(5/10/25/50/75 % of routine dose, `scores.n2q.dose_class`).",
        [
            "**At this budget it barely learned** (map MSE 0.018 against 0.0145 for a "
            "constant map, dose head at chance): keep its gate thresholds off until "
            "retrained (training/reports/NOTES.md).",
            "Trained on simulated FBP (standard kernel) abdomen slices at 256 px; chest, other "
            "kernels and iterative reconstructions are out of distribution.",
            "The dose class is relative to our simulator's routine dose (11 HU in a 35 x 25 cm "
            "water ellipse); a scanner whose routine protocol is noisier reads as lower dose.",
            "A full-dose slice has no class of its own: it is reported as 75 %.",
            "Tiny variant, few epochs on CPU (see the recipe): map SSIM below the paper's.",
        ],
    ),
    "chest": (
        "Series-level chest CT quality: reconstruction window/kernel class (soft tissue vs "
        "lung), exposure class (30 vs 50 mAs-equivalent), SNR and BRISQUE regressions "
        "(`scores.chestiqa.*`), and the paper's linear quality fit (`score`).",
        [
            "Window/kernel class learned (held-out accuracy 1.0); the 30 vs 50 mAs exposure "
            "class was not (0.5, chance) at 3 epochs.",
            "The quality module keeps the paper's published coefficients (the default the "
            "issue asks for). Their signs make `score` rise with noise: do not gate on it "
            "until `QualityFit.refit` has been run on review labels.",
            "Exposure classes are 30 % and 50 % of our simulator's routine dose; real 30/50 "
            "mAs scans of other patients sizes and scanners map differently.",
            "Trained on 32 x 128 x 128 simulated volumes (procedural chests and one real CT).",
        ],
    ),
}


def write_card(model: str, results: dict[str, Any], recipe: dict[str, Any]) -> Path:
    stem = FILES[model]
    path = WEIGHTS / f"{stem}.safetensors"
    meta = read_metadata(path)
    size = path.stat().st_size
    cfg = json.loads(meta.get("qgate_config", "{}"))
    use, limits = USE[model]
    cmds = recipe.get("commands", {}).get(model, [])
    wall = recipe.get("wall_s", {})
    lines = [
        f"# Model card: {TITLES[model]} (`{stem}.safetensors`)",
        "",
        "| | |",
        "|---|---|",
        f"| entry point | `{meta.get('qgate_model')}` (`qgate.models.create_model`"
        + (", or `load_mdiqa`" if model == "mdiqa" else "")
        + ") |",
        f"| file | `qgate/weights/{stem}.safetensors`, {size / 1e6:.2f} MB, float32 |",
        f"| SHA-256 | `{sha256(path)}` |",
        f"| trained on | {recipe.get('device', 'CPU')} |",
        "",
        "## Intended use",
        "",
        use,
        "",
        "## Data",
        "",
        recipe.get("data", {}).get(model, ""),
        "",
        "## Recipe (exact commands)",
        "",
        "```",
        *cmds,
        "```",
        "",
        "Wall times: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in wall.items() if k.startswith(model))
        + ".",
        "",
        "## Evaluation (held-out, patient-disjoint test split)",
        "",
        *_eval_lines(model, results),
        "",
        "Monotonicity on held-out anatomy (training/reports/REPORT.md):",
        "",
        *_ladder_lines(
            results,
            {"mdiqa": "MD-IQA", "n2q": "N2Q", "chest": "Chest"}[model],
        ),
        "",
        "## Limits",
        "",
        *[f"- {x}" for x in limits],
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(cfg, indent=1)[:3000],
        "```",
        "",
    ]
    out = WEIGHTS / f"MODEL_CARD-{stem}.md"
    out.write_text("\n".join(lines))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", required=True)
    ap.add_argument("--recipe", required=True)
    args = ap.parse_args()
    results = json.loads(Path(args.results).read_text())
    recipe = json.loads(Path(args.recipe).read_text())
    for m in FILES:
        if (WEIGHTS / f"{FILES[m]}.safetensors").exists():
            print(write_card(m, results, recipe))


if __name__ == "__main__":
    main()
