"""Fast dose ladders: one projection per slice, its noise reconstructed once, every dose after.

FBP is linear. For a noiseless object with line integrals ``p`` and full-dose expected
counts ``N = i0 exp(-p)`` per reading, the post-log sinogram at dose fraction ``d`` is, to
first order in the count noise,

    p + n_q / sqrt(d) + n_e / d,    n_q ~ N(0, 1 / N),  n_e ~ N(0, sigma_e^2 / N^2),

(quantum noise has variance ``d N``, electronic noise ``sigma_e^2``, both divided by the
squared mean ``(d N)^2`` after the log). So the reconstruction at any dose is

    FBP(p) + FBP(n_q) / sqrt(d) + FBP(n_e) / d,

three reconstructions per (views, kernel) instead of one per dose, and one forward
projection per slice instead of one per sample: :class:`NoiseBasis`. The doses of one
basis share one noise realisation (one acquisition seen at several mAs), which is what a
dose ladder of one patient is. The first-order expansion is exact for the Gaussian part and
leaves out the log's bias at very low counts (a few counts per reading, photon starvation
behind metal or through the shoulders at a few percent dose); :func:`max_linear_error`
says where that matters, and the full :class:`~training.ct.simulator.LowDoseSimulator`
stays the reference (``tests/test_fastsim.py`` compares the two).

The reconstruction grid may differ from the projection grid (``recon_n``,
``recon_pixel_mm``): a small field of view reconstructed from the projections of a larger
object, as scanners do for heads and targeted reconstructions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from training.ct.simulator import LowDoseSimulator, _randn


@dataclass
class NoiseBasis:
    """HU images (B, N, N) from which every dose of one acquisition follows.

    ``clean``: the noiseless reconstruction (this views step and kernel); ``quantum`` and
    ``electronic``: the reconstructed noise at full dose (``dose=1``), each scaled as the
    module docstring says.
    """

    clean: torch.Tensor
    quantum: torch.Tensor
    electronic: torch.Tensor
    views_step: int
    kernel: str

    def to(self, device: torch.device | str) -> NoiseBasis:
        """The same basis on ``device`` (e.g. CUDA-built, labelled on the CPU)."""
        return NoiseBasis(
            self.clean.to(device),
            self.quantum.to(device),
            self.electronic.to(device),
            self.views_step,
            self.kernel,
        )

    def at(self, dose: float) -> torch.Tensor:
        """The reconstruction at dose fraction ``dose`` (HU, (B, N, N)); above 1 the linear
        model only gets closer (the noise is smaller)."""
        if not dose > 0:
            raise ValueError(f"dose fraction must be positive, got {dose}")
        return self.clean + self.quantum / math.sqrt(dose) + self.electronic / dose


def noise_sinograms(
    sim: LowDoseSimulator, line: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-dose quantum and electronic noise of post-log sinograms ``line`` (B, V, D)."""
    i0, var_e = sim._reading()
    counts = (i0 * torch.exp(-line)).clamp_min(sim.params.min_counts)
    quantum = _randn(line, generator) / counts.sqrt()
    electronic = _randn(line, generator) * (var_e**0.5) / counts
    return quantum, electronic


def noise_basis(
    sim: LowDoseSimulator,
    line: torch.Tensor,
    noise: tuple[torch.Tensor, torch.Tensor],
    *,
    recon_n: int,
    recon_pixel_mm: float,
    views_step: int = 1,
    kernel: str | None = None,
    electronic: bool = True,
) -> NoiseBasis:
    """Reconstruct the clean sinogram and the two noise sinograms once (``electronic=False``:
    leave the read-out noise out and save its reconstruction)."""
    quantum, e_sino = noise

    def fbp(s: torch.Tensor, mu_offset: bool) -> torch.Tensor:
        hu = sim.reconstruct(s, recon_pixel_mm, recon_n, views_step=views_step, kernel=kernel)
        # mu_to_hu maps 0 to -1000 HU: noise images are differences, so add the offset back.
        return hu if mu_offset else hu + 1000.0

    clean = fbp(line, True)
    return NoiseBasis(
        clean=clean,
        quantum=fbp(quantum, False),
        electronic=fbp(e_sino, False) if electronic else torch.zeros_like(clean),
        views_step=views_step,
        kernel=kernel or sim.params.kernel,
    )


def ladder(
    sim: LowDoseSimulator,
    hu: torch.Tensor,
    pixel_mm: float,
    *,
    doses: Sequence[float],
    views_steps: Sequence[int] = (1,),
    recon_n: int | None = None,
    recon_pixel_mm: float | None = None,
    kernel: str | None = None,
    generator: torch.Generator | None = None,
) -> dict[int, NoiseBasis]:
    """Project noiseless slices ``hu`` (B, M, M) once; one :class:`NoiseBasis` per views step.

    Every views step reuses the same projection and the same noise realisation (its every
    k-th view), so a views ladder is the same acquisition with views left out.
    ``doses`` is only checked here; read each dose with :meth:`NoiseBasis.at`.
    """
    for d in doses:
        if not d > 0:
            raise ValueError(f"dose fraction must be positive, got {d}")
    hu = sim._batch(hu)
    line = sim.project(hu, pixel_mm)
    noise = noise_sinograms(sim, line, generator)
    n = recon_n or hu.shape[-1]
    px = recon_pixel_mm or pixel_mm
    return {
        k: noise_basis(sim, line, noise, recon_n=n, recon_pixel_mm=px, views_step=k, kernel=kernel)
        for k in views_steps
    }


def max_linear_error(sim: LowDoseSimulator, line: torch.Tensor, dose: float) -> float:
    """Largest first-order error of the log, ``1 / (2 d N)``, over the sinogram (in line
    integral units): below ~0.01 the linear ladder and the full simulator agree."""
    i0, _ = sim._reading()
    counts = (dose * i0 * torch.exp(-line)).clamp_min(1.0)
    return float((0.5 / counts).max())
