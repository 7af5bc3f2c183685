"""The LDCTIQAC2023 layout: ``image/NNNN.tif`` (float32 in [0, 1] for HU [-1000, 400]) and
``train.json`` (file name -> mean radiologist score in [0, 4], steps of 0.2).

Users who have the challenge data read it with :func:`read_ldctiqa`; our MD-IQA builder
writes the same layout, so one reader serves both. The challenge data's licence is not
settled: never commit it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

WINDOW_HU = (-1000.0, 400.0)  # the challenge's window: centre -300, width 1400


@dataclass(frozen=True)
class LdctiqaItem:
    name: str  # file name inside image/, e.g. "0000.tif"
    path: Path
    score: float | None  # None when train.json does not list it


def hu_to_unit(hu: np.ndarray) -> np.ndarray:
    """HU to the challenge's [0, 1] scale (clipped to its window)."""
    lo, hi = WINDOW_HU
    return np.clip((np.asarray(hu, np.float32) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def unit_to_hu(x: np.ndarray) -> np.ndarray:
    lo, hi = WINDOW_HU
    return (np.asarray(x, np.float32) * (hi - lo) + lo).astype(np.float32)


def write_image(path: str | Path, hu: np.ndarray) -> None:
    """One slice as a float32 TIFF in the challenge's [0, 1] scale."""
    Image.fromarray(hu_to_unit(hu)).save(path, format="TIFF")


def read_image(path: str | Path) -> np.ndarray:
    """A challenge TIFF back to HU (values outside [-1000, 400] were clipped at writing)."""
    with Image.open(path) as im:
        arr = np.asarray(im, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D float image, got shape {arr.shape}")
    return unit_to_hu(arr)


def read_ldctiqa(root: str | Path, *, labels: str = "train.json") -> list[LdctiqaItem]:
    """The items of an LDCTIQAC2023-layout folder, sorted by name.

    Raises ``FileNotFoundError`` when ``image/`` is missing and ``ValueError`` when a score
    is outside [0, 4] or names an image that does not exist.
    """
    root = Path(root)
    img_dir = root / "image"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{root} has no image/ folder (LDCTIQAC2023 layout)")
    scores: dict[str, float] = {}
    label_path = root / labels
    if label_path.exists():
        raw = json.loads(label_path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{label_path}: expected a map from file name to score")
        for k, v in raw.items():
            s = float(v)
            if not 0.0 <= s <= 4.0:
                raise ValueError(f"{label_path}: score {s} for {k} is outside [0, 4]")
            scores[k] = s
    files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".tif", ".tiff"))
    names = {p.name for p in files}
    missing = sorted(set(scores) - names)
    if missing:
        raise ValueError(f"{label_path} names images that do not exist: {missing[:5]}")
    return [LdctiqaItem(p.name, p, scores.get(p.name)) for p in files]
