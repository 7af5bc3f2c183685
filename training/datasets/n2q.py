"""Noise2Quality data: each source slice at 5 doses (5, 10, 25, 50, 75 %), each sample with
the low-dose image, its high-pass image, the SSIM map against full dose and the dose class.

As the paper and its notebook: window centre 40 / width 300 to [0, 1]; 256 x 256; SSIM
map with an 11 x 11 Gaussian window, sigma 1.5, K = (0.01, 0.03), data range 1, between
the full-dose and the low-dose windowed images (:func:`qgate.core.physics.ssim_map`); high-pass
``I - up(down(blur(I)))`` (:func:`qgate.core.physics.high_pass`). Unlike the paper, every dose
is simulated in the projection domain rather than by scaling a quarter-dose noise image.

The model reads a slice at its own pixel grid (``N2QInputConfig.size=None``: no resize
in training or serving), so by default (``sim_size=None``) each slice is reconstructed
directly at the stored ``size`` with the scanner for that pixel size: the stored image is
a native reconstruction, its noise the noise such a scan has at that pixel size. With
``sim_size`` set, slices are simulated at ``sim_size`` and then resized to ``size``
(:func:`qgate.core.physics.resize`: window, then anti-aliased bilinear), as the first model
version's input was; that is *not* a native image (a resized 512 image keeps 35 %
(standard kernel) to 100 % (smooth) more noise than a 256 reconstruction), so pair it
only with a model that resizes (``N2QInputConfig.size``).

Layout: ``{split}-NNNNN.safetensors`` shards with ``hu`` (int16 HU), ``image``, ``hpf``,
``ssim`` (float16, (256, 256)), ``dose_class`` (int64, index into ``doses``) and
``dose`` (float32); ``samples.jsonl``; ``manifest.json``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qgate.core.physics import WINDOWS, high_pass, resize, ssim_map, window
from training.ct import LowDoseSimulator, ScanParams
from training.datasets.common import (
    Manifest,
    ShardWriter,
    SourceConfig,
    patients_and_splits,
    plan_slices,
    prepare_out,
    same_geometry,
    sample_seed,
    source_slices,
    split_counts,
    write_build,
)

Progress = Callable[[int], None]


@dataclass(frozen=True)
class N2QConfig:
    n: int = 2500
    seed: int = 0
    size: int = 256
    # None (default): reconstruct at ``size`` directly, a native image for the native-grid
    # model. An int: simulate at this size, then resize to ``size`` (for a model that
    # resizes its input; see the module docstring).
    sim_size: int | None = None
    pixel_mm: float = 1.4  # phantom pixel of the stored ``size`` image (358 mm field)
    doses: tuple[float, ...] = (0.05, 0.10, 0.25, 0.50, 0.75)
    kernel: str = "standard"
    hpf_sigma: float = 1.0
    hpf_factor: int = 2
    batch: int = 8
    shard_size: int = 256
    region: str | None = "abdomen"  # the paper's data are abdominal

    @property
    def sim_n(self) -> int:
        return self.sim_size or self.size

    @property
    def sim_pixel_mm(self) -> float:
        """Phantom pixel size at the simulation size (same field of view)."""
        return self.pixel_mm * self.size / self.sim_n

    def scanner(self, pixel_mm: float) -> ScanParams:
        return ScanParams.for_pixel_size(pixel_mm, kernel=self.kernel)


def build_n2q(
    out: str | Path,
    cfg: N2QConfig,
    sources: SourceConfig,
    *,
    device: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    root = prepare_out(out, overwrite)
    rng = np.random.default_rng([cfg.seed, 0x2A2])
    patients, pmap, splits = patients_and_splits(sources, cfg.seed)
    per = len(cfg.doses)
    plan = plan_slices(
        patients,
        splits,
        split_counts(math.ceil(cfg.n / per)),
        rng=rng,
        real_fraction=sources.real_fraction,
        region=cfg.region,
    )
    sims: dict[float, LowDoseSimulator] = {}
    writer = ShardWriter(root, cfg.shard_size)
    c, w = WINDOWS["n2q"]
    records: list[dict[str, Any]] = []
    count = 0
    order = sorted(range(len(plan)), key=lambda i: (plan[i].patient_id.startswith("phantom"), i))
    for b0 in range(0, len(order), cfg.batch):
        refs = [plan[i] for i in order[b0 : b0 + cfg.batch]]
        got = [
            source_slices(r, pmap, n_out=cfg.sim_n, pixel_mm_phantom=cfg.sim_pixel_mm) for r in refs
        ]
        for sub in same_geometry([g[1] for g in got], [g[2] for g in got]):
            px, nl = got[sub[0]][1], got[sub[0]][2]
            sim = sims.get(round(px, 4))
            if sim is None:
                sim = sims[round(px, 4)] = LowDoseSimulator(cfg.scanner(px), device=device)
            hu = torch.tensor(np.stack([got[i][0][0] for i in sub]))
            g = sim.generator(sample_seed(cfg.seed, refs[sub[0]].key()))
            line = sim.project(hu, px)
            if nl:
                line = sim.acquire(line, 1.0, g)
            full_w = resize(window(sim.reconstruct(line, px, cfg.sim_n), c, w), cfg.size)
            for cls, dose in enumerate(cfg.doses):
                native = sim.reconstruct(sim.reduce_dose(line, dose, g), px, cfg.sim_n)
                low_w = resize(window(native, c, w), cfg.size)  # as the model input is made
                low = resize(native, cfg.size)
                smap = ssim_map(low_w, full_w)  # SSIM symmetric in its arguments
                hp = high_pass(low_w, sigma=cfg.hpf_sigma, factor=cfg.hpf_factor)
                for k, i in enumerate(sub):
                    if count >= cfg.n:
                        break
                    ref = refs[i]
                    writer.add(
                        ref.split,
                        {
                            "hu": low[k].round().clamp(-32768, 32767).to(torch.int16),
                            "image": low_w[k].to(torch.float16),
                            "hpf": hp[k].to(torch.float16),
                            "ssim": smap[k].to(torch.float16),
                            "dose_class": torch.tensor(cls, dtype=torch.int64),
                            "dose": torch.tensor(dose, dtype=torch.float32),
                        },
                    )
                    records.append(
                        {
                            "index": count,
                            "split": ref.split,
                            "patient": ref.patient_id,
                            "source": ref.key(),
                            "dose": dose,
                            "dose_class": cls,
                            "pixel_mm": px * cfg.sim_n / cfg.size,
                            "sim_pixel_mm": px,
                            "mean_ssim": round(float(smap[k].mean()), 5),
                        }
                    )
                    count += 1
                    if progress:
                        progress(1)
    writer.close()
    return write_build(
        root,
        task="n2q",
        cfg=cfg,
        sims=sims,
        sources=sources,
        patients=patients,
        splits=splits,
        records=records,
        labels={
            "image": f"low-dose slice, window C{c:g}/W{w:g} -> [0, 1]",
            "hpf": f"high_pass(image, sigma={cfg.hpf_sigma}, factor={cfg.hpf_factor})",
            "ssim": "SSIM map vs full dose: Gaussian 11x11 sigma 1.5, K=(0.01, 0.03), "
            "data range 1 on the windowed images",
            "dose_class": {str(i): d for i, d in enumerate(cfg.doses)},
            "hu": "the low-dose slice in HU (int16), resized like the image",
            "resolution": f"simulated at {cfg.sim_n} px, resized to {cfg.size} "
            "(qgate.core.physics.resize: anti-aliased bilinear) after windowing",
        },
        files={"shards": writer.files, "samples": "samples.jsonl"},
    )
