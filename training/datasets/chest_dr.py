"""Chest CT-IQA data, domain-randomised (issue 10): short chest volumes through many scanners.

Each sample is ``depth`` contiguous slices of a training source (chest slices preferred:
lung inside the body), made noiseless as in :mod:`training.datasets.randomized`, projected
once through a random geometry, and reconstructed at 512 x 512 (0.6-0.8 mm, a chest field)
with **both** kernel classes and at **two** doses from one noise realisation:

* window / kernel class: ``soft_tissue`` = a smooth kernel (Hann 0.7, cosine, Hamming),
  ``lung`` = a sharp one (Shepp-Logan, ramp): read from the noise texture;
* dose class: ``high`` = effective dose (dose x tube output) 0.6-1.6 of routine, ``low`` =
  0.12-0.35 (the quarter-dose scans of the issue), so the class is the noise relative to
  what that kernel and patient give at routine dose. Routine is ``ChestDRConfig.routine``
  of the simulator's photon budget: :data:`~training.datasets.randomized.ROUTINE_EFF`
  (calibrated to the noise of real training scans) by default; round 9 uses the whole
  budget, where a smooth kernel adds the issue's full-dose 3-4.5 HU at 0.7 mm (a ~30 cm
  chest: 2.7-3.7 HU, :mod:`training.chest_routine_noise`, REPORT.md round 9).
* ``soft_cutoff``: soft kernels cut off at a drawn fraction of the reconstruction pixel's
  Nyquist (as clinical kernels are specified in lp/cm), so that their noise stays
  correlated at 0.9-1.0 mm pixels, where a detector-relative smooth kernel's is white.

What is stored is the model input itself (:func:`qgate.models.preprocess.prepare_chest_input`
with the config given, computed on the native 512 reconstruction), the class labels, the
SNR (:func:`qgate.core.physics.snr_label`) and BRISQUE (the class's display window) labels of
the native series, and the quality proxy: the mean SSIM (C40/W400) over the body against
the noiseless same-kernel reconstruction. Blocks as in the randomised builder
(``blocks/NNNNN.npz``, resumable, ``--worker i/n``).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qgate.core.physics import WINDOWS, body_mask, brisque_label, snr_label, ssim_map, window
from qgate.models.preprocess import ChestInputConfig, prepare_chest_input
from training.ct import LowDoseSimulator
from training.ct.fastsim import noise_basis, noise_sinograms
from training.ct.params import ScanParams
from training.datasets.randomized import (
    GEOMETRIES,
    OBJECT_MM,
    ROUTINE_EFF,
    RandomizedConfig,
    Source,
    _cache_bytes,
    block_files,
    clean_object,
    load_train_sources,
    texture_strength,
    write_blocks,
)

SOFT_KERNELS = ("smooth", "standard", "hamming")
LUNG_KERNELS = ("shepp-logan", "sharp")
# Scanners with clinical detector sampling (0.6-0.7 mm at the isocentre), where our photon
# budget gives routine clinical noise (docs/simulator.md): the dose class is noise relative
# to routine, so the coarse (binned) geometries, quieter at the same dose, are left out.
CHEST_GEOMETRIES = ("as-576v", "parallel")
# the patient on a 480 mm field (3.75 mm per input pixel) and the pixel spacing as a
# channel: the noise one dose gives depends on both (round 6)
CHEST_INPUT = ChestInputConfig(
    depth=6, extra_sigmas=(2.5,), fov_mm=480.0, pixel_channel=True, noise_stat="mad"
)


@dataclass(frozen=True)
class ChestDRConfig:
    n_blocks: int = 60
    depth: int = 6
    seed: int = 1
    # fractions of routine dose (ROUTINE_EFF of the simulator's photon budget)
    high: tuple[float, float] = (0.6, 1.6)
    low: tuple[float, float] = (0.12, 0.35)
    # doses drawn per class and kernel from the one noise realisation (stratified in
    # log dose): FBP is linear, so each extra dose costs a scaling, not a reconstruction
    doses_per_class: int = 1
    output_range: tuple[float, float] = (0.5, 1.6)
    pixels_mm: tuple[float, ...] = (0.6, 0.7, 0.8, 0.9, 1.0)
    p_phantom: float = 0.25
    p_chest: float = 0.75  # among real sources: a chest source (else any training source)
    val_fraction: float = 0.15
    brisque_slices: int = 2
    realct_dir: str = ".cache/realct"
    # routine dose as a fraction of the simulator's photon budget (round 9: 1.0, the issue's
    # full dose of ~3-4.5 HU added with a smooth kernel at 0.7 mm; earlier ROUTINE_EFF)
    routine: float = ROUTINE_EFF
    # soft-tissue kernels with their cutoff at this fraction (drawn) of the reconstruction
    # pixel's Nyquist, as clinical kernels are specified in lp/cm (None: the detector's
    # Nyquist, which at 0.9-1.0 mm pixels leaves a smooth kernel's noise nearly white)
    soft_cutoff: tuple[float, float] | None = None
    # share of real volumes made objects with a weaker denoise (bilateral at 0-1.5x their
    # noise, a quarter unfiltered), as ``RandomizedConfig.p_texture`` (round 13): the part
    # of the source's texture kept is structure, not noise, in the labels
    p_texture: float = 0.0


def _lung_fraction(sl: np.ndarray) -> float:
    body = sl > -500
    if body.sum() < 1000:
        return 0.0
    from scipy.ndimage import binary_fill_holes

    filled = binary_fill_holes(body)
    return float(((sl < -500) & filled).sum() / max(1, filled.sum()))


def _class_doses(
    rng: np.random.Generator,
    span: tuple[float, float],
    n: int,
    out_f: float,
    routine: float = ROUTINE_EFF,
) -> list[float]:
    """``n`` simulator doses for one class: one log-uniform draw in each of ``n`` equal
    log-dose strata of ``span`` (fractions of routine), divided by the tube output."""
    lo, hi = np.log(span[0]), np.log(span[1])
    edges = np.linspace(lo, hi, n + 1)
    return [routine * float(np.exp(rng.uniform(edges[i], edges[i + 1]))) / out_f for i in range(n)]


def soft_kernel(
    rng: np.random.Generator, cfg: ChestDRConfig, params: ScanParams, pixel_mm: float
) -> str:
    """A soft-tissue kernel: a window from :data:`SOFT_KERNELS`, or (``cfg.soft_cutoff``) a
    Hann / cosine / Hamming window whose cutoff is a drawn fraction of the reconstruction
    pixel's Nyquist, expressed on the detector's (capped at 1)."""
    if cfg.soft_cutoff is None:
        return str(rng.choice(SOFT_KERNELS))
    window = str(rng.choice(("hann", "cosine", "hamming")))
    frac = float(rng.uniform(*cfg.soft_cutoff)) * params.iso_pitch_mm / pixel_mm
    return f"{window}:{min(1.0, frac):.3f}"


def pick_volume(
    rng: np.random.Generator, sources: Sequence[Source], cfg: ChestDRConfig, split: str
) -> tuple[Source, int] | None:
    chest = [s for s in sources if "chest" in s.anatomy and s.hu.shape[0] >= cfg.depth + 4]
    pool = (
        chest
        if (chest and rng.random() < cfg.p_chest)
        else [s for s in sources if s.hu.shape[0] >= cfg.depth + 4]
    )
    for _ in range(40):
        src = pool[int(rng.integers(len(pool)))]
        z = src.hu.shape[0]
        cut = max(cfg.depth, round(z * cfg.val_fraction))
        lo, hi = (0, cut - cfg.depth + 1) if split == "val" else (cut, z - cfg.depth + 1)
        if hi <= lo:
            continue
        k = int(rng.integers(lo, hi))
        mid = src.hu[k + cfg.depth // 2]
        if (mid > -500).mean() < 0.05:
            continue
        if "chest" in src.anatomy and _lung_fraction(mid) < 0.05:
            continue
        return src, k
    return None


def build_block(
    index: int, cfg: ChestDRConfig, sources: Sequence[Source], sims: dict[str, LowDoseSimulator]
) -> dict[str, np.ndarray]:
    from training.anatomy.phantom import make_phantom_volume

    rng = np.random.default_rng([cfg.seed, index, 0xC4E5])
    split = "val" if rng.random() < cfg.val_fraction else "train"
    picked = None if rng.random() < cfg.p_phantom else pick_volume(rng, sources, cfg, split)
    if picked is None:
        pid = 7000 + int(rng.integers(0, 400)) + (10_000 if split == "val" else 0)
        vol = make_phantom_volume(
            pid, n_pixels=384, pixel_mm=OBJECT_MM, n_slices=cfg.depth, region="chest"
        )
        objects = vol.hu.astype(np.float32)
        name = f"phantom-{pid}"
    else:
        src, k = picked
        # own stream, so a recipe without texture draws everything else as before
        weak = texture_strength(np.random.default_rng([cfg.seed, index, 0x7E27]), cfg.p_texture)
        strength = 3.0 if weak is None else weak
        objects = np.stack(
            [
                clean_object(src.hu[k + i], src.spacing[1], real=True, strength=strength)
                for i in range(cfg.depth)
            ]
        )
        name = f"{src.name}:{k}" + ("" if weak is None else f":t{weak:.2f}")
    geo = str(rng.choice(CHEST_GEOMETRIES))
    base = GEOMETRIES[geo]
    out_f = float(np.exp(rng.uniform(*np.log(cfg.output_range))))
    params = base.with_(i0=base.i0 * out_f)
    sim = sims.get(geo)
    if sim is None:
        sim = sims[geo] = LowDoseSimulator(params, cache_bytes=_cache_bytes())
    sim.params = params
    px = float(rng.choice(cfg.pixels_mm))
    doses = [(1, d) for d in _class_doses(rng, cfg.high, cfg.doses_per_class, out_f, cfg.routine)]
    doses += [(0, d) for d in _class_doses(rng, cfg.low, cfg.doses_per_class, out_f, cfg.routine)]
    if cfg.soft_cutoff is None:  # the draw order of earlier recipes
        kernels = {0: str(rng.choice(SOFT_KERNELS)), 1: str(rng.choice(LUNG_KERNELS))}
    else:
        kernels = {0: soft_kernel(rng, cfg, params, px), 1: str(rng.choice(LUNG_KERNELS))}
    gen = sim.generator(int(rng.integers(2**31)))
    hu = torch.from_numpy(objects)
    # one projection and one noise realisation; both kernels reconstruct it
    line = sim.project(hu, OBJECT_MM)
    # read-out noise matters only at a few percent of routine dose, below both classes
    quantum, _ = noise_sinograms(sim, line, gen)
    noise = (quantum, torch.zeros_like(quantum))
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "x",
            "window_class",
            "dose_class",
            "snr",
            "brisque",
            "quality",
            "eff_dose",
            "noise_hu",
        )
    }
    for wc, kern in kernels.items():
        b = noise_basis(
            sim, line, noise, recon_n=512, recon_pixel_mm=px, kernel=kern, electronic=False
        )
        ref = b.clean
        body = (ref > -500).numpy()
        for dc, d in doses:
            v = b.at(d)
            x = prepare_chest_input(v, CHEST_INPUT, pixel_mm=px)[0]
            c, w = WINDOWS["lung" if wc else "mediastinum"]
            img = window(v, c, w)
            pick = np.linspace(0, cfg.depth - 1, cfg.brisque_slices).round().astype(int)
            bq = float(np.mean([brisque_label(img[i].numpy()) for i in pick]))
            sm = ssim_map(window(v, *WINDOWS["abdomen"]), window(ref, *WINDOWS["abdomen"]))
            soft = body & (ref.numpy() > -150) & (ref.numpy() < 150)
            cols["x"].append(x.half().numpy())
            cols["window_class"].append(wc)
            cols["dose_class"].append(dc)
            cols["snr"].append(snr_label(v.numpy(), body_mask(v.numpy())))
            cols["brisque"].append(bq)
            cols["quality"].append(float(sm.numpy()[body].mean()))
            cols["eff_dose"].append(d * out_f / cfg.routine)  # fraction of routine
            cols["noise_hu"].append(float((v - ref).numpy()[soft].std()) if soft.any() else 0.0)
    out = {k: np.asarray(v) for k, v in cols.items()}
    meta = {
        "split": split,
        "source": name,
        "geometry": geo,
        "pixel_mm": px,
        "kernels": kernels,
        "output": out_f,
    }
    out["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return out


def build_chest_dr(
    out: str | Path,
    cfg: ChestDRConfig,
    *,
    worker: tuple[int, int] = (0, 1),
    echo: Callable[[str], None] = print,
) -> int:
    root = Path(out)
    (root / "blocks").mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(
        json.dumps({**asdict(cfg), "input": asdict(CHEST_INPUT)}, indent=2)
    )
    sources = load_train_sources(RandomizedConfig(realct_dir=cfg.realct_dir))
    sims: dict[str, LowDoseSimulator] = {}
    return write_blocks(
        root,
        cfg.n_blocks,
        worker,
        lambda i: build_block(i, cfg, sources, sims),
        lambda i, data, secs: echo(
            f"chest block {i}: {secs:.0f} s, noise {np.round(data['noise_hu'], 1).tolist()}"
        ),
    )


def load_chest_blocks(
    roots: Sequence[str | Path], split: str, *, gains: bool = False
) -> dict[str, torch.Tensor]:
    """The volumes of one split; ``gains``: also ``kernel_gain`` (:func:`kernel_gain` of each
    volume's geometry, kernel and pixel) and ``chest`` (1 where a real chest source)."""
    cols: dict[str, list[np.ndarray]] = {}
    for root in roots:
        conf = Path(root) / "config.json"
        realct = json.loads(conf.read_text())["realct_dir"] if conf.exists() else ".cache/realct"
        for path in block_files(root):
            with np.load(path) as z:
                meta = json.loads(z["meta"].tobytes())
                if meta["split"] != split:
                    continue
                for k in z.files:
                    if k != "meta":
                        cols.setdefault(k, []).append(z[k])
                if gains:
                    wc = z["window_class"]
                    g = [
                        kernel_gain(
                            meta["geometry"], meta["kernels"][str(int(c))], meta["pixel_mm"]
                        )
                        for c in wc
                    ]
                    cols.setdefault("kernel_gain", []).append(np.asarray(g, np.float32))
                    h = kernel_gain(
                        meta["geometry"],
                        pixel_hann(meta["geometry"], meta["pixel_mm"]),
                        meta["pixel_mm"],
                    )
                    cols.setdefault("hann_gain", []).append(np.full(len(wc), h, np.float32))
                    src = meta["source"].split(":")[0]
                    chest = src in _chest_source_names(realct)
                    cols.setdefault("chest", []).append(np.full(len(wc), int(chest)))
    return {k: torch.from_numpy(np.concatenate(v)) for k, v in cols.items()}


@functools.cache
def _chest_source_names(realct: str) -> frozenset[str]:
    path = Path(realct) / "manifest.json"
    if not path.exists():
        return frozenset()
    return frozenset(
        e["name"] for e in json.loads(path.read_text())["sources"] if "chest" in e["anatomy"]
    )


@functools.cache
def _gain_simulator(geometry: str) -> LowDoseSimulator:
    return LowDoseSimulator(GEOMETRIES[geometry], device="cpu")


@functools.cache
def kernel_gain(geometry: str, kernel: str, pixel_mm: float) -> float:
    """HU of noise per unit of white sinogram noise (1e-3 per reading) that ``kernel`` gives at
    ``pixel_mm`` on ``geometry``: the kernel's (and pixel's) share of an image's noise, so
    that ``noise_hu / kernel_gain`` is the noise before the kernel (patient and dose)."""
    sim = _gain_simulator(geometry)
    p = sim.params
    white = torch.randn(1, p.n_views, p.n_det, generator=torch.Generator().manual_seed(0)) * 1e-3
    img = sim.reconstruct(white, pixel_mm, 256, kernel=kernel)[0] + 1000.0
    return float(img[64:192, 64:192].std())


def pixel_hann(geometry: str, pixel_mm: float) -> str:
    """A Hann window cut off at the pixel's Nyquist on ``geometry`` (capped at the
    detector's): the smooth kernel the issue's HU scale is stated for."""
    frac = min(1.0, GEOMETRIES[geometry].iso_pitch_mm / pixel_mm)
    return f"hann:{frac:.3f}"


def hann_equivalent_hu(noise_hu: float, geometry: str, kernel: str, pixel_mm: float) -> float:
    """The noise a slice would carry through a Hann at its pixel's Nyquist instead of
    ``kernel``, on the same scanner at the same dose (round 12). The ratio of two kernels'
    gains on one scanner is a property of the kernels (visible in the noise texture); the
    gain itself depends on the scanner's sampling (1.5x per reading between our fan and
    parallel scanners), which the pixels do not show."""
    return (
        noise_hu
        * kernel_gain(geometry, pixel_hann(geometry, pixel_mm), pixel_mm)
        / (kernel_gain(geometry, kernel, pixel_mm))
    )


# The issue's scale: full dose adds 3-4.5 HU with a smooth kernel at 0.7 mm, a quarter
# dose twice that; the class edge is their geometric middle, sqrt(3.75 x 7.5) = 5.3 HU,
# for a Hann kernel at the pixel's Nyquist on the clinical fan scanner.
ISSUE_EDGE_HU = 5.3
EDGE_KERNEL = ("as-576v", "hann:1.0", 0.7)


def noise_dose_classes(
    train: dict[str, torch.Tensor],
    *others: dict[str, torch.Tensor],
    at: float = 0.46,
    edge_hu: float | None = None,
    hann_equivalent: bool = False,
) -> float:
    """Relabel ``dose_class`` by noise relative to the kernel (round 9): ``high`` where
    ``noise_hu / kernel_gain`` is below what the median training chest gives at ``at`` of
    routine (the edge between the classes' dose spans), whatever the patient. The
    simulated dose class is relative to each patient's own routine, which the pixels show
    only through its size and attenuation; the issue defines dose as noise relative to the
    kernel. ``edge_hu``: the edge in HU of a Hann kernel (:data:`EDGE_KERNEL`) instead,
    e.g. :data:`ISSUE_EDGE_HU`. ``hann_equivalent`` (round 12): ``high`` where the noise
    through a Hann at the pixel's Nyquist (:func:`hann_equivalent_hu`) is below ``edge_hu``
    (default :data:`ISSUE_EDGE_HU`), whatever the scanner; the threshold returned is then
    in HU. Returns the threshold; ``train`` and ``others`` (loaded with ``gains=True``) are
    changed in place."""
    if hann_equivalent:
        edge = ISSUE_EDGE_HU if edge_hu is None else edge_hu
        for d in (train, *others):
            if len(d.get("noise_hu", [])):
                hu = d["noise_hu"].double() * d["hann_gain"].double() / d["kernel_gain"].double()
                d["dose_class"] = (hu < edge).long()
        return edge
    if edge_hu is not None:
        tau = edge_hu / kernel_gain(*EDGE_KERNEL)
    else:
        rel = train["noise_hu"].double() / train["kernel_gain"].double()
        routine = rel * train["eff_dose"].double().sqrt()
        ref = routine[train["chest"] == 1] if bool((train["chest"] == 1).any()) else routine
        tau = float(ref.median()) / math.sqrt(at)
    for d in (train, *others):
        if len(d.get("noise_hu", [])):
            d["dose_class"] = (d["noise_hu"].double() / d["kernel_gain"].double() < tau).long()
    return tau
