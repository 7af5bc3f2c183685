"""``qgate-train`` commands of the domain-randomised recipe and its independent check (issue 10).

qgate-train build-randomized .cache/data/dr1 --blocks 400 [--worker 0/2]
qgate-train build-chest .cache/data/chest_dr --blocks 40 [--worker 0/2]
qgate-train fit-randomized mdiqa|n2q OUT --data .cache/data/dr1 [--budget S]
qgate-train fit-chest OUT --data .cache/data/chest_dr
qgate-train evaluate-independent --out training/reports [--weights-dir DIR]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


def _worker(value: str) -> tuple[int, int]:
    w, n = (int(v) for v in value.split("/"))
    if not 0 <= w < n:
        raise click.BadParameter(f"worker must be w/n with 0 <= w < n, got {value}")
    return w, n


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


@click.command("build-randomized")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--blocks", type=int, default=400, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--worker", default="0/1", show_default=True, help="w/n: blocks i % n == w.")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--realct", default=".cache/realct", show_default=True)
@click.option(
    "--coarse",
    type=float,
    default=0.0,
    show_default=True,
    help="Probability that a block is also area-downsampled 2x or 4x (coarse anatomy).",
)
@click.option(
    "--paired", is_flag=True, help="Crops at the same place in every image of a block (ranking)."
)
@click.option(
    "--sparse-per-block",
    type=int,
    default=1,
    show_default=True,
    help="Distinct sparse-view steps in a block that has one.",
)
@click.option(
    "--fine",
    type=float,
    default=0.0,
    show_default=True,
    help="Probability that a block's scanner samples finer than 0.4 mm pixels (0.3-0.35 mm).",
)
@click.option(
    "--pixel-kernels",
    type=float,
    default=0.0,
    show_default=True,
    help="Probability that a block's kernel is set in the pixel's frequency (lp/cm).",
)
@click.option(
    "--texture",
    type=float,
    default=0.0,
    show_default=True,
    help="Probability that a real slice keeps part of its own texture in the object "
    "(bilateral at 0-1.5x its noise, not 3x).",
)
def build_randomized_cmd(
    out: str,
    blocks: int,
    seed: int,
    worker: str,
    threads: int,
    realct: str,
    coarse: float,
    paired: bool,
    sparse_per_block: int,
    fine: float,
    pixel_kernels: float,
    texture: float,
) -> None:
    """Domain-randomised MD-IQA / Noise2Quality data (resumable)."""
    from training.datasets.randomized import RandomizedConfig, build_randomized

    _threads(threads)
    cfg = RandomizedConfig(
        n_blocks=blocks,
        seed=seed,
        realct_dir=realct,
        p_coarse=coarse,
        paired=paired,
        sparse_per_block=sparse_per_block,
        p_fine=fine,
        pixel_kernels=pixel_kernels,
        p_texture=texture,
    )
    made = build_randomized(out, cfg, worker=_worker(worker), echo=click.echo)
    click.echo(f"made {made} blocks")


@click.command("build-chest")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--blocks", type=int, default=40, show_default=True)
@click.option("--worker", default="0/1", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--realct", default=".cache/realct", show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--doses-per-class",
    type=int,
    default=1,
    show_default=True,
    help="Doses per dose class and kernel, from one noise realisation.",
)
@click.option(
    "--routine",
    type=float,
    default=None,
    help="Routine dose as a fraction of the simulator's photon budget (default: ROUTINE_EFF).",
)
@click.option(
    "--soft-cutoff",
    default=None,
    help="LO,HI: soft kernels cut off at a drawn fraction of the pixel's Nyquist.",
)
@click.option(
    "--texture",
    type=float,
    default=0.0,
    show_default=True,
    help="Probability that a real volume keeps part of its own texture in the objects "
    "(counted as structure, not noise).",
)
def build_chest_cmd(
    out: str,
    blocks: int,
    worker: str,
    threads: int,
    realct: str,
    seed: int,
    doses_per_class: int,
    routine: float | None,
    soft_cutoff: str | None,
    texture: float,
) -> None:
    """Domain-randomised Chest CT-IQA volumes (resumable)."""
    from training.datasets.chest_dr import ChestDRConfig, build_chest_dr

    _threads(threads)
    extra: dict[str, Any] = {}
    if routine is not None:
        extra["routine"] = routine
    if soft_cutoff:
        lo, hi = (float(v) for v in soft_cutoff.split(","))
        extra["soft_cutoff"] = (lo, hi)
    made = build_chest_dr(
        out,
        ChestDRConfig(
            n_blocks=blocks,
            realct_dir=realct,
            seed=seed,
            doses_per_class=doses_per_class,
            p_texture=texture,
            **extra,
        ),
        worker=_worker(worker),
        echo=click.echo,
    )
    click.echo(f"made {made} blocks")


@click.command("fit-randomized")
@click.argument("family", type=click.Choice(["mdiqa", "n2q"]))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--data", multiple=True, default=[".cache/data/dr1"], show_default=True)
@click.option("--steps", type=int, default=3000, show_default=True)
@click.option("--budget", type=float, default=None, help="Stop after this many seconds.")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--init", default=None, help="Weights to start from (default: shipped).")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--dose-only", is_flag=True, help="N2Q: train the dose head alone.")
@click.option(
    "--crops",
    default="",
    help="Context sizes in px, comma-separated (one drawn per step); default: 128 only.",
)
@click.option(
    "--select",
    type=click.Choice(["auto", "rmse", "pairs"]),
    default="auto",
    show_default=True,
    help="Checkpoint kept: auto = val Spearman (MD-IQA) / map RMSE (N2Q); rmse = lowest "
    "RMSE; pairs = most val pairs (--paired data) in the labels' order.",
)
@click.option(
    "--balance",
    type=float,
    default=0.0,
    show_default=True,
    help="Draw crops with weight count(label bin) ** -BALANCE (0: uniform).",
)
@click.option(
    "--rank",
    type=float,
    default=0.0,
    show_default=True,
    help="Weight of a ranking loss on pairs of one crop at two qualities (--paired data).",
)
@click.option(
    "--local-std",
    is_flag=True,
    help="Add the local-std input channel (zero-initialised) to the starting weights.",
)
@click.option(
    "--map-loss",
    type=click.Choice(["mse", "l1"]),
    default=None,
    help="N2Q map loss (default: the starting weights' own, the paper's MSE).",
)
def fit_randomized_cmd(
    family: str,
    out: str,
    data: tuple[str, ...],
    steps: int,
    budget: float | None,
    threads: int,
    init: str | None,
    lr: float,
    dose_only: bool,
    crops: str,
    select: str,
    balance: float,
    rank: float,
    local_std: bool,
    map_loss: str | None,
) -> None:
    """Fine-tune MD-IQA or Noise2Quality on domain-randomised data."""
    from training.fit.randomized import DRFitConfig, fit_dr

    cfg = DRFitConfig(
        family,
        steps=steps,
        time_budget_s=budget,
        threads=threads,
        init=init,
        lr=lr,
        dose_only=dose_only,
        crops=tuple(int(c) for c in crops.split(",") if c.strip()),
        select=select,
        balance=balance,
        rank=rank,
        local_std=local_std,
        map_loss=map_loss,  # type: ignore[arg-type]
    )
    click.echo(str(fit_dr(list(data), out, cfg, echo=click.echo)))


@click.command("fit-chest")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--data", multiple=True, default=[".cache/data/chest_dr"], show_default=True)
@click.option("--steps", type=int, default=600, show_default=True)
@click.option("--budget", type=float, default=None)
@click.option("--threads", type=int, default=1, show_default=True)
@click.option(
    "--dose-label",
    type=click.Choice(["dose", "noise", "hann"]),
    default="dose",
    show_default=True,
    help="dose: simulated dose vs the patient's routine; noise: noise over the kernel's gain "
    "on its scanner; hann: the noise through a Hann at the pixel's Nyquist (any scanner).",
)
@click.option(
    "--noise-edge-hu",
    type=float,
    default=None,
    help="With --dose-label noise: the class edge in HU of a Hann kernel at 0.7 mm "
    "(the issue's scale: 5.3; default: from the training chests); with hann: the edge in "
    "Hann-equivalent HU (default 5.3).",
)
def fit_chest_cmd(
    out: str,
    data: tuple[str, ...],
    steps: int,
    budget: float | None,
    threads: int,
    dose_label: str,
    noise_edge_hu: float | None,
) -> None:
    """Train Chest CT-IQA on domain-randomised volumes."""
    from training.fit.chest_dr import ChestDRFitConfig, fit_chest_dr

    cfg = ChestDRFitConfig(
        steps=steps,
        time_budget_s=budget,
        threads=threads,
        dose_label=dose_label,
        noise_edge_hu=noise_edge_hu,
    )
    click.echo(str(fit_chest_dr(list(data), out, cfg, echo=click.echo)))


@click.command("evaluate-independent")
@click.option(
    "--out", default="training/reports", show_default=True, type=click.Path(file_okay=False)
)
@click.option("--realct", default=".cache/realct", show_default=True)
@click.option(
    "--weights-dir",
    default=None,
    help="mdiqa/n2q/chestiqa.safetensors (default: the shipped weights).",
)
@click.option("--chest/--no-chest", default=True, show_default=True)
@click.option(
    "--gate/--no-gate",
    default=True,
    show_default=True,
    help="Also the default gate's cases (routine sharp, 5 % dose, 1/16 views).",
)
@click.option("--threads", type=int, default=2, show_default=True)
def evaluate_independent_cmd(
    out: str, realct: str, weights_dir: str | None, chest: bool, gate: bool, threads: int
) -> None:
    """Score held-out real CT through the independent (scikit-image) simulator."""
    from training.independent import run_chest, run_gate_cases, run_independent

    _threads(threads)
    res = run_independent(out, realct=realct, weights_dir=weights_dir, echo=click.echo)
    for name, rep in res["reports"].items():
        click.echo(
            f"{name}: "
            + ", ".join(f"{m} Spearman {c['spearman']:.3f}" for m, c in rep["correlations"].items())
        )
    if gate:
        run_gate_cases(out, realct=realct, weights_dir=weights_dir, echo=click.echo)
    if chest:
        w = Path(weights_dir) / "chestiqa.safetensors" if weights_dir else None
        ch = run_chest(out, realct=realct, weights=w, echo=click.echo)
        click.echo(
            f"chest: window accuracy {ch['window_accuracy']:.3f}, dose accuracy "
            f"{ch['dose_accuracy']:.3f} ({ch['n']} volumes); the training label gives the "
            f"simulated dose class on {ch['training_label_agreement']['fan']:.3f} (round 9, "
            f"fan gains) / {ch['training_label_agreement']['parallel']:.3f} (parallel) / "
            f"{ch['training_label_agreement']['hann']:.3f} (Hann-equivalent HU, round 12)"
        )
