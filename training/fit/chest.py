"""Chest CT-IQA training: 50 CE(window) + 50 CE(dose) + 5 MSE(SNR) + 1 MSE(BRISQUE).

Inputs come from the stored HU volumes through the service's preprocessing
(:func:`qgate.models.preprocess.prepare_chest_input`). The SNR and BRISQUE heads are
parameterised around the training targets' mean and std
(:meth:`ChestIQANet.set_target_stats`, saved with the weights).

OUR choices (:class:`ChestFitConfig`): the regression losses in units of the target std
(``normalised_reg_loss``): the paper's 50/50/5/1 balanced raw magnitudes of its own SNR
and BRISQUE scales, which are not published, and raw MSE of our SNR (tens of units) would
drown the class terms; left-right flips; AdamW, cosine schedule. The quality module keeps
the paper's published fit (refit it from review labels: ``QualityFit.refit``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qgate.models import ChestIQANet, create_model
from qgate.models.chestiqa import ChestIQAOutput, ChestIQATargets
from qgate.models.preprocess import ChestInputConfig, prepare_chest_input
from training.fit.common import autocast, open_fit, optimiser_step, seed_everything
from training.fit.data import epoch_batches, epoch_generator, steps_per_epoch
from training.fit.loop import cosine_schedule, train_to_best
from training.metrics import classification, regression
from training.plots import scatter_chart

__all__ = [
    "ChestData",
    "ChestFitConfig",
    "chest_inputs",
    "fit_chest",
    "load_chest",
    "predict_chest_batch",
]


@dataclass(frozen=True)
class ChestFitConfig:
    variant: str = "tiny"
    epochs: int = 6
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    normalised_reg_loss: bool = True
    seed: int = 0
    augment: bool = True
    amp: bool = True
    device: str | None = None

    @property
    def model_name(self) -> str:
        return f"chestiqa_{self.variant}"


@dataclass
class ChestData:
    hu: torch.Tensor  # (N, D, H, W) int16
    window: torch.Tensor  # (N,) 0 soft, 1 lung
    dose: torch.Tensor  # (N,) 0 low, 1 high
    snr: torch.Tensor
    brisque: torch.Tensor

    def __len__(self) -> int:
        return len(self.hu)


def load_chest(root: str | Path, split: str) -> ChestData:
    """A split's shards; empty when the split has none (tiny datasets)."""
    from training.datasets.common import load_split

    try:
        t = load_split(root, split)
    except FileNotFoundError:
        e = torch.empty(0)
        return ChestData(torch.empty(0, 1, 1, 1, dtype=torch.int16), e.long(), e.long(), e, e)
    return ChestData(
        t["hu"],
        t["window_class"].long(),
        t["dose_class"].long(),
        t["snr"].float(),
        t["brisque"].float(),
    )


def chest_inputs(hu: torch.Tensor, cfg: ChestInputConfig, device: torch.device) -> torch.Tensor:
    """(B, D, H, W) HU -> (B, C, depth, size, size) model inputs."""
    return torch.cat([prepare_chest_input(v.to(device).float(), cfg) for v in hu])


@torch.no_grad()
def predict_chest_batch(
    model: ChestIQANet, data: ChestData, *, batch_size: int = 8, amp: bool = True
) -> ChestIQAOutput:
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    parts: list[ChestIQAOutput] = []
    for i in range(0, len(data), batch_size):
        with autocast(device, amp):
            o = model(chest_inputs(data.hu[i : i + batch_size], model.data_config, device))
        parts.append(ChestIQAOutput(*(t.float().cpu() for t in o)))
    model.train(was)
    return ChestIQAOutput(*(torch.cat(ts) for ts in zip(*parts, strict=True)))


def _targets(d: ChestData, idx: torch.Tensor, device: torch.device) -> ChestIQATargets:
    return ChestIQATargets(
        window=d.window[idx].to(device),
        dose=d.dose[idx].to(device),
        snr=d.snr[idx].to(device),
        brisque=d.brisque[idx].to(device),
    )


def fit_chest(
    data: str | Path,
    out: str | Path,
    cfg: ChestFitConfig,
    *,
    resume: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    from training.datasets.common import read_manifest

    device, run, earlier = open_fit(data, out, cfg, resume=resume)
    root = run.root
    best_path = root / "best.safetensors"
    if earlier is not None:
        echo(f"{root} finished earlier; skipping")
        return earlier
    params = read_manifest(data)["params"]
    overrides: dict[str, Any] = {"normalised_reg_loss": cfg.normalised_reg_loss}
    default_in = ChestInputConfig()
    if int(params["size"]) != default_in.size or int(params["depth"]) != default_in.depth:
        overrides["input"] = ChestInputConfig(depth=int(params["depth"]), size=int(params["size"]))
    seed_everything(cfg.seed)
    model = create_model(cfg.model_name, **overrides)
    assert isinstance(model, ChestIQANet)
    echo(f"reading {data} ...")
    train, val = load_chest(data, "train"), load_chest(data, "val")
    echo(f"train {len(train)}, val {len(val)} volumes")
    model.set_target_stats(
        snr=(float(train.snr.mean()), float(train.snr.std().clamp_min(1e-3))),
        brisque=(float(train.brisque.mean()), float(train.brisque.std().clamp_min(1e-3))),
    )
    model.to(device)
    spe = steps_per_epoch(len(train), cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = cosine_schedule(opt, spe * cfg.epochs, round(cfg.warmup_epochs * spe))
    record = {"stage": "chest", "data": str(data)}

    def batches(epoch: int) -> list[tuple[torch.Tensor, list[int]]]:
        g = epoch_generator(cfg.seed, epoch)
        res = []
        for idx in epoch_batches(len(train), cfg.batch_size, g):
            flips = torch.randint(0, 2, (len(idx),), generator=g).tolist() if cfg.augment else []
            res.append((idx, flips))
        return res

    def step(batch: tuple[torch.Tensor, list[int]], n: int) -> dict[str, float]:
        idx, flips = batch
        hu = train.hu[idx]
        if flips:
            hu = torch.stack([v.flip(-1) if f else v for v, f in zip(hu, flips, strict=True)])
        x = chest_inputs(hu, model.data_config, device)
        with autocast(device, cfg.amp):
            o = model(x)
        loss, parts = model.loss(o, _targets(train, idx, device))
        return optimiser_step(opt, loss, parts)

    def validate() -> dict[str, float]:
        if len(val) == 0:
            return {}
        o = predict_chest_batch(model, val, amp=cfg.amp)
        loss, _ = model.loss(o, _targets(val, torch.arange(len(val)), torch.device("cpu")))
        return {
            "val_loss": float(loss),
            "val_window_acc": classification(o.window_logits.argmax(1), val.window, 2).accuracy,
            "val_dose_acc": classification(o.dose_logits.argmax(1), val.dose, 2).accuracy,
            "val_snr_srcc": regression(o.snr, val.snr).srcc,
            "val_brisque_srcc": regression(o.brisque, val.brisque).srcc,
        }

    # The target stats are buffers: set before the first checkpoint, restored on resume.
    best, best_row = train_to_best(
        run,
        model,
        opt,
        sched,
        (batches, step, validate),
        epochs=cfg.epochs,
        resume=resume,
        monitor="val_loss",
        steps_per_epoch=spe,
        best_path=best_path,
        export={"name": cfg.model_name, "training": record, "overrides": overrides},
    )
    assert isinstance(best, ChestIQANet)
    if len(val):
        o = predict_chest_batch(best, val, amp=cfg.amp)
        scatter_chart(
            {"SNR": (val.snr.tolist(), o.snr.tolist())},
            root / "pred_vs_true.png",
            title="chest: predicted vs true SNR (val)",
            xlabel="true SNR",
            ylabel="predicted SNR",
        )
    summary = {"best": best_row, "weights": str(best_path)}
    run.finish(summary, cfg.epochs)
    return summary
