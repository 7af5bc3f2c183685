"""Chest CT-IQA data: short 3-D chest volumes, each with the four labels of the paper.

* window / kernel class: ``lung`` = sharp kernel, lung-window tags (C-600 / W1500);
  ``soft`` = smooth kernel, mediastinal-window tags (C40 / W400). The kernel is what the
  image itself carries; the tags are stored with it (``window``).
* dose class: ``low`` / ``high`` tube current, 30 and 50 mAs as in the paper, as dose
  fractions of an assumed reference of ``ref_mas`` (100 mAs) for the sources' full dose.
* SNR: :func:`qgate.core.physics.snr_label` on the simulated HU volume, inside the body.
* BRISQUE: :func:`qgate.core.physics.brisque_label` (the ``brisque`` package, offline) on
  slices rendered in the series' own window, averaged over ``brisque_slices`` slices.

Volumes are simulated at native resolution (``sim_size`` 512 at 0.7 mm, the full
scanner): the dose and kernel classes live in the fine noise texture, which a volume
simulated at 128 pixels does not have (its high-pass RMS is ~10x lower). SNR and BRISQUE
are computed at native resolution, as on a real series. What is stored is small:

* ``hu`` (int16, (D, size, size)): the volume resized like the model input
  (:func:`qgate.core.physics.resize`);
* ``hp_rms`` (float16, (D, size, size)): the RMS of the native-resolution high-pass
  (:func:`qgate.core.physics.high_pass`, sigma 1 px) over each output pixel,
  :func:`qgate.core.physics.local_rms` - the noise channel of
  ``qgate.models.preprocess.prepare_chest_input`` computed where it must be, before the
  downsampling;
* ``image`` (float16, ``hu`` windowed to [0, 1] with the series' tags), ``window_class``
  (0 soft, 1 lung), ``dose_class`` (0 low, 1 high), ``snr``, ``brisque``, ``window``
  (centre, width), ``dose``.

Every source volume gives all four (window, dose) combinations, so the classes are
balanced. Also ``samples.jsonl`` and ``manifest.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qgate.core.physics import (
    WINDOWS,
    body_mask,
    brisque_label,
    high_pass,
    local_rms,
    resize,
    snr_label,
    window,
)
from training.ct import LowDoseSimulator, ScanParams
from training.datasets.common import (
    Manifest,
    ShardWriter,
    SourceConfig,
    patients_and_splits,
    plan_slices,
    prepare_out,
    sample_seed,
    source_slices,
    split_counts,
    write_build,
)

Progress = Callable[[int], None]

SERIES = {  # window class -> (kernel, window tags)
    "soft": ("smooth", WINDOWS["mediastinum"]),
    "lung": ("sharp", WINDOWS["lung"]),
}
WINDOW_CLASSES = ("soft", "lung")
DOSE_CLASSES = ("low", "high")


@dataclass(frozen=True)
class ChestConfig:
    n: int = 800
    seed: int = 0
    size: int = 128
    # Simulate at this size (native: what the service is fed), then resize to ``size``.
    # None simulates at ``size`` directly: fast, for pipeline tests, but its noise does not
    # match a resized native image (see the module docstring).
    sim_size: int | None = 512
    depth: int = 32
    slice_mm: float = 2.5  # phantom slice spacing (real volumes keep theirs)
    pixel_mm: float = 2.8  # phantom pixel of the stored ``size`` image (358 mm field)
    ref_mas: float = 100.0
    mas: tuple[float, float] = (30.0, 50.0)  # low, high
    snr_block: tuple[int, int, int] = (4, 16, 16)
    brisque_slices: int = 4
    shard_size: int = 64

    @property
    def sim_n(self) -> int:
        return self.sim_size or self.size

    @property
    def sim_pixel_mm(self) -> float:
        """Phantom pixel size at the simulation size (same field of view)."""
        return self.pixel_mm * self.size / self.sim_n

    def doses(self) -> tuple[float, float]:
        lo, hi = (min(1.0, m / self.ref_mas) for m in self.mas)
        return lo, hi


def build_chest(
    out: str | Path,
    cfg: ChestConfig,
    sources: SourceConfig,
    *,
    device: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    root = prepare_out(out, overwrite)
    rng = np.random.default_rng([cfg.seed, 0xC4E5])
    patients, pmap, splits = patients_and_splits(sources, cfg.seed)
    per = len(WINDOW_CLASSES) * len(DOSE_CLASSES)
    plan = plan_slices(
        patients,
        splits,
        split_counts(-(-cfg.n // per)),
        rng=rng,
        real_fraction=sources.real_fraction,
        depth=cfg.depth,
        region="chest",
    )
    sims: dict[float, LowDoseSimulator] = {}
    writer = ShardWriter(root, cfg.shard_size)
    doses = cfg.doses()
    records: list[dict[str, Any]] = []
    count = 0
    for ref in plan:
        if count >= cfg.n:
            break
        hu, px, nl = source_slices(
            ref,
            pmap,
            n_out=cfg.sim_n,
            pixel_mm_phantom=cfg.sim_pixel_mm,
            depth=cfg.depth,
            slice_mm=cfg.slice_mm,
        )
        sim = sims.get(round(px, 4))
        if sim is None:
            sim = sims[round(px, 4)] = LowDoseSimulator(
                ScanParams.for_pixel_size(px), device=device
            )
        g = sim.generator(sample_seed(cfg.seed, ref.key()))
        line = sim.project(torch.tensor(hu), px)
        if nl:
            line = sim.acquire(line, 1.0, g)
        body = None
        for wc, wname in enumerate(WINDOW_CLASSES):
            kernel, (center, width) = SERIES[wname]
            for dc, dname in enumerate(DOSE_CLASSES):
                if count >= cfg.n:
                    break
                native = sim.reconstruct(
                    sim.reduce_dose(line, doses[dc], g), px, cfg.sim_n, kernel=kernel
                )
                v = native.cpu().numpy()
                if body is None:
                    body = body_mask(v)
                # labels on the native series, as they would be on a real one
                snr = snr_label(v, body, block=cfg.snr_block)
                native_img = window(native, center, width)
                pick = np.linspace(0, cfg.depth - 1, num=min(cfg.brisque_slices, cfg.depth))
                bq = float(
                    np.mean([brisque_label(native_img[int(i)].cpu().numpy()) for i in pick.round()])
                )
                vol = resize(native, cfg.size)
                img = window(vol, center, width)
                hp_rms = local_rms(high_pass(native), cfg.size)
                writer.add(
                    ref.split,
                    {
                        "hu": vol.round().clamp(-32768, 32767).to(torch.int16),
                        "image": img.to(torch.float16),
                        "hp_rms": hp_rms.to(torch.float16),
                        "window_class": torch.tensor(wc, dtype=torch.int64),
                        "dose_class": torch.tensor(dc, dtype=torch.int64),
                        "snr": torch.tensor(snr, dtype=torch.float32),
                        "brisque": torch.tensor(bq, dtype=torch.float32),
                        "window": torch.tensor([center, width], dtype=torch.float32),
                        "dose": torch.tensor(doses[dc], dtype=torch.float32),
                    },
                )
                records.append(
                    {
                        "index": count,
                        "split": ref.split,
                        "patient": ref.patient_id,
                        "source": ref.key(),
                        "window_class": wname,
                        "kernel": kernel,
                        "window": [center, width],
                        "dose_class": dname,
                        "dose": doses[dc],
                        "mas": cfg.mas[dc],
                        "snr": round(snr, 4),
                        "brisque": round(bq, 3),
                        "pixel_mm": px * cfg.sim_n / cfg.size,
                        "sim_pixel_mm": px,
                        "depth": cfg.depth,
                    }
                )
                count += 1
                if progress:
                    progress(1)
    writer.close()
    return write_build(
        root,
        task="chest",
        cfg=cfg,
        sims=sims,
        sources=sources,
        patients=patients,
        splits=splits,
        records=records,
        labels={
            "window_class": {
                "0": "soft: smooth kernel, C40/W400",
                "1": "lung: sharp kernel, C-600/W1500",
            },
            "dose_class": {"0": f"low: {cfg.mas[0]:g} mAs", "1": f"high: {cfg.mas[1]:g} mAs"},
            "dose_fraction": {
                "low": doses[0],
                "high": doses[1],
                "assumed_reference_mas": cfg.ref_mas,
            },
            "snr": f"median over body sub-volumes {cfg.snr_block} of mean/std of HU+1000, "
            "on the native-resolution volume",
            "hp_rms": "RMS over each output pixel of high_pass(native HU, sigma 1 px), HU",
            "resolution": f"simulated at {cfg.sim_n} px, resized to {cfg.size}",
            "brisque": f"brisque package, windowed uint8 RGB, mean of {cfg.brisque_slices} "
            "slices; lower is better",
        },
        files={"shards": writer.files, "samples": "samples.jsonl"},
    )
