"""Chest CT-IQA data, domain-randomised (issue 10): short chest volumes through many scanners.

Each sample is ``depth`` contiguous slices of a training source (chest slices preferred:
lung inside the body), made noiseless as in :mod:`training.datasets.randomized`, projected
once through a random geometry, and reconstructed at 512 x 512 (0.6-0.8 mm, a chest field)
with **both** kernel classes and at **two** doses from one noise realisation:

* window / kernel class: ``soft_tissue`` = a smooth kernel (Hann 0.7, cosine, Hamming),
  ``lung`` = a sharp one (Shepp-Logan, ramp): read from the noise texture;
* dose class: ``high`` = effective dose (dose x tube output) 0.6-1.6 of routine, ``low`` =
  0.12-0.35 (the quarter-dose scans of the issue), so the class is the noise relative to
  what that kernel and patient give at routine dose; routine is
  :data:`~training.datasets.randomized.ROUTINE_EFF` of the simulator's photon budget
  (calibrated to the noise of real training scans).

What is stored is the model input itself (:func:`qgate.models.preprocess.prepare_chest_input`
with the config given, computed on the native 512 reconstruction), the class labels, the
SNR (:func:`qgate.core.physics.snr_label`) and BRISQUE (the class's display window) labels of
the native series, and the quality proxy: the mean SSIM (C40/W400) over the body against
the noiseless same-kernel reconstruction. Blocks as in the randomised builder
(``blocks/NNNNN.npz``, resumable, ``--worker i/n``).
"""

from __future__ import annotations

import json
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
from training.datasets.randomized import (
    GEOMETRIES,
    OBJECT_MM,
    ROUTINE_EFF,
    RandomizedConfig,
    Source,
    _cache_bytes,
    clean_object,
    load_train_sources,
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


def _lung_fraction(sl: np.ndarray) -> float:
    body = sl > -500
    if body.sum() < 1000:
        return 0.0
    from scipy.ndimage import binary_fill_holes

    filled = binary_fill_holes(body)
    return float(((sl < -500) & filled).sum() / max(1, filled.sum()))


def _class_doses(
    rng: np.random.Generator, span: tuple[float, float], n: int, out_f: float
) -> list[float]:
    """``n`` simulator doses for one class: one log-uniform draw in each of ``n`` equal
    log-dose strata of ``span`` (fractions of routine), divided by the tube output."""
    lo, hi = np.log(span[0]), np.log(span[1])
    edges = np.linspace(lo, hi, n + 1)
    return [
        ROUTINE_EFF * float(np.exp(rng.uniform(edges[i], edges[i + 1]))) / out_f for i in range(n)
    ]


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
        objects = np.stack(
            [clean_object(src.hu[k + i], src.spacing[1], real=True) for i in range(cfg.depth)]
        )
        name = f"{src.name}:{k}"
    geo = str(rng.choice(CHEST_GEOMETRIES))
    base = GEOMETRIES[geo]
    out_f = float(np.exp(rng.uniform(*np.log(cfg.output_range))))
    params = base.with_(i0=base.i0 * out_f)
    sim = sims.get(geo)
    if sim is None:
        sim = sims[geo] = LowDoseSimulator(params, cache_bytes=_cache_bytes())
    sim.params = params
    px = float(rng.choice(cfg.pixels_mm))
    doses = [(1, d) for d in _class_doses(rng, cfg.high, cfg.doses_per_class, out_f)]
    doses += [(0, d) for d in _class_doses(rng, cfg.low, cfg.doses_per_class, out_f)]
    kernels = {0: str(rng.choice(SOFT_KERNELS)), 1: str(rng.choice(LUNG_KERNELS))}
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
            v = b.at(min(d, 1.5))
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
            cols["eff_dose"].append(d * out_f / ROUTINE_EFF)  # fraction of routine
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


def load_chest_blocks(roots: Sequence[str | Path], split: str) -> dict[str, torch.Tensor]:
    cols: dict[str, list[np.ndarray]] = {}
    for root in roots:
        for path in sorted((Path(root) / "blocks").glob("[0-9]*.npz")):
            with np.load(path) as z:
                if json.loads(z["meta"].tobytes())["split"] != split:
                    continue
                for k in z.files:
                    if k != "meta":
                        cols.setdefault(k, []).append(z[k])
    return {k: torch.from_numpy(np.concatenate(v)) for k, v in cols.items()}


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="domain-randomised Chest CT-IQA data")
    ap.add_argument("out")
    ap.add_argument("--blocks", type=int, default=ChestDRConfig.n_blocks)
    ap.add_argument("--worker", default="0/1")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    w, n = (int(v) for v in a.worker.split("/"))
    print(f"made {build_chest_dr(a.out, ChestDRConfig(n_blocks=a.blocks), worker=(w, n))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
