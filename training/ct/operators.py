"""Forward projection and filtered back-projection in torch, for fan and parallel beams.

Conventions. An image is ``(..., N, N)`` with square pixels of ``pixel_mm``; pixel
``(r, c)`` sits at ``x = (c - (N-1)/2) * pixel_mm``, ``y = (r - (N-1)/2) * pixel_mm`` and the
isocentre is the image centre. Values are linear attenuation in 1/mm; the sinogram holds
dimensionless line integrals, ``(..., views, channels)``.

* **Projector**: Joseph's method. Each ray is sampled once per pixel row or column along
  its dominant axis, with linear interpolation along the other; the sum is scaled by the
  step length. It is done with ``grid_sample`` (bilinear, whose second tap has weight zero
  on the exact rows or columns used), so CPU and CUDA share one code path.
* **FBP**: the spatially discretised ramp of Kak & Slaney (Principles of Computerized
  Tomographic Imaging, ch. 3.3) times an apodising window in the Fourier domain, with
  zero padding to at least twice the detector; for the fan beam the equiangular
  weighting of their ch. 3.4.1 (``R cos gamma`` pre-weight, ``(gamma / sin gamma)^2 / 2``
  kernel, ``1/L^2`` back-projection weight). Back-projection is pixel driven with linear
  interpolation.
* **Symmetry**: views a quarter turn apart (fan, ``n_views % 4 == 0``) or half of 180
  degrees apart (parallel, ``n_views % 2 == 0``) see the image rotated by exactly 90
  degrees, so only the first block of views needs sampling grids; the others rotate the
  image (``torch.rot90``, exact). The grids of that block are cached when they fit a
  memory budget, which makes repeated projections several times faster.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.ct.params import ScanParams, resolve_kernel

# Elements of the largest temporary per chunk (floats): bounds the memory of a call.
_CHUNK_ELEMS = 1 << 25


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_cache_bytes(device: torch.device) -> int:
    return (8 << 30) if device.type == "cuda" else (2 << 30)  # 8 GiB GPU, 2 GiB CPU


def _take(
    cached: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``idx`` of cached grids: a view (no copy) when they are evenly spaced."""
    n = idx.numel()
    start = int(idx[0])
    step = int(idx[1] - idx[0]) if n > 1 else 1
    if step > 0 and torch.equal(idx, torch.arange(start, start + step * n, step)):
        sl = slice(start, start + step * (n - 1) + 1, step)
        return cached[0][sl], cached[1][sl]
    dev_idx = idx.to(device)
    return cached[0].index_select(0, dev_idx), cached[1].index_select(0, dev_idx)


class CTOperator:
    """Projector and FBP for one scanner, one image size and pixel size, on one device.

    Build it once and reuse it: the sampling grids are cached inside (when they fit
    ``cache_bytes``), which is what makes batches of slices fast.
    """

    def __init__(
        self,
        params: ScanParams,
        n_pixels: int,
        pixel_mm: float,
        *,
        device: torch.device | str | None = None,
        cache_bytes: int | None = None,
    ) -> None:
        if n_pixels < 8:
            raise ValueError("n_pixels must be at least 8")
        if not pixel_mm > 0:
            raise ValueError("pixel_mm must be positive")
        self.params = params
        self.n = int(n_pixels)
        self.pixel_mm = float(pixel_mm)
        self.device = torch.device(device) if device is not None else default_device()
        self.cache_bytes = _default_cache_bytes(self.device) if cache_bytes is None else cache_bytes
        v = params.n_views
        # Symmetry order: how many exact 90-degree copies of the base block of views.
        self.sym = 4 if params.geometry == "fan" else 2
        if v % self.sym:
            self.sym = 1
        self.n_base = v // self.sym
        self._proj_cached: tuple[torch.Tensor, torch.Tensor] | None = None
        self._bp_cached: tuple[torch.Tensor, torch.Tensor] | None = None
        self._filters: dict[tuple[str, float, int], torch.Tensor] = {}

    # ------------------------------------------------------------------ geometry
    def view_angles(self, views: torch.Tensor) -> torch.Tensor:
        """Source angle (fan) or projection angle (parallel) of each view, radians."""
        p = self.params
        span = 2 * math.pi if p.geometry == "fan" else math.pi
        return views.to(torch.float64) * (span / p.n_views)

    def channel_positions(self) -> torch.Tensor:
        """Fan angle (rad) or detector coordinate (mm) of each channel, float64."""
        p = self.params
        j = torch.arange(p.n_det, dtype=torch.float64, device=self.device)
        off = j - (p.n_det - 1) / 2 + p.det_offset
        return off * (p.channel_angle if p.geometry == "fan" else p.det_pitch_mm)

    def _rays(self, views: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A point on each ray and its unit direction, in pixel units, (V, D) each."""
        p = self.params
        ang = self.view_angles(views.to(self.device))[:, None]
        ch = self.channel_positions()[None, :]
        if p.geometry == "fan":
            r = p.sid_mm / self.pixel_mm
            ox = (r * torch.cos(ang)).expand(-1, ch.shape[1])
            oy = (r * torch.sin(ang)).expand(-1, ch.shape[1])
            dx, dy = torch.cos(ang + math.pi + ch), torch.sin(ang + math.pi + ch)
        else:
            t = ch / self.pixel_mm
            ox, oy = t * torch.cos(ang), t * torch.sin(ang)
            dx, dy = (-torch.sin(ang)).expand_as(ox), torch.cos(ang).expand_as(ox)
        return ox, oy, dx, dy

    def _proj_grid(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Joseph sampling positions (V, D, N, 2), normalised for grid_sample, and weights."""
        n = self.n
        c0 = (n - 1) / 2
        ox, oy, dx, dy = self._rays(views)
        xdom = dx.abs() >= dy.abs()
        major_d = torch.where(xdom, dx, dy)
        minor_d = torch.where(xdom, dy, dx)
        major_o = torch.where(xdom, ox, oy)
        minor_o = torch.where(xdom, oy, ox)
        slope = minor_d / major_d
        # minor index at major index k:  minor_o + c0 + (k - c0 - major_o) * slope
        a = minor_o + c0 - (c0 + major_o) * slope
        scale = 2.0 / (n - 1)
        # Per-ray constants in float64, the (V, D, N) expansion in float32 (memory bound).
        a32 = (a * scale - 1).to(torch.float32)
        s32 = (slope * scale).to(torch.float32)
        k = torch.arange(n, dtype=torch.float32, device=self.device)
        grid = torch.empty((*a.shape, n, 2), dtype=torch.float32, device=self.device)
        xd = xdom[..., None]
        minor = torch.addcmul(a32[..., None], s32[..., None], k)  # (V, D, N)
        major = (k * scale - 1).expand_as(minor)
        grid[..., 0] = torch.where(xd, major, minor)
        grid[..., 1] = torch.where(xd, minor, major)
        weight = (self.pixel_mm / major_d.abs()).to(torch.float32)
        return grid, weight

    def _bp_grid(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Detector coordinate of every pixel, (V, 1, N*N, 2) normalised, and weights (V, N*N)."""
        p = self.params
        n = self.n
        c0 = (n - 1) / 2
        idx = torch.arange(n, dtype=torch.float32, device=self.device)
        coord = (idx - c0) * self.pixel_mm
        y, x = torch.meshgrid(coord, coord, indexing="ij")
        x, y = x.reshape(1, -1), y.reshape(1, -1)
        ang = self.view_angles(views.to(self.device))[:, None]
        cos, sin = torch.cos(ang).to(torch.float32), torch.sin(ang).to(torch.float32)
        grid = torch.zeros((ang.shape[0], 1, n * n, 2), dtype=torch.float32, device=self.device)
        if p.geometry == "fan":
            t = p.sid_mm - (x * cos + y * sin)
            s = x * sin - y * cos
            u = torch.atan2(s, t) / p.channel_angle
            weight = 1.0 / (s * s + t * t)
        else:
            u = (x * cos + y * sin) / p.det_pitch_mm
            weight = torch.ones_like(u)
        u += (p.n_det - 1) / 2 - p.det_offset
        grid[:, 0, :, 0] = u * (2.0 / (p.n_det - 1)) - 1
        return grid, weight

    # ------------------------------------------------------------------ caches
    def _base_proj(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._proj_cached is None:
            p = self.params
            need = self.n_base * p.n_det * self.n * 2 * 4
            if need > self.cache_bytes // 2:
                return None
            self._proj_cached = self._proj_grid(torch.arange(self.n_base))
        return self._proj_cached

    def _base_bp(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._bp_cached is None:
            need = self.n_base * self.n * self.n * 3 * 4
            if need > self.cache_bytes // 2:
                return None
            self._bp_cached = self._bp_grid(torch.arange(self.n_base))
        return self._bp_cached

    def _groups(self, views: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Split view indices by symmetry copy: (copy m, base view indices, positions)."""
        views = views.to(torch.long).cpu()
        out = []
        for m in range(self.sym):
            sel = torch.nonzero((views // self.n_base) == m).flatten()
            if sel.numel():
                out.append((m, views[sel] - m * self.n_base, sel))
        return out

    # ------------------------------------------------------------------ projection
    def project(self, mu: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """Line integrals of ``mu`` (B, N, N) in 1/mm: sinogram (B, V, D)."""
        mu = self._check_image(mu)
        p = self.params
        views = torch.arange(p.n_views) if views is None else views.to(torch.long).cpu()
        b = mu.shape[0]
        out = torch.zeros(b, views.numel(), p.n_det, device=self.device, dtype=torch.float32)
        cached = self._base_proj()
        per_chunk = max(1, _CHUNK_ELEMS // (p.n_det * self.n * max(b, 1)))
        for m, base, pos in self._groups(views):
            img = torch.rot90(mu, m, dims=(-2, -1))[None]  # (1, B, N, N)
            for i in range(0, base.numel(), per_chunk):
                bv = base[i : i + per_chunk]
                grid, weight = (
                    _take(cached, bv, self.device) if cached is not None else self._proj_grid(bv)
                )
                nv = bv.numel()
                # Views as the batch, the image broadcast (stride 0): no copy of the grids.
                smp = F.grid_sample(
                    img.expand(nv, -1, -1, -1),
                    grid,
                    mode="bilinear",
                    padding_mode="zeros",
                    align_corners=True,
                )  # (nv, B, D, N)
                line = smp.sum(-1) * weight[:, None, :]  # (nv, B, D)
                out[:, pos[i : i + per_chunk].to(self.device)] = line.transpose(0, 1)
        return out

    # ------------------------------------------------------------------ FBP
    def _filter_kernel(self, kernel: str, cutoff: float, size: int) -> torch.Tensor:
        """Frequency response (size//2+1,) of ramp x window, including the fan kernel."""
        key = (kernel, cutoff, size)
        if key in self._filters:
            return self._filters[key]
        p = self.params
        tau = p.channel_angle if p.geometry == "fan" else p.det_pitch_mm
        n = torch.cat((torch.arange(0, size // 2 + 1), torch.arange(-(size // 2) + 1, 0))).to(
            torch.float64
        )
        h = torch.zeros(size, dtype=torch.float64)
        h[0] = 1 / (4 * tau * tau)
        odd = (n.abs() % 2) == 1
        h[odd] = -1 / (n[odd] ** 2 * math.pi**2 * tau * tau)
        if p.geometry == "fan":
            g = n * tau
            ratio = torch.ones_like(g)
            nz = n != 0
            ratio[nz] = g[nz] / torch.sin(g[nz])
            h = 0.5 * ratio**2 * h
        resp = torch.fft.rfft(h).real * tau  # tau: the convolution sum's step
        nu = torch.linspace(0, 1, size // 2 + 1, dtype=torch.float64) / cutoff
        win = {
            "ramp": torch.ones_like(nu),
            "shepp-logan": torch.special.sinc(nu / 2),
            "cosine": torch.cos(math.pi * nu / 2),
            "hamming": 0.54 + 0.46 * torch.cos(math.pi * nu),
            "hann": 0.5 + 0.5 * torch.cos(math.pi * nu),
        }[kernel]
        win = torch.where(nu <= 1, win, torch.zeros_like(win))
        out = (resp * win).to(torch.float32).to(self.device)
        self._filters[key] = out
        return out

    def filter_sinogram(self, sino: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        """Weighted and ramp-filtered projections, ready for back-projection."""
        p = self.params
        name, cut = resolve_kernel(kernel or p.kernel)
        d = p.n_det
        size = max(64, 1 << math.ceil(math.log2(2 * d)))
        if p.geometry == "fan":
            gam = self.channel_positions().to(torch.float32)
            sino = sino * (p.sid_mm * torch.cos(gam))
        spec = torch.fft.rfft(sino, n=size, dim=-1) * self._filter_kernel(name, cut, size)
        return torch.fft.irfft(spec, n=size, dim=-1)[..., :d]

    def backproject(self, q: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Pixel-driven back-projection of filtered views ``q`` (B, V, D) taken at ``views``."""
        views = views.to(torch.long).cpu()
        if q.shape[-2] != views.numel():
            raise ValueError(f"{q.shape[-2]} filtered views for {views.numel()} view indices")
        b, n = q.shape[0], self.n
        cached = self._base_bp()
        per_chunk = max(1, _CHUNK_ELEMS // (n * n * max(b, 1)))
        out = torch.zeros(b, n, n, device=self.device, dtype=torch.float32)
        for m, base, pos in self._groups(views):
            acc = torch.zeros(b, n * n, device=self.device, dtype=torch.float32)
            for i in range(0, base.numel(), per_chunk):
                bv = base[i : i + per_chunk]
                grid, weight = (
                    _take(cached, bv, self.device) if cached is not None else self._bp_grid(bv)
                )
                rows = q[:, pos[i : i + per_chunk].to(self.device)]  # (B, nv, D)
                inp = rows.permute(1, 0, 2)[:, :, None, :]  # (nv, B, 1, D)
                smp = F.grid_sample(
                    inp, grid, mode="bilinear", padding_mode="zeros", align_corners=True
                )  # (nv, B, 1, N*N)
                if self.params.geometry == "fan":  # parallel weights are all 1
                    smp.mul_(weight[:, None, None])
                acc += smp[:, :, 0].sum(0)  # faster than einsum on CPU
            out += torch.rot90(acc.reshape(b, n, n), -m, dims=(-2, -1))
        return out

    def fbp(
        self,
        sino: torch.Tensor,
        views: torch.Tensor | None = None,
        *,
        kernel: str | None = None,
    ) -> torch.Tensor:
        """Filtered back-projection of ``sino`` (B, V, D) to attenuation (B, N, N) in 1/mm.

        ``views`` are the view indices the rows of ``sino`` belong to (all views when
        omitted). They must be evenly spaced over the rotation; each gets the angular
        weight of the rotation divided by their number (sparse views included).
        """
        p = self.params
        sino = sino.to(self.device, torch.float32)
        if sino.ndim == 2:
            sino = sino[None]
        views = torch.arange(p.n_views) if views is None else views.to(torch.long).cpu()
        q = self.filter_sinogram(sino, kernel)
        span = 2 * math.pi if p.geometry == "fan" else math.pi
        return self.backproject(q, views) * (span / views.numel())

    # ------------------------------------------------------------------ helpers
    def _check_image(self, img: torch.Tensor) -> torch.Tensor:
        img = img.to(self.device, torch.float32)
        if img.ndim == 2:
            img = img[None]
        if img.shape[-2:] != (self.n, self.n):
            raise ValueError(f"image must be {self.n}x{self.n}, got {tuple(img.shape[-2:])}")
        return img.reshape(-1, self.n, self.n)

    def sparse_views(self, step: int) -> torch.Tensor:
        """Every ``step``-th view, starting at view 0."""
        if step < 1 or self.params.n_views % step:
            raise ValueError(
                f"views step {step} must divide the {self.params.n_views} views per rotation"
            )
        return torch.arange(0, self.params.n_views, step)
