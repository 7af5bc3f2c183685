"""Noise2Quality training: MSE on the SSIM map + alpha CE on the dose class (paper eq. 1).

Inputs are made from the stored HU slices with the service's own preprocessing
(:func:`qgate.models.preprocess.prepare_n2q_input`: window C40/W300, high-pass, at the
stored grid: no resize, the slices were simulated at that grid, so the noise is native),
so what the model learns on is what it is served. Targets: the stored SSIM map and dose
class.

OUR choices (:class:`N2QFitConfig`): random native-resolution square crops (``crop``) for
all but the last ``full_epochs`` epochs - the map is local, and a 128 crop costs a
quarter of a 256 slice; the last epochs see whole slices so the instance norms settle on
whole-slice statistics, as served; random flips and 90-degree rotations of input and
target together (the high-pass is computed on the whole slice first, as in serving).
Adam(W) lr 2e-4, weight decay 1e-5 (paper), cosine schedule; the map's output bias starts
at the training targets' mean.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qgate.models import N2QNet, create_model
from qgate.models.n2q import N2QTargets
from qgate.models.preprocess import N2QInputConfig, prepare_n2q_input
from training.fit.common import autocast, open_fit, optimiser_step, seed_everything
from training.fit.data import epoch_batches, epoch_generator, steps_per_epoch
from training.fit.loop import cosine_schedule, train_to_best
from training.metrics import classification, map_metrics
from training.plots import scatter_chart

log = logging.getLogger(__name__)

__all__ = ["N2QFitConfig", "fit_n2q", "n2q_inputs", "predict_n2q_batch"]


@dataclass(frozen=True)
class N2QFitConfig:
    variant: str = "tiny"
    epochs: int = 6
    batch_size: int = 8
    lr: float = 2e-4  # paper
    weight_decay: float = 1e-5  # paper
    warmup_epochs: float = 0.5
    crop: int | None = 128
    full_epochs: int = 1
    highpass: bool = True  # False: the "U-Net without HPF" ablation
    seed: int = 0
    augment: bool = True
    amp: bool = True
    device: str | None = None
    max_train: int | None = None
    # The dose head learns at lr x this (ours): Adam moves a weight ~lr per step, and at
    # 2e-4 the head would need thousands of steps to reach logit gaps of a few units.
    dose_lr_mult: float = 10.0

    @property
    def model_name(self) -> str:
        return f"n2q_{self.variant}"


@dataclass
class N2QData:
    hu: torch.Tensor  # (N, H, W) int16
    ssim: torch.Tensor  # (N, H, W) float16
    dose: torch.Tensor  # (N,) int64
    records: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hu)


def load_n2q(root: str | Path, split: str, limit: int | None = None) -> N2QData:
    """A split's shards; empty when the split has none (tiny datasets)."""
    from training.datasets.common import load_split

    try:
        t = load_split(root, split)
    except FileNotFoundError:
        return N2QData(
            torch.empty(0, 1, 1, dtype=torch.int16), torch.empty(0, 1, 1), torch.empty(0).long()
        )
    n = len(t["hu"]) if limit is None else min(limit, len(t["hu"]))
    return N2QData(t["hu"][:n], t["ssim"][:n], t["dose_class"][:n].long())


def n2q_inputs(hu: torch.Tensor, cfg: N2QInputConfig, device: torch.device) -> torch.Tensor:
    return prepare_n2q_input(hu.to(device).float(), cfg)


def _augment(
    x: torch.Tensor, y: torch.Tensor, g: torch.Generator, crop: int | None, flips: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same random crop, flip and rotation for inputs (B, C, H, W) and maps (B, 1, H, W)."""
    b, _, h, w = x.shape
    if crop is not None and crop < min(h, w):
        r = torch.randint(0, h - crop + 1, (b,), generator=g).tolist()
        c = torch.randint(0, w - crop + 1, (b,), generator=g).tolist()
        x = torch.stack([x[i, :, r[i] : r[i] + crop, c[i] : c[i] + crop] for i in range(b)])
        y = torch.stack([y[i, :, r[i] : r[i] + crop, c[i] : c[i] + crop] for i in range(b)])
    if not flips:
        return x, y
    k = torch.randint(0, 4, (b,), generator=g).tolist()
    f = torch.randint(0, 2, (b,), generator=g).tolist()
    xs, ys = [], []
    for i in range(b):
        xi, yi = (x[i].flip(-1), y[i].flip(-1)) if f[i] else (x[i], y[i])
        xs.append(torch.rot90(xi, k[i], dims=(-2, -1)))
        ys.append(torch.rot90(yi, k[i], dims=(-2, -1)))
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def predict_n2q_batch(
    model: N2QNet, data: N2QData, *, batch_size: int = 16, amp: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted maps (N, H, W) and dose logits (N, K), float32 on CPU."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    maps, logits = [], []
    for i in range(0, len(data), batch_size):
        x = n2q_inputs(data.hu[i : i + batch_size], model.data_config, device)
        with autocast(device, amp):
            out = model(x)
        maps.append(out.quality_map.float()[:, 0].cpu())
        logits.append(out.dose_logits.float().cpu())
    model.train(was)
    return torch.cat(maps), torch.cat(logits)


def fit_n2q(
    data: str | Path,
    out: str | Path,
    cfg: N2QFitConfig,
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
    manifest = read_manifest(data)
    size = int(manifest["params"]["size"])
    overrides: dict[str, Any] = {}
    if not cfg.highpass:
        overrides["input"] = N2QInputConfig(highpass=False)
    seed_everything(cfg.seed)
    model = create_model(cfg.model_name, **overrides)
    assert isinstance(model, N2QNet)
    model.to(device)
    echo(f"reading {data} ...")
    train = load_n2q(data, "train", cfg.max_train)
    val = load_n2q(data, "val")
    echo(f"train {len(train)}, val {len(val)} slices of {size} px")
    # Start the map at the training targets' mean SSIM (CT maps average ~0.96 here, far
    # from the model's generic 0.5): Adam moves that one bias by ~lr per step, which would
    # spend the short schedule on the offset. Training-time init only (ours).
    with torch.no_grad():
        mean_q = float(train.ssim.float().mean().clamp(-0.99, 0.99)) if len(train) else 0.5
        model.map_head.bias.fill_(math.atanh(mean_q))
    spe = steps_per_epoch(len(train), cfg.batch_size)
    head = {id(p) for p in model.dose_head.parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in head], "lr": cfg.lr},
        {"params": list(model.dose_head.parameters()), "lr": cfg.lr * cfg.dose_lr_mult},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = cosine_schedule(opt, spe * cfg.epochs, round(cfg.warmup_epochs * spe))
    record = {"stage": "n2q", "data": str(data), "overrides": list(overrides)}

    def batches(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        g = epoch_generator(cfg.seed, epoch)
        crop = cfg.crop if epoch < cfg.epochs - cfg.full_epochs else None
        out_b = []
        for idx in epoch_batches(len(train), cfg.batch_size, g):
            out_b.append(
                (idx, torch.tensor(crop or 0), torch.randint(0, 2**31 - 1, (1,), generator=g))
            )
        return out_b

    def step(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n: int) -> dict[str, float]:
        idx, crop_t, aug_seed = batch
        crop = int(crop_t) or None
        x = n2q_inputs(train.hu[idx], model.data_config, torch.device("cpu"))
        y = train.ssim[idx].float()[:, None]
        if cfg.augment or crop:
            g = torch.Generator().manual_seed(int(aug_seed))
            x, y = _augment(x, y, g, crop, cfg.augment)
        with autocast(device, cfg.amp):
            out_m = model(x.to(device))
        loss, parts = model.loss(out_m, N2QTargets(y.to(device), train.dose[idx].to(device)))
        return optimiser_step(opt, loss, parts)

    def validate() -> dict[str, float]:
        if len(val) == 0:
            return {}
        maps, logits = predict_n2q_batch(model, val, amp=cfg.amp)
        mm = map_metrics(maps, val.ssim.float())
        acc = classification(logits.argmax(1), val.dose, model.cfg.num_classes).accuracy
        mse = float(((maps - val.ssim.float()) ** 2).mean())
        ce = float(torch.nn.functional.cross_entropy(logits, val.dose))
        return {
            "val_loss": mse + model.cfg.alpha * ce,
            "val_map_mse": mm.mse,
            "val_map_ssim": mm.ssim,
            "val_map_nrmse": mm.nrmse,
            "val_dose_acc": acc,
        }

    best, best_row = train_to_best(
        run,
        model,
        opt,
        sched,
        (batches, step, validate),
        epochs=cfg.epochs,
        resume=resume,
        monitor="val_map_mse",
        steps_per_epoch=spe,
        best_path=best_path,
        export={"name": cfg.model_name, "training": record, "overrides": overrides},
    )
    assert isinstance(best, N2QNet)
    maps, _ = (
        predict_n2q_batch(best, val, amp=cfg.amp) if len(val) else (torch.empty(0, 1, 1), None)
    )
    scatter_chart(
        {"val": (val.ssim.float().mean(dim=(1, 2)).tolist(), maps.mean(dim=(1, 2)).tolist())},
        root / "pred_vs_true.png",
        title="n2q: mean predicted vs true SSIM per slice (val)",
        xlabel="true mean SSIM",
        ylabel="predicted mean SSIM",
    )
    summary = {"best": best_row, "weights": str(best_path), "overrides": list(overrides)}
    run.finish(summary, cfg.epochs)
    return summary
