"""Scanner and reconstruction parameters for the low-dose simulator, in one dataclass.

Every default says where it comes from. The geometry is that of the Siemens SOMATOM
Definition AS+ whose projection data make up the Mayo / AAPM low-dose CT data (the data
behind LDCTIQAC2023 and Noise2Quality), as used in the literature that reconstructs them:
source-isocentre 595 mm, source-detector 1085.6 mm, 736 channels of 1.2858 mm, 1152 views
per rotation without flying focal spot. The photon budget ``i0`` is our calibration (see
``docs/simulator.md``): it gives about 11 HU of noise with the standard kernel in the
centre of a 35 x 25 cm water ellipse at 0.7 mm pixels, the noise of a routine-dose
abdominal scan, so that dose fractions mean what they mean clinically. The kernels are
chosen by their measured MTF (see :data:`KERNEL_ALIASES`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

Geometry = Literal["fan", "parallel"]
KERNELS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")
# Clinical names -> "window[:cutoff]" (cutoff as a fraction of the detector Nyquist).
# Chosen by their MTF at 0.7 mm pixels (docs/simulator.md): smooth (MTF50 2.2 lp/cm) is like
# a soft-tissue B10f-B20f; standard (3.4 lp/cm, MTF10 5.8) matches the B30f of the Mayo
# abdominal data; sharp, the plain ramp (4.7 lp/cm, the most this detector can give without
# a flying focal spot), stands in for lung kernels. Shepp-Logan (4.2) lies in between.
KERNEL_ALIASES = {"smooth": "hann:0.7", "standard": "cosine", "sharp": "ramp"}

# The sampling the photon budget ``i0`` refers to (Definition AS+, no flying focal spot).
REF_VIEWS = 1152
REF_CHANNEL_ANGLE = 1.2858 / 1085.6  # rad, one channel seen from the source
REF_SID_MM = 595.0


def resolve_kernel(name: str) -> tuple[str, float]:
    """``sharp/standard/smooth`` or ``window[:cutoff]`` -> (window in :data:`KERNELS`, cutoff)."""
    key = name.lower().strip()
    key = KERNEL_ALIASES.get(key, key)
    window, _, cut = key.partition(":")
    if window not in KERNELS:
        raise ValueError(
            f"unknown kernel {name!r}; use one of {sorted(KERNEL_ALIASES)} or "
            f"'window[:cutoff]' with a window in {list(KERNELS)}"
        )
    try:
        cutoff = float(cut) if cut else 1.0
    except ValueError:
        raise ValueError(f"bad cutoff in kernel {name!r}") from None
    if not 0 < cutoff <= 1:
        raise ValueError(f"kernel cutoff must be in (0, 1], got {cutoff}")
    return window, cutoff


@dataclass(frozen=True)
class ScanParams:
    """A CT acquisition and its filtered back-projection.

    Parameters
    ----------
    geometry : {"fan", "parallel"}
        ``fan``: third-generation equiangular fan beam over 360 degrees (the default and the
        physical one). ``parallel``: parallel beam over 180 degrees, used to validate against
        scikit-image's ``radon``/``iradon``.
    n_views : int
        Views per rotation (fan) or per 180 degrees (parallel). Default 1152 (Definition AS+).
    n_det : int
        Detector channels. Default 736 (Definition AS+).
    det_pitch_mm : float
        Channel pitch at the detector (fan) or at the isocentre (parallel). Default 1.2858 mm.
    sid_mm, sdd_mm : float
        Source-isocentre and source-detector distances. Defaults 595 and 1085.6 mm.
    i0 : float
        Unattenuated photons per channel per view at full dose, for the reference sampling
        (736 channels of 1.2858 mm at 1085.6 mm, 1152 views). A geometry with coarser
        channels or fewer views per rotation gets proportionally more photons per reading,
        so that the dose, not the sampling, sets the noise. Default 1.5e6: our calibration
        to 11 HU (standard kernel, 0.7 mm pixels) in the centre of a 35 x 25 cm water
        ellipse, the noise of a routine-dose 3 mm abdominal scan. Cross-check: ~25 mGy
        free-in-air kerma per rotation at the isocentre and 3.4e7 photons/mm^2/mGy at
        60 keV give ~1.5e6 photons per 0.7 x 3 mm reading per view.
    sigma_e : float
        Electronic (read-out) noise, standard deviation in photon-count units per reading
        at the reference sampling. Default sqrt(150): the literature pair I0 = 1e5 with
        electronic variance 10 (Zeng et al., IEEE TNS 2015; the PWLS sinogram papers of
        Wang, Li, Lu and Liang) scaled to our ``i0``, so electronic noise keeps its weight
        relative to the signal. It matters only where counts are very low (photon
        starvation at low dose through long paths).
    mu_water : float
        Linear attenuation of water in 1/mm at the effective energy (~70 keV of a 120 kVp
        beam; NIST XCOM 0.193 cm^-1). HU map linearly to mu = mu_water (1 + HU / 1000).
    kernel : str
        FBP kernel: ``smooth``, ``standard`` or ``sharp`` (see :data:`KERNEL_ALIASES`), or
        ``window[:cutoff]`` with a window in :data:`KERNELS` and the cut-off as a fraction
        of the detector Nyquist frequency (``hann:0.7``). Default ``standard``.
    min_counts : float
        Counts are clipped below at this value before the log (photon starvation). Default
        1.0, the usual choice; lower values give darker starvation streaks.
    det_offset : float
        Detector offset in channels (a quarter-channel offset is common on real scanners).
        Default 0.0, which keeps the 90-degree symmetry the projector exploits.
    """

    geometry: Geometry = "fan"
    n_views: int = 1152
    n_det: int = 736
    det_pitch_mm: float = 1.2858
    sid_mm: float = 595.0
    sdd_mm: float = 1085.6
    i0: float = 1.5e6
    sigma_e: float = math.sqrt(150.0)
    mu_water: float = 0.0193
    kernel: str = "standard"
    min_counts: float = 1.0
    det_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.geometry not in ("fan", "parallel"):
            raise ValueError(f"geometry must be 'fan' or 'parallel', got {self.geometry!r}")
        for name in ("n_views", "n_det"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be at least 2")
        for name in ("det_pitch_mm", "sid_mm", "sdd_mm", "i0", "mu_water", "min_counts"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.sigma_e < 0:
            raise ValueError("sigma_e must be >= 0")
        if self.geometry == "fan" and self.sdd_mm <= self.sid_mm:
            raise ValueError("sdd_mm must exceed sid_mm")
        resolve_kernel(self.kernel)

    # -- derived quantities ---------------------------------------------------------------
    @property
    def channel_angle(self) -> float:
        """Fan angle of one channel in radians (fan geometry)."""
        return self.det_pitch_mm / self.sdd_mm

    @property
    def iso_pitch_mm(self) -> float:
        """Channel pitch projected to the isocentre."""
        if self.geometry == "parallel":
            return self.det_pitch_mm
        return self.sid_mm * self.channel_angle

    @property
    def fov_radius_mm(self) -> float:
        """Radius of the scan field of view (every ray through it is measured)."""
        half = self.n_det / 2 - abs(self.det_offset)
        if self.geometry == "parallel":
            return half * self.det_pitch_mm
        return self.sid_mm * math.sin(min(half * self.channel_angle, math.pi / 2))

    @property
    def reading_scale(self) -> float:
        """Photons per reading relative to ``i0`` for this sampling (dose-preserving)."""
        if self.geometry == "fan":
            per_channel = self.channel_angle / REF_CHANNEL_ANGLE
            per_view = REF_VIEWS / self.n_views
        else:
            # 180 degrees of parallel views carry the dose of a full fan rotation.
            per_channel = self.det_pitch_mm / (REF_SID_MM * REF_CHANNEL_ANGLE)
            per_view = REF_VIEWS / (2 * self.n_views)
        return per_channel * per_view

    def with_(self, **changes: Any) -> ScanParams:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # -- presets --------------------------------------------------------------------------
    @classmethod
    def binned(cls, factor: int = 2, **changes: Any) -> ScanParams:
        """The default scanner with ``factor`` channels and views combined into one.

        Same fan, same dose, 1/factor^2 of the work: for images of 256 pixels or for CPU
        builds. Noise per image pixel is unchanged to first order; resolution is coarser.
        """
        base = cls(**changes)
        return replace(
            base,
            n_views=base.n_views // factor,
            n_det=base.n_det // factor,
            det_pitch_mm=base.det_pitch_mm * factor,
        )

    @classmethod
    def for_pixel_size(cls, pixel_mm: float, **changes: Any) -> ScanParams:
        """Default scanner, binned when the pixels are coarse enough not to need every channel.

        0.7 mm pixels (512 over 358 mm) get the full scanner; 1.4 mm pixels 2x binning;
        2.8 mm 4x. The dose stays that of the full scanner (see :attr:`reading_scale`).
        """
        iso = REF_SID_MM * REF_CHANNEL_ANGLE
        factor = max(1, round(pixel_mm / iso))
        factor = 1 << math.floor(math.log2(factor))  # powers of two keep V % 4 == 0
        return cls.binned(factor, **changes) if factor > 1 else cls(**changes)
