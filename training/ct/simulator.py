"""Projection-domain low-dose CT simulation: HU -> mu -> projections -> counts -> log -> FBP.

Two noise paths, both in the transmission (photon count) domain:

* :meth:`LowDoseSimulator.acquire` - from *noiseless* line integrals (a phantom): Poisson
  counts at ``dose * i0`` plus Gaussian electronic noise, then the log.
* :meth:`LowDoseSimulator.reduce_dose` - from a *full-dose* measurement (a real scan, or a
  phantom already put through :meth:`acquire`): the counts are scaled by the dose fraction
  ``d`` and the missing variance ``d (1 - d) N + (1 - d^2) sigma_e^2`` is added, so the result
  has the mean and variance of a scan at ``d`` times the dose (Zeng et al., "A simple
  low-dose x-ray CT simulation from high-dose scan", IEEE TNS 62(5), 2015). Its noise adds
  to the noise already in the image, as a real lower-dose scan's would.

Sparse views (every k-th view) reconstruct with the angular weight of the views kept,
which is what makes streaks. Everything is batched over slices and runs on CUDA when
present.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.ct.operators import CTOperator, default_device
from training.ct.params import ScanParams

HU_MIN, HU_MAX = -1024.0, 3071.0


@dataclass
class SimResult:
    """Reconstructions in HU, each (B, N, N).

    ``low``: the simulated acquisition. ``full``: the full-dose, all-views reconstruction
    with the same kernel (the reference the labels compare against). ``clean``: the
    noiseless reconstruction, only for noiseless (phantom) input.
    """

    low: torch.Tensor
    full: torch.Tensor
    clean: torch.Tensor | None = None


class LowDoseSimulator:
    """Low-dose simulation with one :class:`ScanParams`, on one device.

    It keeps one :class:`CTOperator` per image size (their sampling grids are cached), so
    reuse one simulator for many slices of the same size.
    """

    def __init__(
        self,
        params: ScanParams | None = None,
        *,
        device: torch.device | str | None = None,
        cache_bytes: int | None = None,
    ) -> None:
        self.params = params or ScanParams()
        self.device = torch.device(device) if device is not None else default_device()
        self.cache_bytes = cache_bytes
        self._ops: dict[tuple[int, float], CTOperator] = {}

    # ------------------------------------------------------------------ plumbing
    def operator(self, n_pixels: int, pixel_mm: float) -> CTOperator:
        """The (cached) operator for square images of ``n_pixels`` at ``pixel_mm``."""
        key = (int(n_pixels), round(float(pixel_mm), 6))
        op = self._ops.get(key)
        if op is None:
            if len(self._ops) >= 3:  # a few sizes at most; grids are large
                self._ops.pop(next(iter(self._ops)))
            op = CTOperator(
                self.params, n_pixels, pixel_mm, device=self.device, cache_bytes=self.cache_bytes
            )
            self._ops[key] = op
        return op

    def generator(self, seed: int) -> torch.Generator:
        """A random generator on this simulator's device."""
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def hu_to_mu(self, hu: torch.Tensor) -> torch.Tensor:
        """Linear attenuation (1/mm) of HU, monoenergetic at the effective energy."""
        hu = torch.as_tensor(hu, dtype=torch.float32, device=self.device)
        return (self.params.mu_water * (1.0 + hu.clamp(HU_MIN, HU_MAX) / 1000.0)).clamp_min(0)

    def mu_to_hu(self, mu: torch.Tensor) -> torch.Tensor:
        return (mu / self.params.mu_water - 1.0) * 1000.0

    def _batch(self, hu: torch.Tensor) -> torch.Tensor:
        hu = torch.as_tensor(hu, dtype=torch.float32)
        if hu.ndim == 2:
            hu = hu[None]
        if hu.ndim != 3 or hu.shape[-1] != hu.shape[-2]:
            raise ValueError(f"expected square slices (B, N, N), got {tuple(hu.shape)}")
        return hu

    # ------------------------------------------------------------------ stages
    def project(self, hu: torch.Tensor, pixel_mm: float) -> torch.Tensor:
        """Noiseless line integrals (B, V, D) of HU slices (B, N, N)."""
        hu = self._batch(hu)
        return self.operator(hu.shape[-1], pixel_mm).project(self.hu_to_mu(hu))

    def _reading(self) -> tuple[float, float]:
        """Photons per reading and electronic variance at this geometry's sampling.

        A binned reading sums several reference readings, so both its photons and its
        electronic variance scale with ``reading_scale``: binned and full scanners then
        give the same image noise at the same dose.
        """
        s = self.params.reading_scale
        return self.params.i0 * s, self.params.sigma_e**2 * s

    def _log(self, counts: torch.Tensor, blank: float) -> torch.Tensor:
        return -torch.log(counts.clamp_min(self.params.min_counts) / blank)

    def acquire(
        self, line: torch.Tensor, dose: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Noisy post-log sinogram at ``dose`` from noiseless line integrals."""
        _check_dose(dose)
        i0, var_e = self._reading()
        mean = (dose * i0) * torch.exp(-line)
        counts = torch.poisson(mean, generator=generator)
        if var_e > 0:
            counts = counts + _randn(counts, generator) * var_e**0.5
        return self._log(counts, dose * i0)

    def reduce_dose(
        self, line_full: torch.Tensor, dose: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Post-log sinogram at ``dose`` times the dose of a full-dose sinogram (Zeng 2015)."""
        _check_dose(dose)
        if dose >= 1.0:
            return line_full.clone()
        i0, var_e = self._reading()
        n_full = i0 * torch.exp(-line_full)
        var_add = dose * (1 - dose) * n_full + (1 - dose * dose) * var_e
        counts = dose * n_full + _randn(n_full, generator) * var_add.sqrt()
        return self._log(counts, dose * i0)

    def reconstruct(
        self,
        line: torch.Tensor,
        pixel_mm: float,
        n_pixels: int,
        *,
        views_step: int = 1,
        kernel: str | None = None,
    ) -> torch.Tensor:
        """FBP to HU from a full-rotation sinogram, keeping every ``views_step``-th view."""
        op = self.operator(n_pixels, pixel_mm)
        views = op.sparse_views(views_step)
        sino = line[..., ::views_step, :] if views_step > 1 else line
        return self.mu_to_hu(op.fbp(sino, views, kernel=kernel))

    # ------------------------------------------------------------------ one call
    def simulate(
        self,
        hu: torch.Tensor,
        pixel_mm: float,
        dose: float,
        *,
        views_step: int = 1,
        kernel: str | None = None,
        generator: torch.Generator | None = None,
        noiseless_input: bool = False,
    ) -> SimResult:
        """Simulate slices ``hu`` (B, N, N) acquired at ``dose`` with every k-th view.

        ``noiseless_input``: the slices are a phantom, so full-dose noise is simulated first
        and the lower dose is derived from that same acquisition (the reference and the
        low-dose image then share their full-dose noise, as with a real scan). Otherwise
        the slices are taken as a full-dose scan and only the extra noise is added.
        """
        hu = self._batch(hu)
        n = hu.shape[-1]
        line = self.project(hu, pixel_mm)
        clean = None
        if noiseless_input:
            clean = self.reconstruct(line, pixel_mm, n, kernel=kernel)
            line = self.acquire(line, 1.0, generator)
        full = self.reconstruct(line, pixel_mm, n, kernel=kernel)
        low_line = self.reduce_dose(line, dose, generator)
        low = self.reconstruct(low_line, pixel_mm, n, views_step=views_step, kernel=kernel)
        return SimResult(low=low, full=full, clean=clean)


def _check_dose(dose: float) -> None:
    if not 0 < dose <= 1:
        raise ValueError(f"dose fraction must be in (0, 1], got {dose}")


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
