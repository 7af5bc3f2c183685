"""MD-IQA data: 512 x 512 slices degraded as LDCTIQAC2023 was (lower dose and fewer views),
each with a 0-4 score in steps of 0.2 from the score proxy (:mod:`training.datasets.score`).

Layout (the LDCTIQAC2023 layout plus our bookkeeping, so one reader serves both):

    DIR/image/0000.tif ...   float32 in [0, 1] for HU [-1000, 400]
    DIR/train.json           file name -> score, every labelled sample
    DIR/splits.json          split -> file names (train / val / test / unlabelled)
    DIR/samples.jsonl        one record per sample: patient, slice, dose, views, fidelity
    DIR/manifest.json        every parameter, the scanner, sources, splits, calibration

``unlabelled`` holds train-patient samples for MD-IQA's semi-supervised steps; their
proxy scores stay in ``samples.jsonl`` (for ablations) but not in ``train.json``.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.anatomy.ldctiqa import read_image, read_ldctiqa, write_image
from training.ct import LowDoseSimulator, ScanParams
from training.datasets.common import (
    SPLITS,
    Manifest,
    SourceConfig,
    patients_and_splits,
    plan_slices,
    prepare_out,
    same_geometry,
    sample_seed,
    source_slices,
    split_counts,
    write_build,
    write_jsonl,
)
from training.datasets.score import ANCHORS, ScoreProxy, fidelity, fidelity_region

Progress = Callable[[int], None]


@dataclass(frozen=True)
class MdiqaConfig:
    """How MD-IQA samples are made.

    ``per_slice`` degradations share one source slice (and its projection). Doses are
    log-uniform over ``dose_range``; a share ``p_sparse`` of samples also drops views
    (every k-th kept, k from ``view_steps``); a share ``p_reference`` stays at full dose
    and all views (score 4). ``unlabelled_fraction`` of the train samples go to the
    ``unlabelled`` split instead.
    """

    n: int = 1000
    seed: int = 0
    size: int = 512
    pixel_mm: float = 0.7  # phantom pixel size (real scans keep their field of view)
    per_slice: int = 4
    # Chosen so that the proxy scores come out about evenly over 0.5-4 (docs/simulator.md).
    dose_range: tuple[float, float] = (0.05, 1.0)
    p_sparse: float = 0.35
    view_steps: tuple[int, ...] = (2, 3, 4, 6, 8)
    p_reference: float = 0.05
    kernel: str = "standard"
    fast: bool = False  # 2x binned scanner: 4x less work, coarser resolution
    batch: int = 2
    unlabelled_fraction: float = 0.0
    region: str | None = None  # phantom slices: "chest", "abdomen" or anywhere

    def scanner(self, pixel_mm: float) -> ScanParams:
        """The default scanner for this pixel size (binned for coarse pixels), 2x more
        binned when ``fast``."""
        base = ScanParams.for_pixel_size(pixel_mm * (2 if self.fast else 1), kernel=self.kernel)
        return base


def draw_degradation(rng: np.random.Generator, cfg: MdiqaConfig) -> tuple[float, int]:
    """(dose fraction, views step) for one sample."""
    if rng.random() < cfg.p_reference:
        return 1.0, 1
    lo, hi = cfg.dose_range
    dose = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    step = int(rng.choice(cfg.view_steps)) if rng.random() < cfg.p_sparse else 1
    return round(dose, 4), step


def build_mdiqa(
    out: str | Path,
    cfg: MdiqaConfig,
    sources: SourceConfig,
    *,
    proxy: ScoreProxy | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    """Build an MD-IQA dataset in ``out``; returns its manifest."""
    proxy = proxy or ScoreProxy()
    root = prepare_out(out, overwrite)
    (root / "image").mkdir()
    rng = np.random.default_rng([cfg.seed, 0x3D1])
    patients, pmap, splits = patients_and_splits(sources, cfg.seed)
    n_groups = math.ceil(cfg.n / cfg.per_slice)
    plan = plan_slices(
        patients,
        splits,
        split_counts(n_groups),
        rng=rng,
        real_fraction=sources.real_fraction,
        region=cfg.region,
    )
    sims: dict[float, LowDoseSimulator] = {}

    records: list[dict[str, Any]] = []
    labels: dict[str, float] = {}
    split_files: dict[str, list[str]] = {s: [] for s in (*SPLITS, "unlabelled")}
    count = 0
    # group by (real or phantom) so each batch has one pixel size and one noise path
    order = sorted(range(len(plan)), key=lambda i: (plan[i].patient_id.startswith("phantom"), i))
    for b0 in range(0, len(order), cfg.batch):
        refs = [plan[i] for i in order[b0 : b0 + cfg.batch]]
        slices, pxs, noiseless = [], [], []
        for ref in refs:
            hu, px, nl = source_slices(ref, pmap, n_out=cfg.size, pixel_mm_phantom=cfg.pixel_mm)
            slices.append(hu[0])
            pxs.append(px)
            noiseless.append(nl)
        # a batch mixes real and phantom only at the boundary; split it there
        for sub in same_geometry(pxs, noiseless):
            hu = torch.tensor(np.stack([slices[i] for i in sub]))
            px, nl = pxs[sub[0]], noiseless[sub[0]]
            sim = sims.get(round(px, 4))
            if sim is None:
                sim = sims[round(px, 4)] = LowDoseSimulator(cfg.scanner(px), device=device)
            scanner = sim.params
            g = sim.generator(sample_seed(cfg.seed, refs[sub[0]].key()))
            line = sim.project(hu, px)
            if nl:
                line = sim.acquire(line, 1.0, g)
            ref_img = sim.reconstruct(line, px, cfg.size)
            region = fidelity_region(ref_img.cpu().numpy())
            for j in range(cfg.per_slice):
                if count >= cfg.n:
                    break
                dose, step = draw_degradation(rng, cfg)
                low = sim.reconstruct(sim.reduce_dose(line, dose, g), px, cfg.size, views_step=step)
                fid = fidelity(low, ref_img, region)
                sd = (low - ref_img).cpu().numpy()
                for k, i in enumerate(sub):
                    if count >= cfg.n:
                        break
                    ref = refs[i]
                    name = f"{count:04d}.tif"
                    write_image(root / "image" / name, low[k].cpu().numpy())
                    score = float(proxy(fid[k]))
                    split = ref.split
                    if split == "train" and rng.random() < cfg.unlabelled_fraction:
                        split = "unlabelled"
                    else:
                        labels[name] = score
                    split_files[split].append(name)
                    records.append(
                        {
                            "name": name,
                            "split": split,
                            "patient": ref.patient_id,
                            "source": ref.key(),
                            "dose": dose,
                            "views_step": step,
                            "n_views": scanner.n_views // step,
                            "kernel": cfg.kernel,
                            "pixel_mm": px,
                            "fidelity": round(float(fid[k]), 5),
                            "score": score,
                            "degradation": j,
                            "noise_sd_hu": round(float(sd[k][region[k]].std()), 2)
                            if region[k].any()
                            else None,
                        }
                    )
                    count += 1
                    if progress:
                        progress(1)
    (root / "train.json").write_text(json.dumps(labels, indent=1) + "\n")
    (root / "splits.json").write_text(json.dumps(split_files, indent=1) + "\n")
    return write_build(
        root,
        task="mdiqa",
        cfg=cfg,
        sims=sims,
        sources=sources,
        patients=patients,
        splits=splits,
        records=records,
        counts={s: len(v) for s, v in split_files.items()},
        labels={
            "score": "proxy score in [0, 4], steps of 0.2, higher is better",
            "proxy": proxy.to_dict(),
            "anchors": [list(a) for a in ANCHORS],
            "fidelity": "mean SSIM vs full-dose all-views FBP, abdominal window C40/W400, "
            "visible soft tissue (training.datasets.score)",
            "image": "float32 TIFF in [0, 1] for HU [-1000, 400] (LDCTIQAC2023 scale)",
        },
        files={
            "images": "image/",
            "labels": "train.json",
            "splits": "splits.json",
            "samples": "samples.jsonl",
        },
    )


# ---------------------------------------------------------------------- reading
class MdiqaDataset(torch.utils.data.Dataset):
    """A split of an MD-IQA folder (ours or LDCTIQAC2023): ((1, H, W) in [0, 1], score).

    Samples without a score (the ``unlabelled`` split, or unlabelled challenge images)
    return ``nan``.
    """

    def __init__(self, root: str | Path, split: str | None = None) -> None:
        self.root = Path(root)
        items = {it.name: it for it in read_ldctiqa(self.root)}
        names = sorted(items)
        splits_file = self.root / "splits.json"
        if split is not None:
            if not splits_file.exists():
                raise FileNotFoundError(f"{splits_file} is missing; pass split=None")
            names = json.loads(splits_file.read_text())[split]
        self.items = [items[n] for n in names]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, float]:
        it = self.items[i]
        hu = read_image(it.path)
        x = torch.from_numpy((hu + 1000.0) / 1400.0).clamp(0, 1)[None]
        return x, float("nan") if it.score is None else it.score


def import_ldctiqa(
    src: str | Path, out: str | Path, *, seed: int = 0, overwrite: bool = False
) -> Manifest:
    """Copy an LDCTIQAC2023 folder into our MD-IQA layout with seeded splits.

    The challenge does not say which images share a patient, so this split is by image,
    not by patient (the manifest says so): expect optimistic test numbers.
    """
    items = read_ldctiqa(src)
    if not items:
        raise ValueError(f"no images in {src}/image")
    root = prepare_out(out, overwrite)
    (root / "image").mkdir()
    rng = np.random.default_rng([seed, 0x1DC7])
    labelled = [it for it in items if it.score is not None]
    order = rng.permutation(len(labelled))
    cuts = split_counts(len(labelled))
    split_files: dict[str, list[str]] = {s: [] for s in (*SPLITS, "unlabelled")}
    start = 0
    for s in SPLITS:
        split_files[s] = sorted(labelled[i].name for i in order[start : start + cuts[s]])
        start += cuts[s]
    split_files["unlabelled"] = [it.name for it in items if it.score is None]
    for it in items:
        shutil.copy2(it.path, root / "image" / it.name)
    labels = {it.name: it.score for it in labelled}
    (root / "train.json").write_text(json.dumps(labels, indent=1) + "\n")
    (root / "splits.json").write_text(json.dumps(split_files, indent=1) + "\n")
    write_jsonl(
        root / "samples.jsonl",
        [
            {
                "name": it.name,
                "score": it.score,
                "split": next(s for s, v in split_files.items() if it.name in v),
            }
            for it in items
        ],
    )
    manifest = Manifest(
        task="mdiqa",
        seed=seed,
        n_samples=len(items),
        params={"imported_from": str(src)},
        scanner={},
        sources={"ldctiqa": str(src), "patient_level": False},
        splits={},
        counts={s: len(v) for s, v in split_files.items()},
        labels={"score": "LDCTIQAC2023 mean radiologist score in [0, 4]"},
        extra={"warning": "split by image, not by patient: the challenge gives no patient ids"},
    )
    manifest.write(root)
    return manifest
