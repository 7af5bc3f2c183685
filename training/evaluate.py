"""``qgate-train evaluate``: the held-out evaluation of the three models, as a Markdown
report with PNG figures and a JSON of every number.

On the patient-disjoint ``test`` split of each model's dataset:

* MD-IQA: PLCC, SROCC, KROCC, Overall of both read-outs (argmax, soft), per degradation
  type too; the papers' ablations (single- vs multi-scale; with vs without semi-supervision)
  from the training runs.
* Noise2Quality: map SSIM, MSE, NRMSE; dose-class accuracy and F1; the HPF ablation.
* Chest CT-IQA: window and dose accuracy and F1; SRCC, PLCC, RMSE of SNR and BRISQUE.
* Classical baselines on the same samples: noise sigma, SNR, BRISQUE
  (:mod:`training.baselines`), and a verdict whether each model beats them.
* Monotonicity ladders on held-out anatomy (:mod:`training.ladder`).

``eval-ldctiqa`` (:func:`score_ldctiqa`) scores a user's LDCTIQAC2023 folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import qgate
from training import baselines as bl
from training.metrics import classification, correlations, map_metrics, monotone, regression
from training.plots import bar_chart, line_chart, scatter_chart

__all__ = ["DEFAULT_WEIGHTS", "EvalPlan", "run_evaluation", "score_ldctiqa"]

WEIGHTS_DIR = Path(qgate.__file__).parent / "weights"
DEFAULT_WEIGHTS = {
    "mdiqa": WEIGHTS_DIR / "mdiqa.safetensors",
    "n2q": WEIGHTS_DIR / "n2q.safetensors",
    "chest": WEIGHTS_DIR / "chestiqa.safetensors",
}
Echo = Callable[[str], None]


@dataclass
class EvalPlan:
    data: dict[str, Path]
    weights: dict[str, Path] = field(default_factory=dict)
    runs: Path | None = None
    split: str = "test"
    ladder: bool = True
    # Ladder matrix sizes: 512 is what the service sees (0.7 mm, the full scanner); 256
    # (1.4 mm, 2x-binned) is the grid the models were trained on.
    ladder_size: int | tuple[int, ...] = 512
    device: str | None = None
    notes: Path | None = None  # Markdown put under the report's title (recipe, budget)

    def weights_for(self, model: str) -> Path:
        p = self.weights.get(model, DEFAULT_WEIGHTS[model])
        if not p.exists():
            raise FileNotFoundError(f"no weights for {model}: {p}")
        return p


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append(
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
        )
        for r in rows:
            self.lines.append("| " + " | ".join(_cell(v) for v in r) + " |")
        self.lines.append("")

    def text(self, s: str) -> None:
        self.lines += [s, ""]

    def figure(self, path: Path, caption: str) -> None:
        self.lines += [f"![{caption}]({path.name})", ""]


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _device(name: str | None) -> torch.device:
    from training.fit.common import resolve_device

    return resolve_device(name)


# ----------------------------------------------------------------------------- MD-IQA
def _mdiqa_section(plan: EvalPlan, out: Path, echo: Echo) -> Section:
    from qgate.models import MDIQA, load_mdiqa
    from qgate.models.mdiqa import predict_argmax, predict_soft, resolve_data_config
    from training.anatomy.ldctiqa import read_image
    from training.fit.data import load_mdiqa_split
    from training.fit.mdiqa import predict_logits

    sec = Section("MD-IQA")
    data = plan.data["mdiqa"]
    dev = _device(plan.device)
    wpath = plan.weights_for("mdiqa")
    model = load_mdiqa(wpath, device=dev)
    test = load_mdiqa_split(data, plan.split, resolve_data_config(model))
    y = test.y.numpy()
    echo(f"MD-IQA: {len(test)} {plan.split} images")
    logits = predict_logits(model, test.scored)  # each slice from its crops, as served
    soft = predict_soft(logits).numpy()
    arg = predict_argmax(logits).numpy()
    sparse = np.array([int(r.get("views_step", 1) or 1) > 1 for r in test.records])  # type: ignore[call-overload]
    rows, res = [], {}
    for name, pred in (("soft (expectation)", soft), ("argmax (paper)", arg)):
        c = correlations(pred, y)
        rmse = float(np.sqrt(np.nanmean((pred - y) ** 2)))
        res[name.split()[0]] = {**c.as_dict(), "rmse": rmse}
        rows.append([name, c.plcc, c.srocc, c.krocc, c.overall, rmse])
    sec.text(
        f"Held-out `{plan.split}` split of `{data}`: {len(test)} slices of "
        f"{len({r.get('patient') for r in test.records})} patients none of which is in "
        f"training. Labels: the dataset's score proxy (0-4). Weights: `{wpath.name}`."
    )
    sec.table(["read-out", "PLCC", "SROCC", "KROCC", "Overall", "RMSE"], rows)
    sub_rows = []
    for name, m in (("dose only (all views)", ~sparse), ("sparse views", sparse)):
        if m.sum() >= 3:
            c = correlations(soft[m], y[m])
            sub_rows.append([name, int(m.sum()), c.plcc, c.srocc, c.krocc, c.overall])
            res[f"subset_{'dose' if name.startswith('dose') else 'sparse'}"] = c.as_dict()
    if sub_rows:
        sec.text("By degradation (soft read-out):")
        sec.table(["subset", "n", "PLCC", "SROCC", "KROCC", "Overall"], sub_rows)
    fig = scatter_chart(
        {
            "dose only": (y[~sparse].tolist(), soft[~sparse].tolist()),
            "sparse views": (y[sparse].tolist(), soft[sparse].tolist()),
        },
        out / "mdiqa_pred_vs_true.png",
        title="MD-IQA on the held-out split",
        xlabel="proxy score (label)",
        ylabel="predicted score (soft)",
    )
    sec.figure(fig, "MD-IQA predicted vs label")

    # Classical baselines on the same slices.
    echo("MD-IQA: classical baselines")
    sig, snr, bq = [], [], []
    for name, rec in zip(test.names, test.records, strict=True):
        hu = read_image(data / "image" / name)
        px = float(rec.get("pixel_mm", 0.7) or 0.7)  # type: ignore[arg-type]
        sig.append(bl.noise_sigma(hu, px))
        snr.append(bl.snr_classic(hu, px))
        bq.append(bl.brisque_score((hu + 1000.0) / 1400.0))
    base = {
        "noise sigma (HU), negated": -np.asarray(sig),
        "ROI SNR": np.asarray(snr),
        "BRISQUE, negated": -np.asarray(bq),
    }
    brow, bres = [], {}
    for name, v in base.items():
        c = correlations(v, y)
        bres[name] = c.as_dict()
        brow.append([name, c.n, c.plcc, c.srocc, c.krocc, c.overall])
    c_model = correlations(soft, y)
    brow.insert(
        0,
        [
            "**MD-IQA (soft)**",
            c_model.n,
            c_model.plcc,
            c_model.srocc,
            c_model.krocc,
            c_model.overall,
        ],
    )
    sec.text(
        "Classical baselines on the same slices, oriented so that higher = better (n = "
        "slices where the measure is defined). Overall takes absolute values as the "
        "challenge does, so a measure that ranks backwards can still score; the verdict "
        "compares the signed SROCC."
    )
    sec.table(["measure", "n", "PLCC", "SROCC", "KROCC", "Overall"], brow)
    sub_base = []
    for name, m in (("dose only (all views)", ~sparse), ("sparse views", sparse)):
        if m.sum() >= 3:
            cm = correlations(soft[m], y[m])
            cb = correlations(-np.asarray(sig)[m], y[m])
            sub_base.append([name, int(m.sum()), cm.srocc, cb.srocc])
            key = "dose" if name.startswith("dose") else "sparse"
            res[f"subset_{key}_noise_sigma"] = cb.as_dict()
    if sub_base:
        sec.text("SROCC by degradation, MD-IQA (soft) against the negated noise sigma:")
        sec.table(["subset", "n", "MD-IQA SROCC", "noise sigma SROCC"], sub_base)
    # The verdict is on the signed rank correlation of the oriented measures: a baseline
    # that ranks backwards does not count as good (the challenge's Overall, with absolute
    # values, would reward it).
    best_base = max(
        (b["srocc"] for b in bres.values() if math.isfinite(b["srocc"])), default=-math.inf
    )
    res["baselines"] = bres
    res["beats_baselines"] = bool(c_model.srocc > best_base)

    # Ablations from the training runs.
    if plan.runs is not None and (plan.runs / "mdiqa").exists():
        ab = _mdiqa_ablations(plan.runs / "mdiqa", test.scored, y, out, sec)
        res["ablations"] = ab
    sec.results = res
    del model
    assert isinstance(MDIQA, type)
    return sec


def _mdiqa_ablations(
    runs: Path, x: torch.Tensor, y: np.ndarray, out: Path, sec: Section
) -> dict[str, Any]:
    from qgate.models import load_mdiqa
    from qgate.models.mdiqa import predict_argmax, predict_soft
    from training.fit.mdiqa import predict_logits

    cands = {
        "member 0: multi-scale (K=3), supervised only": runs
        / "supervised/member-0/best.safetensors",
        "single-scale (K=1), supervised only": runs / "ablation-single-scale/best.safetensors",
        "supervised only, trained on (no semi-supervision)": runs
        / "ablation-no-semi/best.safetensors",
        "semi-supervised joint (shipped)": runs / "joint/best.safetensors",
    }
    for i in (1, 2):
        p = runs / f"supervised/member-{i}/best.safetensors"
        if p.exists():
            cands[f"member {i} (ensemble)"] = p
    rows, res = [], {}
    for name, p in cands.items():
        if not (p.parent / "done.json").exists():  # missing or still training
            rows.append(
                [name, "not run to the end (cut for compute)", math.nan, math.nan, math.nan]
            )
            continue
        m = load_mdiqa(p)
        lg = predict_logits(m, x)
        c = correlations(predict_soft(lg).numpy(), y)
        ca = correlations(predict_argmax(lg).numpy(), y)
        res[name] = {"soft": c.as_dict(), "argmax": ca.as_dict(), "taus": list(m.cfg.taus)}
        rows.append([name, ",".join(f"{t:g}" for t in m.cfg.taus), c.overall, ca.overall, c.srocc])
    if rows:
        sec.text("Ablations (same held-out slices; Overall = |PLCC| + |SROCC| + |KROCC|):")
        sec.table(["model", "taus", "Overall soft", "Overall argmax", "SROCC soft"], rows)
        fig = bar_chart(
            {r[0].split(":")[0].split(",")[0][:22]: float(r[2]) for r in rows},
            out / "mdiqa_ablations.png",
            title="MD-IQA ablations: Overall (soft) on the held-out split",
            ylabel="Overall",
        )
        sec.figure(fig, "MD-IQA ablations")
    return res


# ----------------------------------------------------------------------------- N2Q
def _n2q_section(plan: EvalPlan, out: Path, echo: Echo) -> Section:
    from qgate.core.physics import WINDOWS, window
    from qgate.models import N2QNet
    from training.fit.export import load_weights
    from training.fit.n2q import load_n2q, predict_n2q_batch

    sec = Section("Noise2Quality")
    data = plan.data["n2q"]
    dev = _device(plan.device)
    wpath = plan.weights_for("n2q")
    model = load_weights(wpath, device=dev)
    assert isinstance(model, N2QNet)
    test = load_n2q(data, plan.split)
    echo(f"N2Q: {len(test)} {plan.split} slices")
    levels = model.cfg.dose_levels
    maps, logits = predict_n2q_batch(model, test)
    tgt = test.ssim.float()
    mm = map_metrics(maps, tgt)
    dose = classification(logits.argmax(1), test.dose, len(levels))
    mean_pred = maps.mean(dim=(1, 2)).numpy()
    mean_true = tgt.mean(dim=(1, 2)).numpy()
    mq = correlations(mean_pred, mean_true)
    res: dict[str, Any] = {
        "map": mm.as_dict(),
        "dose": dose.as_dict(),
        "mean_quality": mq.as_dict(),
    }
    sec.text(
        f"Held-out `{plan.split}` split of `{data}`: {len(test)} slices. Paper (real Mayo "
        "data, U-Net at the paper's widths): map SSIM 0.7664, MSE 0.0686, NRMSE 0.2437."
    )
    sec.table(
        [
            "map SSIM",
            "map MSE",
            "map NRMSE",
            "dose accuracy",
            "dose F1 (macro)",
            "mean-quality SROCC",
            "mean-quality MAE",
        ],
        [[mm.ssim, mm.mse, mm.nrmse, dose.accuracy, dose.f1_macro, mq.srocc, mm.mean_quality_mae]],
    )
    sec.text("Dose confusion (rows: true dose, columns: predicted):")
    sec.table(
        ["true \\ pred", *[f"{d}%" for d in levels]],
        [[f"{d}%", *row] for d, row in zip(levels, dose.confusion, strict=True)],
    )
    fig = scatter_chart(
        {"slices": (mean_true.tolist(), mean_pred.tolist())},
        out / "n2q_mean_quality.png",
        title="Noise2Quality: mean SSIM per slice (held-out)",
        xlabel="true mean SSIM",
        ylabel="predicted mean SSIM",
    )
    sec.figure(fig, "N2Q mean quality")
    _n2q_example(model, test, maps, out, sec)

    # Baselines: noise sigma and BRISQUE against the true mean SSIM; a noise-sigma dose
    # classifier (nearest class median of log sigma, learnt on the train split).
    echo("N2Q: classical baselines")
    c, w = WINDOWS["n2q"]
    px = 358.4 / test.hu.shape[-1]
    sig = np.array([bl.noise_sigma(h.numpy().astype(np.float32), px) for h in test.hu])
    bq = np.array([bl.brisque_score(window(h.float(), c, w).numpy()) for h in test.hu])
    train = load_n2q(data, "train", limit=200)
    sig_tr = np.array([bl.noise_sigma(h.numpy().astype(np.float32), px) for h in train.hu])
    med = bl.class_medians(np.log(sig_tr), train.dose.numpy(), len(levels))
    base_dose = classification(bl.apply_thresholds(np.log(sig), med), test.dose, len(levels))
    rows = [["**N2Q mean quality**", mq.plcc, mq.srocc, mq.krocc]]
    bres = {}
    for name, v in (("noise sigma, negated", -sig), ("BRISQUE, negated", -bq)):
        cc = correlations(v, mean_true)
        bres[name] = cc.as_dict()
        rows.append([name, cc.plcc, cc.srocc, cc.krocc])
    sec.text("Against the true mean SSIM of each slice (higher = better):")
    sec.table(["measure", "PLCC", "SROCC", "KROCC"], rows)
    sec.table(
        ["dose classifier", "accuracy", "F1 (macro)"],
        [
            ["**N2Q dose head**", dose.accuracy, dose.f1_macro],
            ["noise sigma, nearest class median (train)", base_dose.accuracy, base_dose.f1_macro],
        ],
    )
    res["baselines"] = {**bres, "dose_noise_threshold": base_dose.as_dict()}
    best_rank = max(
        (b["srocc"] for b in bres.values() if math.isfinite(b["srocc"])), default=-math.inf
    )
    res["beats_baselines"] = bool(mq.srocc > best_rank and dose.accuracy > base_dose.accuracy)

    nohpf = plan.runs / "n2q-nohpf" if plan.runs is not None else None
    if nohpf is not None and not (nohpf / "done.json").exists():
        sec.text("Ablation without the high-pass channel: not run to the end (cut for compute).")
    elif nohpf is not None:
        abl = load_weights(nohpf / "best.safetensors", device=dev)
        assert isinstance(abl, N2QNet)
        m2, l2 = predict_n2q_batch(abl, test)
        mm2 = map_metrics(m2, tgt)
        d2 = classification(l2.argmax(1), test.dose, len(levels))
        q2 = correlations(m2.mean(dim=(1, 2)).numpy(), mean_true)
        sec.text("Ablation: with vs without the high-pass channel (same data, schedule, seed):")
        sec.table(
            ["input", "map SSIM", "map MSE", "map NRMSE", "dose accuracy", "mean-quality SROCC"],
            [
                [
                    "[image, HPF] (paper, shipped)",
                    mm.ssim,
                    mm.mse,
                    mm.nrmse,
                    dose.accuracy,
                    mq.srocc,
                ],
                ["[image] only", mm2.ssim, mm2.mse, mm2.nrmse, d2.accuracy, q2.srocc],
            ],
        )
        res["ablation_no_hpf"] = {
            "map": mm2.as_dict(),
            "dose": d2.as_dict(),
            "mean_quality": q2.as_dict(),
        }
    sec.results = res
    return sec


def _n2q_example(model: Any, test: Any, maps: torch.Tensor, out: Path, sec: Section) -> None:
    """A strip: the image at each dose of one slice, its true and predicted maps."""
    from PIL import Image

    n = len(test)
    if n == 0:
        return
    # the first source slice with all its doses (5 consecutive samples per source)
    k = len(model.cfg.dose_levels)
    idx = list(range(min(k, n)))
    from qgate.core.physics import window

    tiles = []
    for i in idx:
        img = window(test.hu[i].float(), 40.0, 300.0).numpy()
        col = np.concatenate(
            [img, np.clip(test.ssim[i].float().numpy(), 0, 1), np.clip(maps[i].numpy(), 0, 1)],
            axis=0,
        )
        tiles.append(col)
    arr = np.concatenate(tiles, axis=1)
    im = Image.fromarray(np.round(arr * 255).astype(np.uint8))
    scale = 128 / test.hu.shape[-1]
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
    p = out / "n2q_example.png"
    im.save(p, optimize=True)
    sec.text(
        "One held-out slice at each dose (columns, increasing dose class): image "
        "(C40/W300), true SSIM map, predicted map (both 0-1 as black-white)."
    )
    sec.figure(p, "N2Q example maps")


# ----------------------------------------------------------------------------- chest
def _chest_section(plan: EvalPlan, out: Path, echo: Echo) -> Section:
    from qgate.models import ChestIQANet
    from training.fit.chest import load_chest, predict_chest_batch
    from training.fit.export import load_weights

    sec = Section("Chest CT-IQA")
    data = plan.data["chest"]
    dev = _device(plan.device)
    wpath = plan.weights_for("chest")
    model = load_weights(wpath, device=dev)
    assert isinstance(model, ChestIQANet)
    test = load_chest(data, plan.split)
    echo(f"Chest: {len(test)} {plan.split} volumes")
    o = predict_chest_batch(model, test)
    win = classification(o.window_logits.argmax(1), test.window, 2)
    dose = classification(o.dose_logits.argmax(1), test.dose, 2)
    snr = regression(o.snr, test.snr)
    bq = regression(o.brisque, test.brisque)
    score = model.score(o).detach().numpy()
    res: dict[str, Any] = {
        "window": win.as_dict(),
        "dose": dose.as_dict(),
        "snr": snr.as_dict(),
        "brisque": bq.as_dict(),
    }
    sec.text(
        f"Held-out `{plan.split}` split of `{data}`: {len(test)} volumes "
        "(32 x 128 x 128). Paper (real data): window accuracy 0.8375, dose 0.8813."
    )
    sec.table(
        ["head", "accuracy", "F1 (macro)"],
        [
            ["window (soft / lung)", win.accuracy, win.f1_macro],
            ["dose (30 / 50 mAs)", dose.accuracy, dose.f1_macro],
        ],
    )
    sec.table(
        ["regression", "SRCC", "PLCC", "RMSE", "target range"],
        [
            [
                "SNR",
                snr.srcc,
                snr.plcc,
                snr.rmse,
                f"{float(test.snr.min()):.1f}-{float(test.snr.max()):.1f}",
            ],
            [
                "BRISQUE",
                bq.srcc,
                bq.plcc,
                bq.rmse,
                f"{float(test.brisque.min()):.1f}-{float(test.brisque.max()):.1f}",
            ],
        ],
    )
    res["quality_score"] = {
        "mean": float(np.mean(score)),
        "min": float(np.min(score)),
        "max": float(np.max(score)),
    }
    fig = scatter_chart(
        {"SNR": (test.snr.tolist(), o.snr.tolist())},
        out / "chest_snr.png",
        title="Chest CT-IQA: SNR (held-out)",
        xlabel="true SNR",
        ylabel="predicted SNR",
    )
    sec.figure(fig, "Chest SNR")

    echo("Chest: classical baselines")
    px, dz = 358.4 / test.hu.shape[-1], 2.5
    sig = np.array([bl.noise_sigma(h.numpy().astype(np.float32), px) for h in test.hu])
    snr_c = np.array([bl.snr_classic(h.numpy().astype(np.float32), px, dz) for h in test.hu])
    train = load_chest(data, "train")
    sig_tr = np.array([bl.noise_sigma(h.numpy().astype(np.float32), px) for h in train.hu])
    med_d = bl.class_medians(np.log(sig_tr), train.dose.numpy(), 2)
    med_w = bl.class_medians(np.log(sig_tr), train.window.numpy(), 2)
    b_dose = classification(bl.apply_thresholds(np.log(sig), med_d), test.dose, 2)
    b_win = classification(bl.apply_thresholds(np.log(sig), med_w), test.window, 2)
    b_snr = regression(snr_c, test.snr.numpy())
    b_snr_sig = correlations(-sig, test.snr.numpy())
    sec.text(
        "Classical baselines on the same volumes (nearest class median of log noise "
        "sigma, learnt on the train split; the service's ROI SNR):"
    )
    sec.table(
        ["task", "Chest CT-IQA", "classical", "classical measure"],
        [
            ["window accuracy", win.accuracy, b_win.accuracy, "noise sigma"],
            ["dose accuracy", dose.accuracy, b_dose.accuracy, "noise sigma"],
            ["SNR SRCC", snr.srcc, b_snr.srcc, "ROI SNR (qgate.score.scorers.snr)"],
            ["SNR SRCC", snr.srcc, b_snr_sig.srocc, "noise sigma (negated)"],
        ],
    )
    res["baselines"] = {
        "window": b_win.as_dict(),
        "dose": b_dose.as_dict(),
        "snr_roi": b_snr.as_dict(),
        "snr_noise_sigma": b_snr_sig.as_dict(),
    }
    res["beats_baselines"] = bool(
        dose.accuracy > b_dose.accuracy
        and win.accuracy >= b_win.accuracy
        and snr.srcc > max(b_snr.srcc, b_snr_sig.srocc)
    )
    sec.text(
        "The quality module keeps the paper's published fit (default until review labels "
        "exist). Its signs (SNR negative, BRISQUE positive) make `score` *rise* with noise; "
        f"on this split it ranges {res['quality_score']['min']:.2f}-"
        f"{res['quality_score']['max']:.2f}. Do not gate on it before a refit "
        "(`QualityFit.refit`)."
    )
    sec.results = res
    return sec


# ----------------------------------------------------------------------------- ladders
def _ladder_section(plan: EvalPlan, out: Path, echo: Echo) -> Section:
    from qgate.core.physics import body_mask
    from qgate.models import ChestIQANet, N2QNet, load_mdiqa, predict_chestiqa, predict_n2q
    from qgate.models.mdiqa import mdiqa_crops, predict_soft, resolve_data_config
    from training.datasets.common import read_manifest
    from training.fit.export import load_weights
    from training.fit.mdiqa import predict_logits
    from training.ladder import chest_anatomies, ladder_anatomies, run_ladders

    sec = Section("Monotonicity: dose and sparse-view ladders on held-out anatomy")
    dev = _device(plan.device)
    src = plan.data.get("mdiqa") or plan.data.get("n2q") or plan.data.get("chest")
    assert src is not None
    splits = read_manifest(src)["splits"]
    scorers: dict[str, Callable[[np.ndarray, float], float]] = {}
    if "mdiqa" in plan.data:
        md = load_mdiqa(plan.weights_for("mdiqa"), device=dev)
        dcfg = resolve_data_config(md)

        def mdiqa_score(hu: np.ndarray, px: float) -> float:
            x = mdiqa_crops(torch.as_tensor(hu), dcfg)  # the worker's crops and pooling
            return float(predict_soft(predict_logits(md, x)).mean())

        scorers["MD-IQA score"] = mdiqa_score
    if "n2q" in plan.data:
        nq = load_weights(plan.weights_for("n2q"), device=dev)
        assert isinstance(nq, N2QNet)

        def n2q_quality(hu: np.ndarray, px: float) -> float:
            return predict_n2q(nq, hu, body_mask(hu), return_maps=False).mean_quality

        scorers["N2Q mean quality"] = n2q_quality
    scorers["noise sigma HU (classical)"] = lambda hu, px: bl.noise_sigma(hu, px)
    sizes = (plan.ladder_size,) if isinstance(plan.ladder_size, int) else plan.ladder_size
    rows = []
    for size in sizes:
        for r in run_ladders(ladder_anatomies(splits, size), scorers, device=dev, echo=echo):
            rows.append({**r, "size": size})
    if "chest" in plan.data:
        ch = load_weights(plan.weights_for("chest"), device=dev)
        assert isinstance(ch, ChestIQANet)
        csplits = read_manifest(plan.data["chest"])["splits"]
        cs: dict[str, Callable[[np.ndarray, float], float]] = {
            "Chest SNR": lambda hu, px: predict_chestiqa(ch, hu, pixel_mm=px).snr,
            "Chest P(high dose)": lambda hu, px: predict_chestiqa(ch, hu, pixel_mm=px).dose_prob,
            "Chest score (paper fit)": lambda hu, px: predict_chestiqa(ch, hu, pixel_mm=px).score,
        }
        for r in run_ladders(
            chest_anatomies(csplits, n=1), cs, device=dev, view_steps=(), kernel="smooth", echo=echo
        ):
            rows.append({**r, "size": 128})
    lower_better = {"noise sigma HU (classical)"}
    table, n_ok, n_all = [], 0, 0
    counts: dict[str, list[int]] = {}
    for r in rows:
        dec = r["scorer"] not in lower_better
        ok = monotone(r["values"], decreasing=dec, strict=True)
        r["monotone"] = ok
        if r["scorer"] in ("MD-IQA score", "N2Q mean quality"):
            n_ok += ok
            n_all += 1
        if not r["scorer"].startswith("Chest score"):
            c = counts.setdefault(f"{r['scorer']}, {r['size']} px, {r['ladder']}", [0, 0])
            c[0] += ok
            c[1] += 1
        vals = " / ".join(f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}" for v in r["values"])
        table.append(
            [
                r["anatomy"] + ("" if r["held_out"] else " (seen in training)"),
                r["size"],
                r["ladder"] + ": " + " / ".join(r["rungs"]),
                r["scorer"],
                vals,
                (
                    f"not judged ({'falls' if ok else 'does not fall'})"
                    if r["scorer"].startswith("Chest score")
                    else ok
                    if dec
                    else ("yes (rises)" if ok else "**no** (should rise)")
                ),
            ]
        )
    sec.text(
        "Each anatomy simulated once at full dose (at "
        + " and ".join(f"{s} px" for s in sizes)
        + ", the default scanner for that pixel size: the full 1152-view scanner at 512 "
        "px / 0.7 mm, what the service sees; 2x-binned at 256 px / 1.4 mm, the grid the "
        "models were trained on; Chest volumes 32 x 128 x 128, smooth kernel) and "
        "reconstructed along a dose ladder (100/50/25/10 %, all views) and a view ladder "
        "(all, 1/2, 1/4, 1/8, 1/16 of the views, full dose). Series value = mean over the "
        "slices. A quality score should fall strictly along each ladder (noise sigma "
        "should rise)."
    )
    sec.table(["anatomy", "px", "ladder", "scorer", "values along the ladder", "monotone"], table)
    sec.text(f"MD-IQA and N2Q monotone on {n_ok} of {n_all} ladders.")
    sec.table(
        ["scorer, size, ladder", "monotone"],
        [[k, f"{v[0]} of {v[1]}"] for k, v in counts.items()],
    )
    series: dict[str, tuple[list[float], list[float]]] = {}
    for r in rows:
        if r["scorer"] == "MD-IQA score":
            series[f"{r['anatomy'][:14]} {r['size']} {r['ladder']}"] = (
                list(range(len(r["values"]))),
                r["values"],
            )
    if series:
        fig = line_chart(
            series,
            out / "ladder_mdiqa.png",
            title="MD-IQA score along the ladders",
            xlabel="rung (0 = full dose, all views)",
            ylabel="score",
            markers=True,
        )
        sec.figure(fig, "MD-IQA ladders")
    sec.results = {"rows": rows, "monotone": n_ok, "of": n_all, "counts": counts}
    return sec


# ----------------------------------------------------------------------------- driver
def _training_curves(runs: Path, out: Path, sec: Section) -> None:
    """Copy the loss curves of the shipped runs next to the report."""
    import shutil

    for name, sub in (
        ("mdiqa_joint", "mdiqa/joint"),
        ("mdiqa_member0", "mdiqa/supervised/member-0"),
        ("n2q", "n2q"),
        ("chest", "chest"),
    ):
        src = runs / sub / "loss.png"
        if src.exists():
            dst = out / f"loss_{name}.png"
            shutil.copyfile(src, dst)
            sec.figure(dst, f"{name} loss")


def run_evaluation(plan: EvalPlan, out: Path, *, echo: Echo = print) -> Path:
    """Evaluate what ``plan`` names; write ``out/REPORT.md``, ``out/results.json``, PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    sections: list[Section] = []
    builders = {"mdiqa": _mdiqa_section, "n2q": _n2q_section, "chest": _chest_section}
    for name, fn in builders.items():
        if name in plan.data:
            sections.append(fn(plan, out, echo))
    if plan.ladder:
        sections.append(_ladder_section(plan, out, echo))
    verdict = Section("Verdict: each model against its classical baselines")
    vrows = [
        [s.title, s.results["beats_baselines"]] for s in sections if "beats_baselines" in s.results
    ]
    verdict.table(["model", "beats every classical baseline on the held-out split"], vrows)
    if plan.runs is not None:
        curves = Section("Training curves")
        _training_curves(plan.runs, out, curves)
        if curves.lines:
            sections.append(curves)
    doc = ["# qgate model evaluation", ""]
    doc += [
        "Written by `qgate-train evaluate`. Datasets: "
        + ", ".join(f"{k} `{v}`" for k, v in plan.data.items())
        + f"; split `{plan.split}` (patient-disjoint from training).",
        "",
    ]
    if plan.notes is not None:
        doc += [plan.notes.read_text().strip(), ""]
    for s in [verdict, *sections]:
        doc += [f"## {s.title}", "", *s.lines]
    report = out / "REPORT.md"
    report.write_text("\n".join(doc).rstrip() + "\n")
    (out / "results.json").write_text(
        json.dumps({s.title: s.results for s in sections}, indent=1, default=_json) + "\n"
    )
    return report


def _json(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


# ----------------------------------------------------------------------------- LDCTIQA
def score_ldctiqa(
    path: Path, weights: Path | None = None, *, device: str | None = None
) -> dict[str, Any]:
    """Score every image of an LDCTIQAC2023-layout folder; correlations on the labelled."""
    from qgate.models import load_mdiqa
    from qgate.models.mdiqa import predict_argmax, predict_soft, resolve_data_config
    from training.fit.data import load_mdiqa_folder
    from training.fit.mdiqa import predict_logits

    w = weights or DEFAULT_WEIGHTS["mdiqa"]
    if not w.exists():
        raise FileNotFoundError(f"no MD-IQA weights at {w}")
    model = load_mdiqa(w, device=_device(device))
    data = load_mdiqa_folder(path, resolve_data_config(model))
    if len(data) == 0:
        raise ValueError(f"no images in {path}/image")
    logits = predict_logits(model, data.scored)
    preds = {"soft": predict_soft(logits).numpy(), "argmax": predict_argmax(logits).numpy()}
    y = data.y.numpy()
    ok = np.isfinite(y)
    out: dict[str, Any] = {"n_images": len(data), "n_labelled": int(ok.sum())}
    for k, p in preds.items():
        out[k] = correlations(p[ok], y[ok]).as_dict()
    out["predictions"] = {
        k: {n: round(float(v), 4) for n, v in zip(data.names, p, strict=True)}
        for k, p in preds.items()
    }
    return out
