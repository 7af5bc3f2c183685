"""``qgate-train retrain``: the training half of the service's nightly retraining.

The service (:mod:`qgate.retrain`) exports the reviewed series, the held-out split and the
serving weights to a label file and runs this command as a child process; it reads back
the result file and decides. The contract is :mod:`qgate.retrain.contract`::

    qgate-train retrain --labels RUN/labels.json --out RUN

What it does:

1. **Data.** ``slices_per_series`` evenly spaced slices of each series, read from its
   files; the serving MD-IQA's crops of them (the worker's preprocessing). Optionally the
   simulated MD-IQA folder: train split to training, test split to the held-out set.
   Unlabelled series are pseudo-labelled by an ensemble of the serving model on the slice
   and its mirror image (MD-IQA's ensemble pseudo-labels, kept light: one model, two views).
2. **Candidate.** The serving MD-IQA weights fine-tuned for ``epochs`` epochs with the
   paper's supervised loss (L2 + beta KL) on the labels plus ``pseudo_label_weight`` x the
   same loss on the pseudo-labels (the EMA consistency term is left out: a few steps are
   too short for a teacher to matter). Chest CT-IQA's linear quality module is refit
   (:meth:`QualityFit.refit`, ridge 1) on the training series' scores mapped to the
   paper's 1-10 scale: ``1 + 9 * score / 4``.
3. **Metrics** on the held-out set for the candidate and the serving weights, one item per
   held-out series (its mean slice score) and one per simulated test slice: MAE, and
   PLCC/SROCC/KROCC/Overall with at least ``min_correlation_items`` non-constant items.
4. **Output.** ``mdiqa.safetensors`` (and ``chestiqa.safetensors``) with the serving
   file's metadata, and ``result.json``, written last (its presence means success).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from qgate.retrain.contract import (
    PARENT_PID_ENV,
    RESULT_FILE,
    THREADS_ENV,
    FineTuned,
    HeldOut,
    LabelledSeries,
    LossCurve,
    QualityRefit,
    SimulatedCounts,
    TrainData,
    TrainParams,
    TrainRequest,
    TrainResult,
)

if TYPE_CHECKING:
    import torch

    from qgate.models import MDIQA, ChestIQANet

__all__ = [
    "compare_metrics",
    "fine_tune",
    "load_slices",
    "loss_curve",
    "retrain_cmd",
    "stop_with_parent",
    "train",
]


@dataclass
class _SeriesData:
    uid: str
    hu: np.ndarray  # (S, H, W) the chosen slices
    full_hu: np.ndarray | None  # every slice (Chest CT-IQA)
    pixel_mm: float  # in-plane spacing (Chest CT-IQA's physical field)
    score: float


def load_slices(
    paths: Sequence[str | Path], k: int, *, keep_full: bool
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """``k`` evenly spaced slices of a series (HU), every slice when ``keep_full``, and the
    in-plane pixel spacing (mm)."""
    from qgate.score.scorers.learned import subsample_indices
    from qgate.score.volume import load_series

    volume = load_series([str(p) for p in paths]).volume
    hu = volume.hu
    picked = np.ascontiguousarray(hu[subsample_indices(len(hu), k)], np.float32)
    return picked, (hu if keep_full else None), float(np.mean(volume.pixel_spacing))


def _labelled(rows: Sequence[LabelledSeries], k: int, *, keep_full: bool) -> list[_SeriesData]:
    return [
        _SeriesData(r.uid, *load_slices(r.paths, k, keep_full=keep_full), r.score) for r in rows
    ]


# -------------------------------------------------------------------- models


def _inputs(model: MDIQA, hu: np.ndarray) -> torch.Tensor:
    """HU slices -> the crops the worker scores them from, (N, n, C, S, S)."""
    import torch

    from qgate.models.mdiqa import mdiqa_crops, resolve_data_config

    return mdiqa_crops(torch.from_numpy(hu), resolve_data_config(model))


def _slice_logits(model: MDIQA, crops: torch.Tensor) -> torch.Tensor:
    """Crops (b, n, C, S, S) -> pooled slice log-distributions, as the worker pools them."""
    from qgate.models.mdiqa import pool_crop_logits

    b, n = crops.shape[:2]
    flat = model(crops.flatten(0, 1)).float()
    return pool_crop_logits(flat.view(b, n, *flat.shape[1:]))


def _predict(model: MDIQA, x: torch.Tensor, batch: int = 16) -> np.ndarray:
    import torch

    from qgate.models.mdiqa import predict_soft

    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            out.append(predict_soft(_slice_logits(model, x[s : s + batch]), model.cfg.max_score))
    return torch.cat(out).numpy() if out else np.zeros(0)


def _pseudo_labels(model: MDIQA, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Ensemble pseudo-labels (scores): the model on each slice and its mirror image."""
    import torch

    from qgate.models.losses_mdiqa import ensemble_pseudo_labels

    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            xb = x[s : s + batch]
            views = [_slice_logits(model, xb), _slice_logits(model, xb.flip(-1))]
            scores, _ = ensemble_pseudo_labels(views, model.cfg.max_score)
            out.append(scores)
    return torch.cat(out) if out else torch.zeros(0)


def _one_crop(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One of each slice's serving crops, drawn at random: (b, n, ...) -> (b, ...)."""
    import torch

    pick = torch.randint(x.shape[1], (x.shape[0],), generator=g)
    return x[torch.arange(x.shape[0]), pick]


def fine_tune(
    model: MDIQA,
    x: torch.Tensor,
    y: torch.Tensor,
    params: TrainParams,
    *,
    x_unlabelled: torch.Tensor | None = None,
    y_pseudo: torch.Tensor | None = None,
) -> dict[str, list[float]]:
    """A few epochs of the supervised (+ pseudo-label) loss, in place. Returns the loss
    curves: each step's supervised loss (``sup``) and pseudo-label loss (``pseudo``).

    ``x`` and ``x_unlabelled`` are the worker's crops, (N, n, C, S, S); each step trains
    on one crop per slice drawn at random (training's policy, in the serving frame)."""
    import torch

    from qgate.models.losses_mdiqa import pseudo_label_loss, supervised_loss

    g = torch.Generator().manual_seed(params.seed)
    torch.manual_seed(params.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=params.learning_rate, weight_decay=1e-4)
    has_u = x_unlabelled is not None and y_pseudo is not None and len(x_unlabelled) > 0
    curves: dict[str, list[float]] = {"sup": []}
    model.train()
    for _ in range(params.epochs):
        order = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), params.batch_size):
            idx = order[s : s + params.batch_size]
            parts = supervised_loss(model(_one_crop(x[idx], g)), y[idx], model.cfg)
            loss = parts.total
            curves["sup"].append(float(parts.total.detach()))
            if has_u and params.pseudo_label_weight > 0:
                assert x_unlabelled is not None and y_pseudo is not None
                uidx = torch.randint(len(x_unlabelled), (len(idx),), generator=g)
                xu = _one_crop(x_unlabelled[uidx], g)
                pse = pseudo_label_loss(model(xu), y_pseudo[uidx], model.cfg)
                loss = loss + params.pseudo_label_weight * pse.total
                curves.setdefault("pseudo", []).append(float(pse.total.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return curves


def loss_curve(values: Sequence[float], points: int = 100) -> list[float]:
    """At most ``points`` values: the means of equal runs of steps (what a run stores)."""
    if len(values) <= points:
        return [round(v, 4) for v in values]
    edges = np.linspace(0, len(values), points + 1).round().astype(int)
    return [round(float(np.mean(values[a:b])), 4) for a, b in pairwise(edges)]


def _save_like(model: Any, source: Path, dest: Path, training: dict[str, Any]) -> Path:
    """Save ``model``'s state dict with ``source``'s metadata (so it loads the same way)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        dtypes = {k: fh.get_slice(k).get_dtype() for k in fh.keys()}  # noqa: SIM118

    # Each tensor in its source dtype: a bf16 file's float32 buffers (Chest CT-IQA's refit
    # quality coefficients) stay float32 instead of losing the refit to bf16 rounding.
    half = {"BF16": torch.bfloat16, "F16": torch.float16}
    state = {
        k: (v.to(half[dtypes[k]]) if dtypes.get(k) in half and v.is_floating_point() else v)
        .detach()
        .cpu()
        .contiguous()
        for k, v in model.state_dict().items()
    }
    meta["qgate_training"] = json.dumps(training, default=str)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(dest)
    return dest


# ------------------------------------------------------------------- metrics


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def compare_metrics(pred: np.ndarray, labels: np.ndarray, min_items: int) -> HeldOut:
    """MAE always; PLCC/SROCC/KROCC and Overall when there are enough non-constant items."""
    from scipy import stats

    mae = round(float(np.mean(np.abs(pred - labels))), 4)
    if not (len(labels) >= min_items and np.ptp(labels) > 0 and np.ptp(pred) > 0):
        return HeldOut(n=len(labels), mae=mae)
    plcc = float(stats.pearsonr(pred, labels)[0])
    srocc = float(stats.spearmanr(pred, labels)[0])
    krocc = float(stats.kendalltau(pred, labels)[0])
    return HeldOut(
        n=len(labels),
        mae=mae,
        plcc=_finite_or_none(round(plcc, 4)),
        srocc=_finite_or_none(round(srocc, 4)),
        krocc=_finite_or_none(round(krocc, 4)),
        overall=_finite_or_none(round(abs(plcc) + abs(srocc) + abs(krocc), 4)),
    )


# ----------------------------------------------------------------------- run


def train(request: TrainRequest, out_dir: Path) -> TrainResult:
    """Train and measure the candidates of ``request``; write them and the result file into
    ``out_dir`` (the result file last) and return the result."""
    import torch

    from qgate.models.mdiqa import resolve_data_config
    from qgate.score.scorers.learned import load_model

    params = request.params
    k = params.slices_per_series
    keep_full = request.chestiqa is not None
    train_rows = _labelled(request.train, k, keep_full=keep_full)
    test_rows = _labelled(request.held_out, k, keep_full=keep_full)

    current: MDIQA = load_model("mdiqa", request.mdiqa.path)  # type: ignore[assignment]
    x_train = torch.cat([_inputs(current, r.hu) for r in train_rows])
    y_train = torch.cat([torch.full((len(r.hu),), r.score) for r in train_rows])
    test_x = [_inputs(current, r.hu) for r in test_rows]
    test_y = [r.score for r in test_rows]
    train_slices = len(x_train)
    simulated = None
    if request.simulated_dir is not None:
        from training.fit.data import load_mdiqa_split

        dc = resolve_data_config(current)
        sim_train = load_mdiqa_split(request.simulated_dir, "train", dc)
        sim_test = load_mdiqa_split(request.simulated_dir, "test", dc)
        # The serving crops of each slice, as for the reviewed series (_inputs).
        assert sim_train.crops is not None and sim_test.crops is not None
        ok = torch.isfinite(sim_train.y)
        x_train = torch.cat([x_train, sim_train.crops[ok]])
        y_train = torch.cat([y_train, sim_train.y[ok]])
        ok_t = torch.isfinite(sim_test.y)
        test_x += [x[None] for x in sim_test.crops[ok_t]]
        test_y += [float(v) for v in sim_test.y[ok_t]]
        simulated = SimulatedCounts(
            dir=str(request.simulated_dir), train=int(ok.sum()), test=int(ok_t.sum())
        )

    x_u = y_u = None
    xs = [_inputs(current, load_slices(u.paths, k, keep_full=False)[0]) for u in request.unlabelled]
    if xs:
        x_u = torch.cat(xs)
        y_u = _pseudo_labels(current, x_u)

    labels_eval = np.asarray(test_y, dtype=np.float64)

    def evaluate(model: MDIQA) -> HeldOut:
        pred = np.asarray([float(np.mean(_predict(model, x))) for x in test_x])
        return compare_metrics(pred, labels_eval, params.min_correlation_items)

    current_metrics = evaluate(current)
    candidate: MDIQA = load_model("mdiqa", request.mdiqa.path)  # type: ignore[assignment]
    curves = fine_tune(candidate, x_train, y_train, params, x_unlabelled=x_u, y_pseudo=y_u)
    data = TrainData(
        train_slices=train_slices,
        unlabelled_slices=0 if x_u is None else len(x_u),
        simulated=simulated,
    )
    info: dict[str, Any] = {"run": request.run_id, "parent": request.mdiqa.version}
    info.update(data.model_dump(exclude_none=True))
    mdiqa = FineTuned(
        weights=_save_like(candidate, request.mdiqa.path, out_dir / "mdiqa.safetensors", info).name,
        candidate=evaluate(candidate),
        current=current_metrics,
        train_losses={name: round(v[-1], 4) for name, v in curves.items() if v},
        loss_curve=LossCurve(
            steps=len(curves["sup"]),
            sup=loss_curve(curves["sup"]),
            pseudo=loss_curve(curves["pseudo"]) if "pseudo" in curves else None,
        ),
    )
    chest = None
    if request.chestiqa is not None and len(train_rows) >= 2:
        chest = _refit_chest(
            request.chestiqa.path,
            train_rows,
            test_rows,
            out_dir,
            {**info, "parent": request.chestiqa.version},
        )
    result = TrainResult(run_id=request.run_id, mdiqa=mdiqa, chestiqa=chest, data=data)
    tmp = out_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(result.model_dump_json(by_alias=True, indent=1))
    tmp.replace(out_dir / RESULT_FILE)
    return result


def _refit_chest(
    weights: Path,
    train_rows: list[_SeriesData],
    test_rows: list[_SeriesData],
    out_dir: Path,
    info: dict[str, Any],
) -> QualityRefit:
    """Refit the quality module on the training series (scores 0-4 -> 1-10); held-out MAE."""
    import torch

    from qgate.models import predict_chestiqa
    from qgate.score.scorers.learned import load_model

    model: ChestIQANet = load_model("chestiqa", weights)  # type: ignore[assignment]

    def feats(rows: list[_SeriesData]) -> np.ndarray:
        return np.asarray(
            [
                predict_chestiqa(model, r.full_hu, pixel_mm=r.pixel_mm, amp=False).features  # type: ignore[arg-type]
                for r in rows
            ]
        )

    def to10(rows: list[_SeriesData]) -> np.ndarray:
        return np.asarray([1.0 + 9.0 * r.score / 4.0 for r in rows])

    f_test, y_test = feats(test_rows), to10(test_rows)
    with torch.no_grad():
        before = model.quality(torch.from_numpy(f_test).float()).numpy()
    fit = model.quality.refit(feats(train_rows), to10(train_rows), ridge=1.0)
    with torch.no_grad():
        after = model.quality(torch.from_numpy(f_test).float()).numpy()
    path = _save_like(model, weights, out_dir / "chestiqa.safetensors", info)
    return QualityRefit(
        weights=path.name,
        candidate=HeldOut(n=len(y_test), mae=round(float(np.mean(np.abs(after - y_test))), 4)),
        current=HeldOut(n=len(y_test), mae=round(float(np.mean(np.abs(before - y_test))), 4)),
        coef=[round(c, 5) for c in fit.coef],
        intercept=round(fit.intercept, 5),
    )


def stop_with_parent() -> None:
    """Stop when the service that started this process dies (``QGATE_RETRAIN_PARENT_PID``).

    Linux: the kernel sends SIGTERM when the parent process exits (``PR_SET_PDEATHSIG``;
    with a wrapper in ``retrain.command``, when the wrapper exits); a service already gone
    before that was set is caught by its process ID. Elsewhere, or run by hand (no
    variable), nothing changes.
    """
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    try:
        os.kill(int(parent), 0)
    except ProcessLookupError:
        sys.exit(f"the qgate process {parent} that started this training is gone")
    except PermissionError:
        pass  # alive, under another user


def limit_threads() -> None:
    """Use the threads the service allows (``QGATE_RETRAIN_THREADS``, its
    ``retrain.threads``) for torch's intra- and inter-op pools; run by hand (no variable),
    torch's defaults. OpenMP, MKL and OpenBLAS read their own variables, which the service
    sets to the same number."""
    threads = os.environ.get(THREADS_ENV)
    if not threads:
        return
    import torch

    n = int(threads)
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # already fixed once parallel work has run
        torch.set_num_interop_threads(n)


@click.command("retrain")
@click.option(
    "--labels",
    "labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The exported label file (qgate.retrain.contract.TrainRequest, JSON).",
)
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Where the candidate weights and result.json go.",
)
def retrain_cmd(labels: Path, out: Path) -> None:
    """Fine-tune MD-IQA (and refit Chest CT-IQA) for the service's nightly retraining."""
    stop_with_parent()
    limit_threads()
    request = TrainRequest.model_validate_json(labels.read_text())
    out.mkdir(parents=True, exist_ok=True)
    result = train(request, out)
    click.echo(f"wrote {out / RESULT_FILE}: candidate {result.mdiqa.candidate.model_dump()}")
