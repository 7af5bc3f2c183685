"""``qgate-train fit``, ``qgate-train evaluate`` and ``qgate-train eval-ldctiqa``.

Attach them to the ``qgate-train`` group (training/cli.py)::

    from training.commands import eval_ldctiqa, evaluate, fit

    main.add_command(fit)
    main.add_command(evaluate)
    main.add_command(eval_ldctiqa)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from qgate.core.families import FAMILIES

__all__ = ["eval_ldctiqa", "evaluate", "fit"]

#: The ``--model`` choices: each family's train task (qgate.core.families).
MODELS = tuple(f.train_task for f in FAMILIES)


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


@click.command("fit")
@click.option("--model", "model", type=click.Choice(MODELS), required=True)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False),
    required=True,
    help="A dataset built by `qgate-train data build --task ...`.",
)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run folder.")
@click.option("--device", default=None, help="cuda or cpu (default: cuda when present).")
@click.option("--epochs", type=int, default=None, help="Epochs (MD-IQA: of each supervised run).")
@click.option("--variant", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True)
@click.option("--resume", is_flag=True, help="Continue the runs in --out from their checkpoints.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--no-amp", is_flag=True, help="No bf16 autocast on CUDA.")
@click.option(
    "--stage",
    "stages",
    multiple=True,
    type=click.Choice(
        ["supervised", "pseudo", "joint", "single-scale", "no-semi", "ablations", "all"]
    ),
    help="MD-IQA: pipeline steps to run (repeatable; default all).",
)
@click.option("--joint-epochs", type=int, default=None, help="MD-IQA: epochs of step 3.")
@click.option("--joint-lr", type=float, default=None, help="MD-IQA: learning rate of step 3.")
@click.option("--members", type=int, default=None, help="MD-IQA: supervised members (<= 3).")
@click.option(
    "--hu-window",
    type=float,
    nargs=2,
    default=None,
    help="MD-IQA: input HU window LO HI (default: the variant's, -1000 400).",
)
@click.option(
    "--noise-stats/--no-noise-stats",
    default=None,
    help="MD-IQA: the native-scale texture statistics path (default: the variant's).",
)
@click.option("--crop", type=int, default=None, help="N2Q: training crop (0: whole slices).")
@click.option("--full-epochs", type=int, default=None, help="N2Q: last epochs on whole slices.")
@click.option("--no-hpf", is_flag=True, help="N2Q: image channel only (the ablation).")
@click.option("--max-train", type=int, default=None, help="N2Q: use at most N training slices.")
@click.option(
    "--export",
    "export",
    type=click.Path(dir_okay=False),
    default=None,
    help="Copy the final weights here (e.g. qgate/weights/n2q.safetensors).",
)
def fit(
    model: str,
    data: str,
    out: str,
    device: str | None,
    epochs: int | None,
    variant: str,
    resume: bool,
    seed: int,
    batch_size: int | None,
    lr: float | None,
    threads: int | None,
    no_amp: bool,
    stages: tuple[str, ...],
    joint_epochs: int | None,
    joint_lr: float | None,
    members: int | None,
    hu_window: tuple[float, float] | None,
    noise_stats: bool | None,
    crop: int | None,
    full_epochs: int | None,
    no_hpf: bool,
    max_train: int | None,
    export: str | None,
) -> None:
    """Train one model on a built dataset, with checkpoints, metrics and plots in --out."""
    from dataclasses import replace

    from training.fit.common import resolve_device, set_threads

    set_threads(threads)
    try:
        resolve_device(device)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    common: dict[str, object] = {
        "variant": variant,
        "seed": seed,
        "device": device,
        "amp": not no_amp,
    }
    for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)):
        if v is not None:
            common[k] = v
    try:
        if model == "mdiqa":
            from training.fit.mdiqa import STAGES, MdiqaFitConfig, fit_mdiqa

            cfg = replace(MdiqaFitConfig(), **common)
            if joint_epochs is not None:
                cfg = replace(cfg, joint_epochs=joint_epochs)
            if joint_lr is not None:
                cfg = replace(cfg, joint_lr=joint_lr)
            overrides: dict[str, object] = {}
            if hu_window is not None:
                overrides["hu_window"] = tuple(hu_window)
            if noise_stats is not None:
                overrides["noise_stats"] = noise_stats
            if overrides:
                cfg = replace(cfg, model_overrides=overrides)
            if members is not None:
                if not 1 <= members <= len(cfg.members):
                    raise click.BadParameter(f"1 to {len(cfg.members)}", param_hint="--members")
                cfg = replace(cfg, members=cfg.members[:members])
            wanted = set(stages) | ({"single-scale", "no-semi"} if "ablations" in stages else set())
            chosen = (
                STAGES if not stages or "all" in stages else tuple(s for s in STAGES if s in wanted)
            )
            summary = fit_mdiqa(data, out, cfg, stages=chosen, resume=resume, echo=_echo)
            final = Path(out) / "model.safetensors"
        elif model == "n2q":
            from training.fit.n2q import N2QFitConfig, fit_n2q

            n_cfg = replace(N2QFitConfig(), **common, highpass=not no_hpf, max_train=max_train)
            if crop is not None:
                n_cfg = replace(n_cfg, crop=crop or None)
            if full_epochs is not None:
                n_cfg = replace(n_cfg, full_epochs=full_epochs)
            summary = fit_n2q(data, out, n_cfg, resume=resume, echo=_echo)
            final = Path(out) / "best.safetensors"
        else:
            from training.fit.chest import ChestFitConfig, fit_chest

            c_cfg = replace(ChestFitConfig(), **common)
            summary = fit_chest(data, out, c_cfg, resume=resume, echo=_echo)
            final = Path(out) / "best.safetensors"
    except (FileExistsError, FileNotFoundError, ValueError, KeyError) as e:
        raise click.ClickException(str(e)) from None
    if export:
        if not final.exists():
            raise click.ClickException(f"{final} was not produced; nothing to export")
        Path(export).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(final, export)
        _echo(f"exported {final} -> {export}")
    click.echo(json.dumps(summary, indent=1, default=str))


@click.command("evaluate")
@click.option(
    "--model", "model", type=click.Choice([*MODELS, "all"]), default="all", show_default=True
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Weights to evaluate (default: the shipped qgate/weights/<model>.safetensors).",
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="The model's dataset (with --model mdiqa|n2q|chest).",
)
@click.option("--mdiqa-data", type=click.Path(exists=True, file_okay=False), default=None)
@click.option("--n2q-data", type=click.Path(exists=True, file_okay=False), default=None)
@click.option("--chest-data", type=click.Path(exists=True, file_okay=False), default=None)
@click.option(
    "--runs",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Folder with the training runs (mdiqa/, n2q/, n2q-nohpf/, chest/) for the "
    "ablations and the training curves.",
)
@click.option("--split", default="test", show_default=True)
@click.option(
    "--ladder/--no-ladder",
    default=True,
    show_default=True,
    help="Dose and sparse-view monotonicity ladders on held-out anatomy.",
)
@click.option(
    "--ladder-size",
    type=int,
    multiple=True,
    default=(512,),
    show_default=True,
    help="Ladder matrix size (repeatable: 512 is the service's grid, 256 the training grid).",
)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Report folder.")
@click.option(
    "--notes",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Markdown to put under the report's title (recipe, compute budget).",
)
@click.option("--device", default=None)
@click.option("--threads", type=int, default=None)
def evaluate(
    model: str,
    weights: str | None,
    data: str | None,
    mdiqa_data: str | None,
    n2q_data: str | None,
    chest_data: str | None,
    runs: str | None,
    split: str,
    ladder: bool,
    ladder_size: tuple[int, ...],
    out: str,
    notes: str | None,
    device: str | None,
    threads: int | None,
) -> None:
    """Evaluate on the held-out, patient-disjoint split; write a Markdown report with plots."""
    from training.evaluate import EvalPlan, run_evaluation
    from training.fit.common import set_threads

    set_threads(threads)
    paths = {"mdiqa": mdiqa_data, "n2q": n2q_data, "chest": chest_data}
    if model != "all":
        if data is not None:
            paths[model] = data
        paths = {k: (v if k == model else None) for k, v in paths.items()}
    elif data is not None:
        raise click.BadParameter("use --mdiqa-data/--n2q-data/--chest-data with --model all")
    if not any(paths.values()):
        raise click.UsageError("no dataset given (--data or --<model>-data)")
    plan = EvalPlan(
        data={k: Path(v) for k, v in paths.items() if v},
        weights={model: Path(weights)} if weights and model != "all" else {},
        runs=Path(runs) if runs else None,
        split=split,
        ladder=ladder,
        ladder_size=tuple(ladder_size),
        device=device,
        notes=Path(notes) if notes else None,
    )
    try:
        report = run_evaluation(plan, Path(out), echo=_echo)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(str(report))


@click.command("eval-ldctiqa")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="MD-IQA weights (default: the shipped qgate/weights/mdiqa.safetensors).",
)
@click.option("--readout", type=click.Choice(["soft", "argmax"]), default="soft", show_default=True)
@click.option("--device", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--predictions",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write file name -> predicted score as JSON here.",
)
def eval_ldctiqa(
    path: str,
    weights: str | None,
    readout: str,
    device: str | None,
    as_json: bool,
    predictions: str | None,
) -> None:
    """Score an LDCTIQAC2023-layout folder (image/*.tif + train.json): PLCC, SROCC, KROCC,
    Overall."""
    from training.evaluate import score_ldctiqa

    try:
        res = score_ldctiqa(Path(path), Path(weights) if weights else None, device=device)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if predictions:
        Path(predictions).write_text(json.dumps(res["predictions"][readout], indent=1) + "\n")
    doc = {k: res[k] for k in ("n_images", "n_labelled", "soft", "argmax")}
    if as_json:
        click.echo(json.dumps(doc, indent=1))
        return
    click.echo(f"{res['n_labelled']} labelled of {res['n_images']} images")
    click.echo(f"{'read-out':10s} {'PLCC':>8s} {'SROCC':>8s} {'KROCC':>8s} {'Overall':>8s}")
    for name in ("soft", "argmax"):
        c = res[name]
        mark = " *" if name == readout else ""
        click.echo(
            f"{name:10s} {c['plcc']:8.4f} {c['srocc']:8.4f} {c['krocc']:8.4f} "
            f"{c['overall']:8.4f}{mark}"
        )
