"""Loading built datasets into memory for training, and the augmentations.

The datasets are small (hundreds of samples), so each split is read once into tensors and
batches are drawn by index with a generator seeded by (seed, epoch): a resumed run draws
exactly the batches the interrupted one would have.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qgate.models.mdiqa import (
    MDIQADataConfig,
    body_frame,
    mdiqa_channels,
    mdiqa_crops,
    mdiqa_preprocess,
    mdiqa_random_crops,
)

__all__ = [
    "MdiqaSplit",
    "epoch_batches",
    "epoch_generator",
    "flip_rot",
    "load_mdiqa_folder",
    "load_mdiqa_split",
]


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) * 7919 + salt)


def epoch_batches(
    n: int, batch_size: int, g: torch.Generator, *, drop_last: bool = True
) -> list[torch.Tensor]:
    """Shuffled index batches over ``n`` samples (the last partial one dropped by default,
    unless that would leave no batch at all)."""
    perm = torch.randperm(n, generator=g)
    out = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and len(out) > 1 and len(out[-1]) < batch_size:
        out = out[:-1]
    return out


def steps_per_epoch(n: int, batch_size: int) -> int:
    full = n // batch_size
    return max(1, full) if n >= batch_size else 1 if n else 0


def flip_rot(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 90-degree rotation and left-right flip of each sample (last two axes)."""
    k = torch.randint(0, 4, (len(x),), generator=g).tolist()
    f = torch.randint(0, 2, (len(x),), generator=g).tolist()
    out = torch.empty_like(x)
    for i in range(len(x)):
        xi = x[i].flip(-1) if f[i] else x[i]
        out[i] = torch.rot90(xi, k[i], dims=(-2, -1))
    return out


# ------------------------------------------------------------------------------ MD-IQA
@dataclass
class MdiqaSplit:
    """One split of an MD-IQA folder, preprocessed for a model.

    ``x``: (N, C, S, S) one model input per slice (:func:`mdiqa_preprocess`: the crop at
    the body's centroid); ``crops``: (N, n, C, S, S) the crops a slice is scored from
    (:func:`mdiqa_crops`, the worker's policy); ``y``: (N,) labels (NaN where unlabelled);
    ``proxy``: (N,) the builder's proxy score from ``samples.jsonl`` (NaN if unknown; for
    diagnostics of the unlabelled split only, never trained on); ``records``: the
    ``samples.jsonl`` rows (empty for a challenge folder). ``channels`` (N, C, H, W,
    float16), ``centre`` and ``spread`` (N, 2): the whole windowed slices and their body
    frame, for random training crops (:func:`mdiqa_random_crops`); ``None`` for the
    ``"resize"`` input.
    """

    names: list[str]
    x: torch.Tensor
    y: torch.Tensor
    proxy: torch.Tensor
    records: list[dict[str, object]]
    crops: torch.Tensor | None = None
    channels: torch.Tensor | None = None
    centre: torch.Tensor | None = None
    spread: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def scored(self) -> torch.Tensor:
        """What a slice is scored from: ``crops`` (N, n, C, S, S) when present, else ``x``."""
        return self.crops if self.crops is not None else self.x

    def random_crops(self, idx: torch.Tensor, g: torch.Generator, size: int) -> torch.Tensor:
        """Training inputs for samples ``idx``: a random native crop each (or ``x``)."""
        if self.channels is None or self.centre is None or self.spread is None:
            return self.x[idx]
        return mdiqa_random_crops(
            self.channels[idx].float(), self.centre[idx], self.spread[idx], size, g
        )


@dataclass
class _Prepared:
    x: torch.Tensor
    crops: torch.Tensor | None
    channels: torch.Tensor | None
    centre: torch.Tensor | None
    spread: torch.Tensor | None


def _preprocess_files(paths: list[Path], data_cfg: MDIQADataConfig) -> _Prepared:
    from training.anatomy.ldctiqa import read_image

    s, c = data_cfg.img_size, data_cfg.in_chans
    native = data_cfg.crop_mode != "resize"  # "native" or "grid": crops at the native grid
    xs, crops, chans, centres, spreads = [], [], [], [], []
    for p in paths:
        # HU (clipped to the challenge's [-1000, 400] by the file format), then the model's
        # own preprocessing from its config: the functions the service runs.
        hu = torch.from_numpy(read_image(p))[None]
        xs.append(mdiqa_preprocess(hu, data_cfg)[0])
        if native:
            crops.append(mdiqa_crops(hu, data_cfg)[0])
            chans.append(mdiqa_channels(hu, data_cfg)[0].half())
            centre, spread = body_frame(hu)
            centres.append(centre[0])
            spreads.append(spread[0])
    if not xs:
        return _Prepared(torch.empty(0, c, s, s), None, None, None, None)
    if not native:
        return _Prepared(torch.stack(xs), None, None, None, None)
    return _Prepared(
        torch.stack(xs),
        torch.stack(crops),
        torch.stack(chans) if len({t.shape for t in chans}) == 1 else None,
        torch.stack(centres),
        torch.stack(spreads),
    )


def load_mdiqa_split(root: str | Path, split: str, data_cfg: MDIQADataConfig) -> MdiqaSplit:
    """Split ``split`` of an MD-IQA folder built by ``qgate-train data build --task mdiqa``
    (or imported with ``data import-ldctiqa``): it needs ``splits.json``."""
    from training.datasets.common import read_jsonl

    root = Path(root)
    splits = json.loads((root / "splits.json").read_text())
    if split not in splits:
        raise KeyError(f"{root}/splits.json has no split {split!r}")
    names = list(splits[split])
    labels = json.loads((root / "train.json").read_text())
    recs: dict[str, dict[str, object]] = {}
    if (root / "samples.jsonl").exists():
        recs = {str(r["name"]): r for r in read_jsonl(root / "samples.jsonl")}
    pre = _preprocess_files([root / "image" / n for n in names], data_cfg)
    y = torch.tensor([float(labels.get(n, math.nan)) for n in names], dtype=torch.float32)
    proxy = torch.tensor(
        [float(recs.get(n, {}).get("score", math.nan) or math.nan) for n in names],  # type: ignore[arg-type]
        dtype=torch.float32,
    )
    return MdiqaSplit(
        names,
        pre.x,
        y,
        proxy,
        [recs.get(n, {}) for n in names],
        pre.crops,
        pre.channels,
        pre.centre,
        pre.spread,
    )


def load_mdiqa_folder(root: str | Path, data_cfg: MDIQADataConfig) -> MdiqaSplit:
    """Every image of an LDCTIQAC2023-layout folder (image/*.tif + train.json)."""
    from training.anatomy.ldctiqa import read_ldctiqa

    items = read_ldctiqa(root)
    pre = _preprocess_files([it.path for it in items], data_cfg)
    y = torch.tensor(
        [math.nan if it.score is None else it.score for it in items], dtype=torch.float32
    )
    return MdiqaSplit(
        [it.name for it in items],
        pre.x,
        y,
        torch.full_like(y, math.nan),
        [{} for _ in items],
        pre.crops,
    )


def finite(x: torch.Tensor) -> np.ndarray:
    return np.isfinite(x.numpy())
