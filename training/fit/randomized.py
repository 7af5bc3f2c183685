"""Fine-tune MD-IQA and Noise2Quality on the domain-randomised data (issue 10).

Both start from the previous shipped weights (our own, trained from scratch by the recipes
in the model cards) and learn the labels of :mod:`training.datasets.randomized`:

* **Noise2Quality**: the SSIM map against the noiseless same-kernel reconstruction, clipped
  to [0, 1] (SSIM's meaningful range for users), and the dose class of the *effective*
  dose (dose fraction x tube output) on the levels 5/10/25/50/100 % of routine: dose as
  noise relative to what the kernel and the patient would give at routine dose;
* **MD-IQA**: ``4 x`` the mean of that SSIM map over the crop, unrounded (the previous
  proxy ``4 F^1.94`` rounded to 0.2 made every image above ~35 HU a 0 and below ~4 HU a
  4). The model scores a slice on a grid of crops over the whole slice
  (``crop_mode="grid"``), so its score estimates 4 x the slice's mean SSIM.

Training crops are random ``img`` x ``img`` windows of the stored 160 x 160 crops, with
flips and 90-degree rotations; the label is computed on the window actually seen.
Validation: the ``val`` blocks (the top slices of every training volume, never trained
on); the best step by validation Spearman (MD-IQA) or map MSE (N2Q) is kept.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

DOSE_LEVELS = (5, 10, 25, 50, 100)


@dataclass(frozen=True)
class DRFitConfig:
    family: str  # "mdiqa" or "n2q"
    steps: int = 1500
    batch: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup: int = 50
    crop: int = 128
    # several context sizes (a size drawn per step; the InstanceNorms then see the
    # statistics of several window sizes); empty: ``crop`` only
    crops: tuple[int, ...] = ()
    seed: int = 0
    val_every: int = 100
    time_budget_s: float | None = None
    threads: int = 1
    init: str | None = None  # weights to start from; None: the shipped file
    # N2Q only: train the dose head alone (everything else frozen, in eval mode), with
    # cross-entropy; the map loss's 0.01 weight on the dose term (paper) leaves the head
    # far behind the map in a short fine-tune. Kept: the step with the best val accuracy.
    dose_only: bool = False
    # which validation row is kept: "auto" = Spearman for MD-IQA, map RMSE for N2Q (dose
    # accuracy with dose_only); "rmse" keeps MD-IQA's best score RMSE instead (the val
    # crops' Spearman saturates and moves by noise once the order is mostly right)
    # "pairs": the best share of validation pairs (one place at two qualities, ``paired``
    # blocks) in the labels' order, i.e. the ladders of the training simulator
    select: Literal["auto", "rmse", "pairs"] = "auto"
    # sample crops with weight count(label bin) ** -balance (20 bins of the crop's mean
    # SSIM): 0 = uniform; 0.5 draws rare low-quality crops (heavy streaks, 2 % dose with a
    # sharp kernel) several times more often, so the score does not flatten at that end
    balance: float = 0.0
    # weight of a pairwise ranking loss on the score (MD-IQA) or mean map (N2Q): half of
    # each batch is pairs of one crop at two qualities (``paired`` blocks: other doses or
    # view steps of the same acquisition), pushed apart by at least half their label
    # difference, so a fine-tune cannot flatten a ladder the labels order. 0: off.
    rank: float = 0.0
    # add the local-std input channel (N2QInputConfig.local_std, MDIQAConfig.local_std) to
    # a model that lacks it; its first-conv weights start at zero: step 0 is the old model
    local_std: bool = False
    # N2Q only: the map loss (N2QConfig.map_loss; None keeps the starting weights' own,
    # the paper's MSE): "l1" as the public notebook trained it
    map_loss: Literal["mse", "l1"] | None = None


def dose_class(eff_dose: torch.Tensor, levels: Sequence[int] = DOSE_LEVELS) -> torch.Tensor:
    """Nearest level in log dose: effective dose (fraction of the simulator's photon
    budget) -> class index of the levels, which are percent of routine dose
    (:data:`~training.datasets.randomized.ROUTINE_EFF`)."""
    from training.datasets.randomized import ROUTINE_EFF

    lv = torch.log(torch.tensor(levels, dtype=torch.float32) / 100.0)
    d = torch.log((eff_dose.float() / ROUTINE_EFF).clamp(1e-3, 10.0))
    return (d[:, None] - lv[None]).abs().argmin(dim=1)


def _windows(
    hu: torch.Tensor, ssim: torch.Tensor, size: int, g: torch.Generator, tied: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows with flips and rotations; the first ``2 * tied`` samples are pairs
    (0, 1), (2, 3), ... that share one window and one transform."""
    b, h, w = hu.shape
    r = torch.randint(0, h - size + 1, (b,), generator=g).tolist()
    c = torch.randint(0, w - size + 1, (b,), generator=g).tolist()
    k = torch.randint(0, 4, (b,), generator=g).tolist()
    f = torch.randint(0, 2, (b,), generator=g).tolist()
    for i in range(1, 2 * tied, 2):
        r[i], c[i], k[i], f[i] = r[i - 1], c[i - 1], k[i - 1], f[i - 1]
    xs, ys = [], []
    for i in range(b):
        x = hu[i, r[i] : r[i] + size, c[i] : c[i] + size].float()
        y = ssim[i, r[i] : r[i] + size, c[i] : c[i] + size].float()
        if f[i]:
            x, y = x.flip(-1), y.flip(-1)
        xs.append(torch.rot90(x, k[i]))
        ys.append(torch.rot90(y, k[i]))
    return torch.stack(xs), torch.stack(ys).clamp(0.0, 1.0)


def _crop_means(ssim: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per crop, in chunks (the stored maps are float16)."""
    return torch.cat([ssim[i : i + 512].float().mean(dim=(1, 2)) for i in range(0, len(ssim), 512)])


def label_balance(ssim: torch.Tensor, power: float, bins: int = 20) -> torch.Tensor | None:
    """Sampling weights count(bin) ** -power over the crops' mean SSIM (None: uniform)."""
    if power <= 0:
        return None
    mean = _crop_means(ssim)
    b = (mean.clamp(0, 1) * bins).long().clamp(max=bins - 1)
    counts = torch.bincount(b, minlength=bins).float()
    return counts[b] ** -power


def rank_pairs(data: dict[str, torch.Tensor], min_gap: float = 0.02) -> torch.Tensor:
    """(P, 2) indices of crops of one place (same block and ``group``) whose stored mean
    SSIM differs by at least ``min_gap``; empty where no block is ``paired``."""
    group = data.get("group")
    if group is None or not bool((group >= 0).any()):
        return torch.zeros((0, 2), dtype=torch.long)
    mean = _crop_means(data["ssim"])
    idx = torch.nonzero(group >= 0)[:, 0]
    key = data["block"][idx].long() * 10_000 + group[idx].long()
    perm = torch.argsort(key, stable=True)
    order = idx[perm]
    _, counts = torch.unique_consecutive(key[perm], return_counts=True)
    pairs = []
    for members in torch.split(order, counts.tolist()):
        if len(members) > 1:
            a, b = torch.triu_indices(len(members), len(members), 1)
            pa, pb = members[a], members[b]
            keep = (mean[pa] - mean[pb]).abs() >= min_gap
            pairs.append(torch.stack([pa[keep], pb[keep]], dim=1))
    return torch.cat(pairs) if pairs else torch.zeros((0, 2), dtype=torch.long)


def rank_loss(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Hinge on consecutive pairs (0, 1), (2, 3), ...: the better-labelled one must score
    higher by at least half the label difference."""
    pa, pb = pred[0::2], pred[1::2]
    ya, yb = label[0::2], label[1::2]
    sign = torch.sign(ya - yb)
    return torch.relu(0.5 * (ya - yb).abs() - sign * (pa - pb)).mean()


def _centre(t: torch.Tensor, size: int) -> torch.Tensor:
    h, w = t.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return t[..., top : top + size, left : left + size]


def load_data(roots: Sequence[str | Path], split: str) -> dict[str, torch.Tensor]:
    from training.datasets.randomized import load_blocks

    parts = []
    for r, root in enumerate(roots):
        try:
            part = load_blocks(root, split)
        except FileNotFoundError:
            continue
        part["block"] = part["block"] + 100_000 * r  # block ids unique across roots
        parts.append(part)
    if not parts:
        raise FileNotFoundError(f"no {split} data under {list(roots)}")
    keys = [k for k in parts[0] if k != "metas"]
    return {k: torch.cat([p[k] for p in parts]) for k in keys}


def initial_model(cfg: DRFitConfig) -> torch.nn.Module:
    from qgate.models import create_model
    from qgate.score.scorers.learned import default_weights_path, load_model

    path = Path(cfg.init) if cfg.init else default_weights_path(cfg.family)
    base = load_model(cfg.family, path)  # type: ignore[arg-type]
    if cfg.family == "mdiqa":
        # the grid tiles the whole slice (4 x 128 px per axis covers 512): the score then
        # estimates the slice SSIM that is the label, not that of 56 % of it (3 x 3)
        grid = replace(base.cfg, crop_mode="grid", grid_per_axis=4)  # type: ignore[arg-type]
        if not cfg.local_std or base.cfg.local_std:  # type: ignore[union-attr]
            base.cfg = grid  # type: ignore[union-attr]
            return base
        from qgate.models.mdiqa import MDIQA

        if base.cfg.in_chans != 2:  # type: ignore[union-attr]
            raise ValueError("--local-std widens a two-window MD-IQA (in_chans=2)")
        model = MDIQA(replace(grid, in_chans=3, local_std=True))
        # [wide, soft] -> [wide, local std, soft]: the soft window stays last (noise_stats)
        model.load_state_dict(_widened(base.state_dict(), model.state_dict(), at=1))
        return model
    # served as windows of the training crop size (round 4; N2QInputConfig.tile)
    serve = replace(base.cfg.input, tile=cfg.crop, tile_stride=cfg.crop * 3 // 4)
    if cfg.local_std:
        serve = replace(serve, local_std=True)
    model = create_model("n2q_tiny", widths=base.cfg.widths, dose_levels=DOSE_LEVELS, input=serve)
    model.load_state_dict(_widened(base.state_dict(), model.state_dict(), at=None))
    if cfg.map_loss is not None:
        model.cfg = replace(model.cfg, map_loss=cfg.map_loss)
    return model


def _widened(
    state: dict[str, torch.Tensor], like: dict[str, torch.Tensor], *, at: int | None
) -> dict[str, torch.Tensor]:
    """``state`` with each first conv that gained input channels in ``like`` given zero
    weights for them, inserted at channel ``at`` (``None``: appended), so the widened
    model computes what the old one did until training moves them."""
    out = dict(state)
    for key, w in like.items():
        old = out[key]
        if old.shape == w.shape:
            continue
        extra = w.shape[1] - old.shape[1] if old.ndim == 4 else 0
        if extra <= 0 or old.shape[0] != w.shape[0] or old.shape[2:] != w.shape[2:]:
            raise ValueError(f"{key}: cannot widen {tuple(old.shape)} to {tuple(w.shape)}")
        i = old.shape[1] if at is None else at
        zeros = old.new_zeros((old.shape[0], extra, *old.shape[2:]))
        out[key] = torch.cat([old[:, :i], zeros, old[:, i:]], dim=1)
    return out


def fit_dr(
    roots: Sequence[str | Path],
    out: str | Path,
    cfg: DRFitConfig,
    *,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    from scipy.stats import spearmanr

    from qgate.models.losses_mdiqa import supervised_loss
    from qgate.models.mdiqa import mdiqa_channels, predict_soft, resolve_data_config
    from qgate.models.n2q import N2QTargets
    from qgate.models.preprocess import prepare_n2q_input
    from training.fit.export import save_weights

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = load_data(roots, "train")
    try:
        val = load_data(roots, "val")
    except FileNotFoundError:  # a tiny build drew no val block: hold out the last block
        last = train["block"] == train["block"].max()
        val = {k: v[last] for k, v in train.items()}
        train = {k: v[~last] for k, v in train.items()} if (~last).any() else train
    echo(f"{cfg.family}: train {len(train['hu'])} crops, val {len(val['hu'])} crops")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = initial_model(cfg).to(device)
    model.train()
    params = list(model.parameters())
    if cfg.dose_only:
        if cfg.family != "n2q":
            raise ValueError("dose_only is for n2q")
        for p in params:
            p.requires_grad_(False)
        params = list(model.dose_head.parameters())  # type: ignore[union-attr]
        for p in params:
            p.requires_grad_(True)
        model.eval()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(cfg.seed)
    is_md = cfg.family == "mdiqa"
    data_cfg = resolve_data_config(model) if is_md else None

    def inputs(hu: torch.Tensor) -> torch.Tensor:
        hu = hu.to(device)
        if is_md:
            assert data_cfg is not None
            return mdiqa_channels(hu, data_cfg)
        return prepare_n2q_input(hu, model.data_config)  # type: ignore[union-attr]

    vx = _centre(val["hu"], cfg.crop)
    vy = _centre(val["ssim"], cfg.crop).float().clamp(0, 1)
    vd = dose_class(val["eff_dose"])
    vpairs = rank_pairs({**val, "ssim": vy})
    if cfg.select == "pairs" and not len(vpairs):
        raise ValueError("select='pairs' needs paired validation blocks")

    @torch.no_grad()
    def validate() -> dict[str, float]:
        model.eval()
        preds, dose = [], []
        for i in range(0, len(vx), 64):
            x = inputs(vx[i : i + 64].float())
            if is_md:
                preds.append(predict_soft(model(x)).float().cpu())
            else:
                o = model(x)
                preds.append(o.quality_map.float()[:, 0].clamp(0, 1).mean(dim=(1, 2)).cpu())
                dose.append(o.dose_logits.float().argmax(1).cpu())
        if not cfg.dose_only:
            model.train()
        p = torch.cat(preds).numpy()
        truth = vy.mean(dim=(1, 2)).numpy() * (4.0 if is_md else 1.0)
        row = {
            "val_spearman": float(spearmanr(p, truth).statistic),
            "val_rmse": float(np.sqrt(np.mean((p - truth) ** 2))),
        }
        if len(vpairs):
            a, b = vpairs[:, 0].numpy(), vpairs[:, 1].numpy()
            row["val_pairs"] = float(np.mean(np.sign(p[a] - p[b]) == np.sign(truth[a] - truth[b])))
        if dose:
            pred_d = torch.cat(dose)
            row["val_dose_acc"] = float((pred_d == vd).float().mean())
            row["val_dose_within1"] = float(((pred_d - vd).abs() <= 1).float().mean())
        return row

    def save(path: Path, row: dict[str, float]) -> None:
        model.cpu()
        save_weights(
            model,
            path,
            name="mdiqa_tiny" if is_md else "n2q_tiny",
            training={
                "recipe": "training.fit.randomized",
                **asdict(cfg),
                "roots": [str(r) for r in roots],
                "row": row,  # the validation row of the step saved
            },
            overrides=None
            if is_md
            else {"dose_levels": list(DOSE_LEVELS), "input": model.cfg.input},
        )
        model.to(device)

    history: list[dict[str, float]] = []
    best = {"val_spearman": -2.0, "val_rmse": math.inf, "step": -1}
    t0 = time.time()
    row = validate()
    echo(f"start: {row}")
    history.append({"step": 0, **row})
    n = len(train["hu"])
    weights = label_balance(train["ssim"], cfg.balance)
    pairs = rank_pairs(train) if cfg.rank > 0 else torch.zeros((0, 2), dtype=torch.long)
    if cfg.rank > 0:
        if not len(pairs):
            raise ValueError("rank > 0 needs paired blocks (build-randomized --paired)")
        echo(f"ranking: {len(pairs)} pairs")
    tied = cfg.batch // 4 if len(pairs) else 0  # pairs in a batch: half of its crops
    running = 0.0
    for step in range(1, cfg.steps + 1):
        rest = cfg.batch - 2 * tied
        if weights is None:
            idx = torch.randint(0, n, (rest,), generator=g)
        else:
            idx = torch.multinomial(weights, rest, replacement=True, generator=g)
        if tied:
            chosen = pairs[torch.randint(0, len(pairs), (tied,), generator=g)]
            idx = torch.cat([chosen.reshape(-1), idx])
        size = cfg.crop
        if cfg.crops:
            size = cfg.crops[int(torch.randint(0, len(cfg.crops), (), generator=g))]
        hu, y = _windows(train["hu"][idx], train["ssim"][idx], size, g, tied)
        x = inputs(hu)
        if is_md:
            logits = model(x)
            target = 4.0 * y.mean(dim=(1, 2)).to(device)
            loss = supervised_loss(logits, target, model.cfg).total
            if tied:
                pred = predict_soft(logits[: 2 * tied])
                loss = loss + cfg.rank * rank_loss(pred, target[: 2 * tied])
        elif cfg.dose_only:
            target = dose_class(train["eff_dose"][idx]).to(device)
            loss = torch.nn.functional.cross_entropy(model(x).dose_logits.float(), target)
        else:
            tgt = N2QTargets(y[:, None].to(device), dose_class(train["eff_dose"][idx]).to(device))
            out_ = model(x)
            loss, _ = model.loss(out_, tgt)  # type: ignore[operator]
            if tied:
                qmap = out_.quality_map.float()[: 2 * tied, 0].clamp(0, 1)
                label = y[: 2 * tied].to(device).mean(dim=(1, 2))
                loss = loss + cfg.rank * rank_loss(qmap.mean(dim=(1, 2)), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        sched.step()
        lv = float(loss.detach())
        running = 0.95 * running + 0.05 * lv if step > 1 else lv
        done = cfg.time_budget_s is not None and time.time() - t0 > cfg.time_budget_s
        if step % cfg.val_every == 0 or step == cfg.steps or done:
            row = {"step": step, "loss": running, "seconds": time.time() - t0, **validate()}
            history.append(row)
            echo(json.dumps(row))
            if cfg.select == "pairs":
                better = row["val_pairs"] > best.get("val_pairs", -1.0)
            elif is_md and cfg.select != "rmse":
                better = row["val_spearman"] > best["val_spearman"]
            elif cfg.dose_only:
                better = row["val_dose_acc"] > best.get("val_dose_acc", -1.0)
            else:  # N2Q, or MD-IQA with select="rmse"
                better = row["val_rmse"] < best["val_rmse"]
            if better:
                best = dict(row)
                save(out / f"{cfg.family}.safetensors", best)
            # the latest step too: the validation rows rank crops, not ladders, so the
            # evaluation may want a later step than the one kept
            save(out / f"{cfg.family}_last.safetensors", row)
            (out / f"{cfg.family}_history.json").write_text(json.dumps(history, indent=1))
        if done:
            break
    summary = {"best": best, "steps": step, "seconds": time.time() - t0}
    (out / f"{cfg.family}_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="fine-tune on domain-randomised data")
    ap.add_argument("family", choices=["mdiqa", "n2q"])
    ap.add_argument("out")
    ap.add_argument("--data", nargs="+", default=[".cache/data/dr1"])
    ap.add_argument("--steps", type=int, default=DRFitConfig.steps)
    ap.add_argument("--batch", type=int, default=DRFitConfig.batch)
    ap.add_argument("--lr", type=float, default=DRFitConfig.lr)
    ap.add_argument("--budget", type=float, default=None, help="seconds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init", default=None)
    ap.add_argument("--dose-only", action="store_true")
    ap.add_argument("--rank", type=float, default=0.0)
    a = ap.parse_args(argv)
    cfg = DRFitConfig(
        a.family,
        steps=a.steps,
        batch=a.batch,
        lr=a.lr,
        time_budget_s=a.budget,
        threads=a.threads,
        init=a.init,
        dose_only=a.dose_only,
        rank=a.rank,
    )
    print(json.dumps(fit_dr(a.data, a.out, cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
