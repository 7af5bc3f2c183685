"""``qgate-train data preview DIR``: a PNG grid so a person can look at a built dataset.

MD-IQA: a dose/views ladder of source slices, best to worst, with dose, views, fidelity
and score. Noise2Quality: one slice at its five doses - image, high-pass, SSIM map. Chest:
one volume's middle slice in all four (window, dose) series with SNR and BRISQUE.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from qgate.core.physics import WINDOWS, window
from training.anatomy.ldctiqa import read_image
from training.datasets.common import load_split, read_jsonl, read_manifest

TILE = 256
LABEL_H = 30


def _tile(gray01: np.ndarray, lines: list[str]) -> Image.Image:
    g = np.clip(np.asarray(gray01, dtype=np.float32), 0, 1)
    im = Image.fromarray(np.round(g * 255).astype(np.uint8)).resize((TILE, TILE), Image.BILINEAR)
    canvas = Image.new("L", (TILE, TILE + LABEL_H), 0)
    canvas.paste(im, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(lines[:2]):
        draw.text((4, TILE + 2 + 13 * i), text, fill=255)
    return canvas


def _grid(rows: list[list[Image.Image]], title: str) -> Image.Image:
    ncol = max(len(r) for r in rows)
    w, h = TILE, TILE + LABEL_H
    out = Image.new("L", (ncol * w, len(rows) * h + 18), 32)
    ImageDraw.Draw(out).text((4, 3), title, fill=255)
    for r, row in enumerate(rows):
        for c, t in enumerate(row):
            out.paste(t, (c * w, 18 + r * h))
    return out


def _mdiqa(root: Path, n_rows: int) -> Image.Image:
    recs = list(read_jsonl(root / "samples.jsonl"))
    by_src: dict[str, list[dict]] = defaultdict(list)
    for r in recs:
        by_src[r["source"]].append(r)
    # the sources with the widest spread of scores make the most telling ladders
    srcs = sorted(by_src, key=lambda s: -np.ptp([r["score"] for r in by_src[s]]))[:n_rows]
    c, w = WINDOWS["abdomen"]
    rows = []
    for s in srcs:
        row = []
        for r in sorted(by_src[s], key=lambda r: -r["score"]):
            hu = read_image(root / "image" / r["name"])
            g = window(torch.from_numpy(hu), c, w).numpy()
            row.append(
                _tile(
                    g,
                    [
                        f"{r['name']} score {r['score']:.1f} F {r['fidelity']:.3f}",
                        f"dose {r['dose']:.0%} views 1/{r['views_step']} [{r['split']}]",
                    ],
                )
            )
        rows.append(row)
    return _grid(rows, f"MD-IQA {root.name}: ladders (abdominal window C{c:g}/W{w:g})")


def _first_split(root: Path) -> str:
    for s in ("train", "val", "test"):
        if any(root.glob(f"{s}-*.safetensors")):
            return s
    raise FileNotFoundError(f"no shards in {root}")


def _n2q(root: Path) -> Image.Image:
    split = _first_split(root)
    t = load_split(root, split)
    recs = [r for r in read_jsonl(root / "samples.jsonl") if r["split"] == split]
    first = recs[0]["source"]
    idx = [i for i, r in enumerate(recs) if r["source"] == first]
    idx.sort(key=lambda i: -recs[i]["dose"])
    rows: list[list[Image.Image]] = [[], [], []]
    for i in idx:
        r = recs[i]
        lab = f"dose {r['dose']:.0%} (class {r['dose_class']})"
        rows[0].append(_tile(t["image"][i].float().numpy(), [lab, "image C40/W300"]))
        hp = t["hpf"][i].float().numpy()
        rows[1].append(_tile(0.5 + hp / (4 * hp.std() + 1e-6), [lab, "high-pass"]))
        rows[2].append(
            _tile(t["ssim"][i].float().numpy(), [lab, f"SSIM map, mean {r['mean_ssim']:.3f}"])
        )
    return _grid(rows, f"Noise2Quality {root.name} [{split}] {first}")


def _chest(root: Path) -> Image.Image:
    split = _first_split(root)
    t = load_split(root, split)
    recs = [r for r in read_jsonl(root / "samples.jsonl") if r["split"] == split]
    first = recs[0]["source"]
    row = []
    for i, r in enumerate(recs):
        if r["source"] != first:
            continue
        img = t["image"][i].float().numpy()
        mid = img[img.shape[0] // 2]
        row.append(
            _tile(
                mid,
                [
                    f"{r['window_class']} ({r['kernel']}) {r['dose_class']} {r['mas']:g} mAs",
                    f"SNR {r['snr']:.1f} BRISQUE {r['brisque']:.1f}",
                ],
            )
        )
    return _grid([row], f"Chest CT-IQA {root.name} [{split}] {first}, middle slice")


def render_preview(root: str | Path, out: str | Path | None = None, *, rows: int = 4) -> Path:
    """Render the preview of the dataset in ``root`` to ``out`` (default root/preview.png)."""
    root = Path(root)
    task = read_manifest(root).get("task")
    if task == "mdiqa":
        img = _mdiqa(root, rows)
    elif task == "n2q":
        img = _n2q(root)
    elif task == "chest":
        img = _chest(root)
    else:
        raise ValueError(f"{root}: unknown task {task!r} in manifest.json")
    path = Path(out) if out else root / "preview.png"
    img.save(path)
    return path


def describe(root: str | Path) -> str:
    """A one-paragraph summary of a built dataset (counts per split, label ranges)."""
    root = Path(root)
    m = read_manifest(root)
    return json.dumps({"task": m["task"], "n": m["n_samples"], "counts": m["counts"]})
