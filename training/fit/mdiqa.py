"""MD-IQA training: the paper's three steps (eq. 3-6), and the ablations.

1. ``supervised``: several models on the labelled train split, with different settings
   (seed and Gaussian scales ``taus``; :data:`DEFAULT_MEMBERS`), loss eq. 4.
2. ``pseudo``: the members' distributions averaged on the ``unlabelled`` split
   (:func:`qgate.models.losses_mdiqa.ensemble_pseudo_labels`).
3. ``joint``: L_sup + lambda2 L_pseudo + lambda3(step) L_consistency (eq. 3) against an
   EMA teacher (decay 0.997), lambda3 warmed up.
4. ablations: ``single-scale`` (a member with one tau, same seed and budget as member 0:
   single- vs multi-scale) and ``no-semi`` (member 0 trained on for the joint stage's
   budget with L_sup only, an EMA kept the same way: with vs without semi-supervision).

Layout of ``--out``::

    supervised/member-0/ ...   one run folder per member (see training.fit.common)
    pseudo/pseudo_labels.safetensors, pseudo/summary.json
    joint/
    ablation-single-scale/, ablation-no-semi/
    model.safetensors          the joint model (student or EMA teacher, best on val)
    summary.json

OUR choices where the paper is silent or our budget differs (all in
:class:`MdiqaFitConfig`): AdamW with a cosine schedule (paper: Adam 1e-4, 30 epochs); the
joint student starts from member 0 and the teacher from the same weights (a warm start:
with a few hundred steps an EMA at 0.997 from a random start would not be a teacher yet);
lambda3 crosses lambda2 at 30 % of the joint steps (paper: 400 of ~1300 iterations);
pseudo-labels as ensemble mean scores (``pseudo_target="dist"`` uses the distributions);
the teacher sees its own random flip/rotation of each unlabelled image.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from qgate.models import MDIQA, create_model, load_mdiqa
from qgate.models.losses_mdiqa import (
    MDIQALossConfig,
    ensemble_pseudo_labels,
    joint_loss,
    supervised_loss,
)
from qgate.models.mdiqa import (
    pool_crop_logits,
    predict_argmax,
    predict_soft,
    resolve_data_config,
)
from training.ema import ModelEMA
from training.fit.common import RunDir, autocast, resolve_device, seed_everything
from training.fit.data import (
    MdiqaSplit,
    epoch_batches,
    epoch_generator,
    flip_rot,
    load_mdiqa_split,
    steps_per_epoch,
)
from training.fit.export import save_weights
from training.fit.loop import LoopHooks, cosine_schedule, run_epochs
from training.metrics import correlations
from training.plots import scatter_chart

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MEMBERS",
    "STAGES",
    "MdiqaFitConfig",
    "Member",
    "fit_mdiqa",
    "predict_logits",
]

STAGES = ("supervised", "pseudo", "joint", "single-scale", "no-semi")


@dataclass(frozen=True)
class Member:
    """One supervised ensemble member: its seed and Gaussian scales (None: the default)."""

    seed: int
    taus: tuple[float, ...] | None = None


DEFAULT_MEMBERS: tuple[Member, ...] = (
    Member(0, None),  # the variant's (0.025, 0.05, 0.1)
    Member(1, (0.02, 0.04, 0.08)),
    Member(2, (0.03, 0.06, 0.12)),
)


@dataclass(frozen=True)
class MdiqaFitConfig:
    """Settings of an MD-IQA training run (defaults: ours, sized for 2 CPU cores)."""

    variant: str = "tiny"
    epochs: int = 15  # each supervised member, and the single-scale ablation
    joint_epochs: int = 10  # the joint stage, and its supervised-only control
    batch_size: int = 16  # paper
    unlabelled_batch_size: int = 16
    lr: float = 1e-4  # paper (3e-4 collapsed to a constant prediction at batch 16)
    joint_lr: float = 1e-4  # paper
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    members: tuple[Member, ...] = DEFAULT_MEMBERS
    single_scale_tau: float = 0.05
    ema_decay: float = 0.997  # paper
    lambda3_cross_fraction: float = 0.3
    pseudo_target: Literal["score", "dist"] = "score"
    augment: bool = True
    amp: bool = True
    device: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return f"mdiqa_{self.variant}"


# ------------------------------------------------------------------------ inference
@torch.no_grad()
def predict_logits(
    model: MDIQA, x: torch.Tensor, *, batch_size: int = 64, amp: bool = True
) -> torch.Tensor:
    """(N, K, P) float32 logits on CPU for preprocessed inputs ``x``: (N, C, S, S), one
    input per slice, or (N, n, C, S, S), a slice's crops (:func:`mdiqa_crops`), whose
    distributions are pooled as the worker pools them (:func:`pool_crop_logits`)."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    per = max(1, batch_size // x.shape[1]) if x.ndim == 5 else batch_size
    for i in range(0, len(x), per):
        xb = x[i : i + per].to(device)
        with autocast(device, amp):
            if xb.ndim == 5:
                flat = model(xb.flatten(0, 1)).float()
                out.append(pool_crop_logits(flat.view(*xb.shape[:2], *flat.shape[1:])).cpu())
            else:
                out.append(model(xb).float().cpu())
    model.train(was)
    if not out:
        k, p = model.cfg.num_scales, model.cfg.num_bins
        return torch.empty(0, k, p)
    return torch.cat(out)


def _val_metrics(
    model: MDIQA, data: MdiqaSplit, amp: bool, prefix: str = "val"
) -> dict[str, float]:
    logits = predict_logits(model, data.scored, amp=amp)
    ok = torch.isfinite(data.y)
    if not ok.any():
        return {}
    loss = supervised_loss(logits[ok], data.y[ok], model.cfg).total
    soft = predict_soft(logits, model.cfg.max_score)
    arg = predict_argmax(logits, model.cfg.max_score)
    c = correlations(soft[ok], data.y[ok])
    ca = correlations(arg[ok], data.y[ok])
    return {
        f"{prefix}_loss": float(loss),
        f"{prefix}_plcc": c.plcc,
        f"{prefix}_srocc": c.srocc,
        f"{prefix}_krocc": c.krocc,
        f"{prefix}_overall": c.overall,
        f"{prefix}_overall_argmax": ca.overall,
        f"{prefix}_rmse": float(((soft[ok] - data.y[ok]) ** 2).mean().sqrt()),
    }


def _nan_low(v: float) -> float:
    return v if math.isfinite(v) else -math.inf


# ------------------------------------------------------------------------ one run
@dataclass
class _Unlabelled:
    data: MdiqaSplit
    pseudo: torch.Tensor  # (N,) scores or (N, K, P) distributions


def _run(
    root: Path,
    *,
    cfg: MdiqaFitConfig,
    model: MDIQA,
    train: MdiqaSplit,
    val: MdiqaSplit,
    epochs: int,
    lr: float,
    seed: int,
    resume: bool,
    ema_decay: float | None = None,
    unlabelled: _Unlabelled | None = None,
    desc: str,
    record: dict[str, Any],
) -> Path:
    """Train one model; returns its best weights (``best.safetensors``).

    With ``unlabelled`` the loss is the joint eq. 3 (``ema_decay`` required, the EMA being
    the teacher); without, eq. 4 on the labelled data (with an EMA kept if ``ema_decay``).
    """
    device = resolve_device(cfg.device)
    run = RunDir(root, {"fit": _cfg_doc(cfg), **record, "epochs": epochs, "lr": lr})
    best_path = root / "best.safetensors"
    if run.done and resume and run.finished_epochs() >= epochs:
        log.info("%s finished earlier; skipping", root)
        return best_path
    seed_everything(seed)
    model.to(device)
    ema = ModelEMA(model, ema_decay) if ema_decay is not None else None
    labelled = torch.isfinite(train.y).nonzero().flatten()
    if len(labelled) == 0:
        raise ValueError("no labelled training samples")
    spe = steps_per_epoch(len(labelled), cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    sched = cosine_schedule(opt, spe * epochs, round(cfg.warmup_epochs * spe))
    loss_cfg = MDIQALossConfig(
        lambda3_cross_step=max(1, round(cfg.lambda3_cross_fraction * spe * epochs))
    )
    last_val: dict[str, float] = {}
    chosen = {"which": "student"}

    def batches(epoch: int) -> list[tuple[torch.Tensor, ...]]:
        g = epoch_generator(seed, epoch)
        out = []
        size = model.cfg.img_size
        for idx in epoch_batches(len(labelled), cfg.batch_size, g):
            i = labelled[idx]
            x = train.random_crops(i, g, size)  # the same crop frame as serving
            x = flip_rot(x, g) if cfg.augment else x
            if unlabelled is None:
                out.append((x, train.y[i]))
                continue
            j = torch.randint(0, len(unlabelled.data), (cfg.unlabelled_batch_size,), generator=g)
            xu = unlabelled.data.random_crops(j, g, size)
            xs = flip_rot(xu, g) if cfg.augment else xu
            xt = flip_rot(xu, g) if cfg.augment else xu
            out.append((x, train.y[i], xs, xt, unlabelled.pseudo[j]))
        return out

    def step(batch: tuple[torch.Tensor, ...], n: int) -> dict[str, float]:
        with autocast(device, cfg.amp):
            if unlabelled is None:
                x, y = (t.to(device) for t in batch[:2])
                parts = supervised_loss(model(x), y, model.cfg, loss_cfg)
                loss, info = parts.total, parts.parts
            else:
                x, y, xs, xt, pseudo = (t.to(device) for t in batch)
                logits = model(torch.cat([x, xs]))
                assert ema is not None
                with torch.no_grad():
                    teacher = ema(xt)
                parts = joint_loss(
                    labelled_logits=logits[: len(x)],
                    labels=y,
                    unlabelled_logits=logits[len(x) :],
                    pseudo=pseudo,
                    teacher_logits=teacher,
                    step=n,
                    cfg=model.cfg,
                    loss_cfg=loss_cfg,
                )
                loss, info = parts.total, parts.parts
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        return {"loss": float(loss.detach()), **info}

    def validate() -> dict[str, float]:
        last_val.clear()
        last_val.update(_val_metrics(model, val, cfg.amp))
        if ema is not None:
            last_val.update(_val_metrics(ema.module, val, cfg.amp, prefix="val_ema"))
        return dict(last_val)

    def score(row: dict[str, float]) -> float:
        s = _nan_low(row.get("val_overall", math.nan))
        if ema is not None:
            s = max(s, _nan_low(row.get("val_ema_overall", math.nan)))
        return s

    def on_best() -> None:
        use_ema = ema is not None and _nan_low(
            last_val.get("val_ema_overall", math.nan)
        ) >= _nan_low(last_val.get("val_overall", math.nan))
        chosen["which"] = "ema" if use_ema else "student"
        best = ema.module if use_ema and ema is not None else model
        save_weights(
            best, best_path, name=cfg.model_name, training={**record, "selected": chosen["which"]}
        )

    hooks = LoopHooks(
        batches=batches,
        step=step,
        validate=validate,
        score=score,
        on_best=on_best,
        steps_per_epoch=spe,
        after_step=(lambda: ema.update(model)) if ema is not None else None,
    )
    state = run_epochs(
        run,
        model=model,
        optimizer=opt,
        scheduler=sched,
        epochs=epochs,
        hooks=hooks,
        resume=resume,
        ema=ema,
        desc=desc,
    )
    best = load_mdiqa(best_path, device=device)
    val_logits = predict_logits(best, val.scored, amp=cfg.amp)
    soft = predict_soft(val_logits, best.cfg.max_score)
    ok = torch.isfinite(val.y)
    scatter_chart(
        {"val": (val.y[ok].tolist(), soft[ok].tolist())},
        root / "pred_vs_true.png",
        title=f"{root.name}: predicted vs proxy score (val)",
        xlabel="label",
        ylabel="predicted (soft read-out)",
    )
    best_row = max(state.history, key=score) if state.history else {}
    run.finish({"best": best_row, "selected": chosen["which"], "weights": str(best_path)}, epochs)
    return best_path


def _cfg_doc(cfg: MdiqaFitConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg), default=str))


# ------------------------------------------------------------------------ pipeline
def fit_mdiqa(
    data: str | Path,
    out: str | Path,
    cfg: MdiqaFitConfig,
    *,
    stages: tuple[str, ...] = STAGES,
    resume: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the requested ``stages`` of the MD-IQA pipeline; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bad = set(stages) - set(STAGES)
    if bad:
        raise ValueError(f"unknown stages {sorted(bad)}; choose from {STAGES}")
    probe = create_model(cfg.model_name, **cfg.model_overrides)
    assert isinstance(probe, MDIQA)
    data_cfg = resolve_data_config(probe)
    echo(f"reading {data} ...")
    train = load_mdiqa_split(data, "train", data_cfg)
    val = load_mdiqa_split(data, "val", data_cfg)
    unl = load_mdiqa_split(data, "unlabelled", data_cfg)
    echo(f"train {len(train)} labelled, unlabelled {len(unl)}, val {len(val)}")
    summary_path = out / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["config"] = _cfg_doc(cfg)
    summary["data"] = str(data)
    member_paths = [
        out / "supervised" / f"member-{i}" / "best.safetensors" for i in range(len(cfg.members))
    ]

    def model_for(member: Member) -> MDIQA:
        ov = dict(cfg.model_overrides)
        if member.taus is not None:
            ov["taus"] = member.taus
        torch.manual_seed(member.seed)
        m = create_model(cfg.model_name, **ov)
        assert isinstance(m, MDIQA)
        return m

    if "supervised" in stages:
        for i, member in enumerate(cfg.members):
            taus = member.taus or "default"
            echo(f"step 1: supervised member {i} (seed {member.seed}, taus {taus})")
            _run(
                out / "supervised" / f"member-{i}",
                cfg=cfg,
                model=model_for(member),
                train=train,
                val=val,
                epochs=cfg.epochs,
                lr=cfg.lr,
                seed=cfg.seed + member.seed,
                resume=resume,
                desc=f"member {i}",
                record={"stage": "supervised", "member": asdict(member)},
            )
        summary["supervised"] = [_best(p.parent) for p in member_paths]

    pseudo_path = out / "pseudo" / "pseudo_labels.safetensors"
    if "pseudo" in stages:
        echo("step 2: ensemble pseudo-labels on the unlabelled split")
        summary["pseudo"] = _make_pseudo(member_paths, unl, pseudo_path, cfg)

    if "joint" in stages:
        echo("step 3: joint training against the EMA teacher")
        if not pseudo_path.exists():
            raise FileNotFoundError(f"{pseudo_path} missing: run --stage pseudo first")
        from safetensors.torch import load_file

        pl = load_file(str(pseudo_path))
        pseudo = pl["scores"] if cfg.pseudo_target == "score" else pl["dists"]
        student = load_mdiqa(member_paths[0])
        _run(
            out / "joint",
            cfg=cfg,
            model=student,
            train=train,
            val=val,
            epochs=cfg.joint_epochs,
            lr=cfg.joint_lr,
            seed=cfg.seed + 100,
            resume=resume,
            ema_decay=cfg.ema_decay,
            unlabelled=_Unlabelled(unl, pseudo),
            desc="joint",
            record={"stage": "joint", "init": str(member_paths[0])},
        )
        shutil.copyfile(out / "joint" / "best.safetensors", out / "model.safetensors")
        summary["joint"] = _best(out / "joint")

    if "single-scale" in stages:
        echo("ablation: single-scale (one tau), same seed and budget as member 0")
        single = replace(cfg.members[0], taus=(cfg.single_scale_tau,))
        _run(
            out / "ablation-single-scale",
            cfg=cfg,
            model=model_for(single),
            train=train,
            val=val,
            epochs=cfg.epochs,
            lr=cfg.lr,
            seed=cfg.seed + single.seed,
            resume=resume,
            desc="single-scale",
            record={"stage": "ablation-single-scale", "member": asdict(single)},
        )
        summary.setdefault("ablations", {})["single_scale"] = _best(out / "ablation-single-scale")
    if "no-semi" in stages:
        echo("ablation: no semi-supervision (member 0 trained on with L_sup only, EMA kept)")
        if not (member_paths[0].parent / "done.json").exists():
            raise FileNotFoundError("supervised member 0 has not finished: run it first")
        _run(
            out / "ablation-no-semi",
            cfg=cfg,
            model=load_mdiqa(member_paths[0]),
            train=train,
            val=val,
            epochs=cfg.joint_epochs,
            lr=cfg.joint_lr,
            seed=cfg.seed + 100,
            resume=resume,
            ema_decay=cfg.ema_decay,
            desc="no-semi",
            record={"stage": "ablation-no-semi", "init": str(member_paths[0])},
        )
        summary.setdefault("ablations", {})["no_semi"] = _best(out / "ablation-no-semi")
    summary_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def _best(run_root: Path) -> dict[str, Any]:
    done = run_root / "done.json"
    return json.loads(done.read_text()) if done.exists() else {}


@torch.no_grad()
def _make_pseudo(
    member_paths: list[Path], unl: MdiqaSplit, path: Path, cfg: MdiqaFitConfig
) -> dict[str, Any]:
    from safetensors.torch import save_file

    device = resolve_device(cfg.device)
    missing = [str(p) for p in member_paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"supervised members missing: {missing}; run --stage supervised")
    if len(unl) == 0:
        raise ValueError("the dataset has no unlabelled split (build with --unlabelled 0.3)")
    logits = [
        predict_logits(load_mdiqa(p, device=device), unl.scored, amp=cfg.amp) for p in member_paths
    ]
    scores, dists = ensemble_pseudo_labels(logits)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"scores": scores.contiguous(), "dists": dists.contiguous()},
        str(path),
        metadata={"names": json.dumps(unl.names)},
    )
    # Diagnostic only: the builder kept the proxy scores of the unlabelled samples.
    doc: dict[str, Any] = {"n": len(unl), "members": [str(p) for p in member_paths]}
    if torch.isfinite(unl.proxy).any():
        doc["vs_hidden_proxy"] = correlations(scores, unl.proxy).as_dict()
        doc["members_vs_hidden_proxy"] = [
            correlations(predict_soft(lg), unl.proxy).as_dict() for lg in logits
        ]
    (path.parent / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc
