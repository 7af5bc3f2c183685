"""The learned scorers: MD-IQA (``mdiqa``), Noise2Quality (``n2q``), Chest CT-IQA (``chestiqa``).

Each wraps one model of :mod:`qgate.models` behind the scorer interface
(:mod:`qgate.score.scorers.base`). The worker builds its scorers once, so a model is loaded once
per scorer instance and reused for every series.

Weights
-------
A scorer loads a safetensors file: ``config.weights`` if set, else the shipped
``qgate/weights/<scorer>.safetensors``. A missing file raises :class:`WeightsNotFoundError`
when the scorer is built (the worker does not start): qgate never scores with random
weights. The model is rebuilt from the file's metadata, as the training exporter
(``training/fit/export.py``) and :func:`qgate.models.save_mdiqa` write it: MD-IQA from its
``mdiqa_config``; the others from ``qgate_model`` (the entry point, e.g. ``n2q_tiny``) plus
``qgate_overrides`` (config fields changed from the entry point's defaults). A file
without that metadata is built as ``config.variant``, or else as whichever registered
variant of the family (``n2q_tiny``, ``n2q_small``, ...) its parameters fit; a
``config.variant`` that contradicts the file's ``qgate_model`` is an error. Each scorer's
``version`` is ``1.0.0+`` the first 12 hex digits of the file's SHA-256, so a stored
result names the exact weights behind it.

Serving
-------
- ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda`` (an error without a GPU).
- On CUDA: bf16 autocast (``config.amp``) and channels_last. On CPU: bf16 autocast too
  (``config.amp``) when the CPU has native bf16 instructions (AVX512-BF16 or AMX, where
  oneDNN runs bf16 convolutions ~2x faster than fp32: Noise2Quality and Chest CT-IQA on 2
  Xeon cores), fp32 otherwise (emulated bf16 is slower). Noise2Quality also runs
  channels_last on CPU, where oneDNN's fp32 convolutions are ~1.3x faster with it.
  Chest CT-IQA's quality module (a 4-term linear fit) is evaluated in fp32 either way.
- Everything under ``torch.inference_mode`` (:func:`qgate.models.preprocess.inference_context`),
  in batches of ``config.batch_size`` slices (unset: 16 on CPU, 64 on CUDA). A volume the
  worker staged on the device (``SeriesVolume.device_hu``, :mod:`qgate.score.prefetch`) is
  read there; otherwise each model copies its slices from host memory.
- Preprocessing is the models' own, shared with training: :func:`qgate.models.mdiqa.mdiqa_crops`
  (native-resolution crops on the body, two windows) with
  :func:`qgate.models.mdiqa.resolve_data_config`, the crops' distributions pooled by
  :func:`qgate.models.mdiqa.pool_crop_logits`; and inside
  :func:`qgate.models.predict_n2q` / :func:`qgate.models.predict_chestiqa`
  (``prepare_n2q_input``, ``prepare_chest_input``), run on the model's device.

Subsampling
-----------
The per-slice models (``mdiqa``, ``n2q``) score at most ``config.max_slices`` slices, evenly
spaced with the first and last always included: :func:`subsample_indices`, the same rule as
:func:`qgate.report.sc.select_slices`, so the quality-map SC series shows exactly the
scored slices. Per-slice lists keep one entry per slice of the series (QualityReport checks
the length) with NaN (null in the results JSON) for slices not scored, and the
Noise2Quality map is NaN on those slices. Series values come from the scored slices only.
Chest CT-IQA reads a fixed-depth volume (its data config: 32 slices spread over the
series) and is not subsampled further.

Outputs
-------
``mdiqa`` (scores 0-4, higher is better):
    ``score``: mean over the scored slices of the soft read-out (the expectation of each
    scale's distribution, averaged over the K scales; a slice's distribution is the mean
    over its ``n_crops`` native-resolution crops); ``score_argmax``: the same with the
    paper's argmax read-out; ``slices_scored``. Per slice: ``slice_scores``,
    ``slice_scores_argmax``.
``n2q``:
    ``mean_quality``: mean predicted SSIM (against a noiseless acquisition with the same
    kernel, in C40/W400) over the whole of the scored slices, the map clipped to [0, 1];
    ``body_quality``: the same over the body pixels only (body mask:
    :func:`qgate.score.scorers.body.body_mask`, on the model's grid); ``dose_class``: the dose
    level (percent of routine dose for this kernel and patient) with the highest mean
    probability over the scored slices that hold body; ``slices_scored``. Per slice:
    ``mean_quality``, ``body_quality``. Map ``quality``: predicted SSIM on the model's
    grid, clipped to [0, 1], display range 0-1, higher is better. The shipped model
    reads the slice at its own pixel grid (no resize: ``N2QInputConfig.size=None``), so
    the map has the image's rows and columns and pixel spacing; a model trained with a
    fixed ``size`` gives maps of that size (map pixel spacing = image spacing x rows /
    size).
``chestiqa``:
    ``window_class`` (``soft_tissue``/``lung``), ``dose_class`` (``low``/``high``),
    ``snr``, ``brisque``, ``score`` (the linear quality module, a clinician-like 1-10
    score), and the class probabilities ``lung_window_probability`` and
    ``high_dose_probability`` (continuous, for ranking and thresholds).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from qgate.core.config import ChestScorerConfig, LearnedScorerConfig, SliceScorerConfig
from qgate.core.families import SHIPPED_WEIGHTS_DIR, Family, ModelFamily
from qgate.core.families import family as family_of
from qgate.score.scorers.base import ScoreOutput, SeriesVolume, SliceMap, register_scorer
from qgate.score.scorers.body import block_mean, body_mask, mask_scale

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qgate.models import MDIQA, ChestIQANet, N2QNet

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "ChestIQAScorer",
    "MDIQAScorer",
    "N2QScorer",
    "WeightsNotFoundError",
    "default_weights_path",
    "load_model",
    "resolve_device",
    "set_torch_threads",
    "subsample_indices",
]

#: Where the trained weights ship (:data:`qgate.core.families.SHIPPED_WEIGHTS_DIR`).
DEFAULT_WEIGHTS_DIR = SHIPPED_WEIGHTS_DIR
_VERSION = "1.0.0"
#: Slices per forward pass of the per-slice models when ``batch_size`` is unset. On CPU
#: larger batches are no faster; on CUDA they keep the device busy (benchmarks/score.py).
CPU_BATCH_SIZE = 16
CUDA_BATCH_SIZE = 64
_QUALITY_DISPLAY = (0.0, 1.0)

DeviceName = Literal["auto", "cpu", "cuda"]


class WeightsNotFoundError(FileNotFoundError):
    """A learned scorer's weights file does not exist."""


def default_weights_path(name: str) -> Path:
    """The shipped weights of a family: ``qgate/weights/<name>.safetensors``."""
    return family_of(name).shipped_weights


def subsample_indices(n_slices: int, max_slices: int | None) -> np.ndarray:
    """The slices a per-slice model scores: all, or ``max_slices`` evenly spaced.

    The first and last slice are always included; the rule is that of
    :func:`qgate.report.sc.select_slices` (rounded ``linspace``), so the SC series rendered
    with ``max_images`` equal to the number scored shows exactly these slices.
    """
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    if max_slices is not None and max_slices < 2:
        raise ValueError(f"max_slices must be >= 2 or None, got {max_slices}")
    if max_slices is None or max_slices >= n_slices:
        return np.arange(n_slices)
    return np.unique(np.round(np.linspace(0, n_slices - 1, max_slices)).astype(np.int64))


def resolve_device(device: DeviceName | str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("scoring.device is 'cuda' but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return torch.device(device)


def set_torch_threads(threads: int | None) -> None:
    """Set torch's CPU thread count for the process (``None`` leaves torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def load_model(
    family: Family,
    path: str | Path,
    *,
    variant: str | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build a model of ``family`` from a weights file, in eval mode on ``device``.

    Parameters
    ----------
    family : {"mdiqa", "n2q", "chestiqa"}
        Model family; its entry points are ``<family>_tiny``, ``<family>_small``, ...
    path : path-like
        safetensors weights (see the module docstring for how the variant is chosen).
    variant : str, optional
        Entry point to build, e.g. ``"n2q_tiny"``; must belong to ``family``.
    device : str or torch.device
        Where the model lives.

    Raises
    ------
    WeightsNotFoundError
        When ``path`` does not exist.
    ValueError
        When the file is not safetensors or fits no variant (or not ``variant``).
    """
    from qgate.models import create_model as _create
    from qgate.models import list_models, load_mdiqa

    path = Path(path)
    fam: ModelFamily = family_of(family)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{family} weights not found at {path}: train them "
            f"(`qgate-train fit --model {fam.train_task}`) or set "
            f"scoring.{family}.weights; qgate does not score with untrained weights"
        )
    family_models = list_models(fam.entry_prefix)
    if variant is not None and variant not in family_models:
        raise ValueError(
            f"scoring.{family}.variant {variant!r} is not a {family} model; "
            f"known: {', '.join(family_models)}"
        )
    meta = _metadata(path)
    named = meta.get("qgate_model")
    if named is not None:
        if named not in family_models:
            raise ValueError(f"{path} holds a {named!r} model, not a {family} model")
        if variant is not None and variant != named:
            raise ValueError(f"{path} holds {named!r}, but scoring.{family}.variant is {variant!r}")
    model: nn.Module | None = None
    if family == "mdiqa" and "mdiqa_config" in meta:
        model = load_mdiqa(path)  # the exact config the weights were trained with
    elif named is not None:
        overrides = _decode_overrides(family, json.loads(meta.get("qgate_overrides", "{}")))
        try:
            model = _create(named, weights=path, **overrides)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{path} does not load as {named}: {exc}") from exc
    else:
        candidates = [variant] if variant is not None else family_models
        errors: list[str] = []
        for name in candidates:
            try:
                model = _create(name, weights=path)
                break
            except (ValueError, RuntimeError) as exc:
                errors.append(f"{name}: {str(exc).splitlines()[0][:200]}")
        if model is None:
            raise ValueError(
                f"{family} weights {path} fit none of {', '.join(candidates)} ({'; '.join(errors)})"
            )
    assert model is not None
    return model.float().eval().to(device)


def _decode_overrides(family: Family, raw: dict[str, Any]) -> dict[str, Any]:
    """``qgate_overrides`` metadata (JSON) back to config values: tuples, nested configs.

    The training exporter (``training/fit/export.py``) stores the config fields an entry
    point was given besides its defaults (an ablation, another input window); the model is
    rebuilt with them, so its preprocessing is the one it was trained with.
    """
    from qgate.models.chestiqa import QualityFitConfig
    from qgate.models.preprocess import ChestInputConfig, N2QInputConfig

    def plain(d: dict[str, Any]) -> dict[str, Any]:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "input" and isinstance(value, dict):
            cls = ChestInputConfig if family == "chestiqa" else N2QInputConfig
            out[key] = cls(**plain(value))
        elif key == "quality" and isinstance(value, dict):
            out[key] = QualityFitConfig(**plain(value))
        else:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _config_dict(config: LearnedScorerConfig) -> dict[str, object]:
    return json.loads(config.model_dump_json())


class _LearnedScorer:
    """Shared set-up: config, device, weights file, model, version; then :meth:`_setup`."""

    name: str
    family: Family
    config_type: type[LearnedScorerConfig] = LearnedScorerConfig

    def __init__(
        self, config: LearnedScorerConfig | None = None, *, device: DeviceName | str = "auto"
    ) -> None:
        if config is not None and not isinstance(config, self.config_type):
            # a plain LearnedScorerConfig: the family's own settings at their defaults
            config = self.config_type(**config.model_dump())
        self.config = config or self.config_type()
        self.device = resolve_device(device)
        self.weights_path = Path(self.config.weights or default_weights_path(self.family))
        self.model = load_model(
            self.family, self.weights_path, variant=self.config.variant, device=self.device
        )
        self.version = f"{_VERSION}+{_sha256(self.weights_path)[:12]}"
        self._setup()

    def _setup(self) -> None:
        """A scorer's own set-up once its model is loaded."""

    @property
    def cuda_amp(self) -> bool:
        """bf16 autocast on CUDA (done by the models' inference context)."""
        return self.config.amp and self.device.type == "cuda"

    @property
    def cpu_bf16(self) -> bool:
        """bf16 autocast on a CPU with native bf16 instructions."""
        return self.config.amp and self.device.type == "cpu" and _native_cpu_bf16()

    def _cpu_autocast(self) -> contextlib.AbstractContextManager[object]:
        import torch

        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_bf16)

    def describe(self) -> dict[str, object]:
        """What this scorer runs (for logs and benchmarks)."""
        return {
            **_config_dict(self.config),
            "scorer": self.name,
            "model": type(self.model).__name__,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device),
            "bf16": self.cuda_amp or self.cpu_bf16,
            "weights": str(self.weights_path),
            "version": self.version,
        }


def _take(hu: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The slices at ``index`` as float32: a view when that is every slice, else a copy."""
    if len(index) == len(hu) and np.array_equal(index, np.arange(len(hu))):
        return np.asarray(hu, dtype=np.float32)
    return np.ascontiguousarray(hu[index], dtype=np.float32)


def _model_input(
    volume: SeriesVolume, index: np.ndarray, device: torch.device
) -> np.ndarray | torch.Tensor:
    """The slices at ``index`` for a model on ``device``: taken from the volume's copy on
    that device when the worker staged one (no second host-to-device copy), else from
    host memory (:func:`_take`; the model's own code copies them over)."""
    staged = volume.device_hu
    if staged is None or staged.device.type != device.type:
        return _take(volume.hu, index)
    if device.index is not None and staged.device.index != device.index:
        return _take(volume.hu, index)
    if len(index) == len(staged) and np.array_equal(index, np.arange(len(staged))):
        return staged
    import torch

    return staged.index_select(0, torch.from_numpy(np.asarray(index, np.int64)).to(device))


def _batch_size(config: SliceScorerConfig, device: torch.device) -> int:
    """Slices per forward pass: ``config.batch_size``, or unset: :data:`CPU_BATCH_SIZE`
    on CPU, :data:`CUDA_BATCH_SIZE` on CUDA."""
    if config.batch_size is not None:
        return config.batch_size
    return CUDA_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE


def _with_nan(n: int, index: np.ndarray, values: np.ndarray, digits: int = 4) -> list[float]:
    """A per-slice list of length ``n``: ``values`` at ``index``, NaN elsewhere."""
    full = np.full(n, np.nan)
    full[index] = values
    return [round(float(v), digits) if math.isfinite(v) else math.nan for v in full]


@register_scorer("mdiqa")
class MDIQAScorer(_LearnedScorer):
    """MD-IQA per-slice quality scores (0-4), with the soft and the argmax read-outs."""

    name = "mdiqa"
    family: Family = "mdiqa"
    version = _VERSION
    config_type = SliceScorerConfig
    config: SliceScorerConfig

    def _setup(self) -> None:
        from qgate.models.mdiqa import resolve_data_config

        self.mdiqa: MDIQA = self.model  # type: ignore[assignment]
        self.data_config = resolve_data_config(self.mdiqa)
        if self.device.type == "cuda":
            self.model.to(memory_format=_channels_last())

    def predict(self, hu: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(soft, argmax) scores of HU slices (S, H, W), batched on the model's device."""
        import torch

        from qgate.models.mdiqa import mdiqa_crops, pool_crop_logits, predict_argmax, predict_soft
        from qgate.models.preprocess import device_layout, inference_context

        bs = _batch_size(self.config, self.device)
        max_score = self.mdiqa.cfg.max_score
        soft: list[torch.Tensor] = []
        hard: list[torch.Tensor] = []
        with inference_context(self.device, amp=self.cuda_amp), self._cpu_autocast():
            for s in range(0, len(hu), bs):
                part = hu[s : s + bs]
                batch = (
                    part
                    if isinstance(part, torch.Tensor)
                    else torch.from_numpy(np.ascontiguousarray(part, np.float32))
                )
                # (b, n, C, S, S): the slice's native-resolution crops (training's policy).
                crops = mdiqa_crops(batch.to(self.device, non_blocking=True), self.data_config)
                b, n = crops.shape[:2]
                flat = self.model(device_layout(crops.flatten(0, 1))).float()
                logits = pool_crop_logits(flat.view(b, n, *flat.shape[1:]))
                soft.append(predict_soft(logits, max_score).cpu())
                hard.append(predict_argmax(logits, max_score).cpu())
        return torch.cat(soft).numpy(), torch.cat(hard).numpy()

    def score(self, volume: SeriesVolume) -> ScoreOutput:
        n = volume.n_slices
        idx = subsample_indices(n, self.config.max_slices)
        soft, hard = self.predict(_model_input(volume, idx, self.device))
        return ScoreOutput(
            series={
                "score": round(float(np.mean(soft)), 4),
                "score_argmax": round(float(np.mean(hard)), 4),
                "slices_scored": len(idx),
            },
            slices={
                "slice_scores": _with_nan(n, idx, soft),
                "slice_scores_argmax": _with_nan(n, idx, hard),
            },
            units={
                "score": "1",
                "score_argmax": "1",
                "slices_scored": "1",
                "slice_scores": "1",
                "slice_scores_argmax": "1",
            },
        )


@register_scorer("n2q")
class N2QScorer(_LearnedScorer):
    """Noise2Quality: predicted SSIM map, its mean over the slice and the body, the dose class.

    The map is clipped to SSIM's meaningful range [0, 1]. ``mean_quality`` is the map's
    mean over the whole slice, as SSIM itself is averaged (air and lung, clipped in the
    soft-tissue window, count as faithful); ``body_quality`` its mean over the body only.
    """

    name = "n2q"
    family: Family = "n2q"
    version = _VERSION
    config_type = SliceScorerConfig
    config: SliceScorerConfig

    def _setup(self) -> None:
        self.n2q: N2QNet = self.model  # type: ignore[assignment]
        # predict_n2q makes it channels_last on CUDA; on CPU oneDNN is faster with it too.
        self.model.to(memory_format=_channels_last())

    def score(self, volume: SeriesVolume) -> ScoreOutput:
        import torch

        from qgate.models import predict_n2q
        from qgate.models.preprocess import resize2d

        n = volume.n_slices
        idx = subsample_indices(n, self.config.max_slices)
        with self._cpu_autocast():
            pred = predict_n2q(
                self.n2q,
                _model_input(volume, idx, self.device),
                None,
                batch_size=_batch_size(self.config, self.device),
                amp=self.cuda_amp,
                map_size="model",
            )
        assert pred.maps is not None
        maps = np.clip(pred.maps.astype(np.float32, copy=False), 0.0, 1.0)  # (k, size, size)
        size = maps.shape[-2:]
        hu = _take(volume.hu, idx)
        f = mask_scale(hu.shape)
        coarse = body_mask(block_mean(hu, f)).astype(np.float32)
        body = resize2d(torch.from_numpy(coarse), (int(size[0]), int(size[1])), mode="area")
        inside = body.numpy() >= 0.5
        sums = np.where(inside, maps, 0.0).sum(axis=(1, 2), dtype=np.float64)
        counts = inside.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            per_slice_body = sums / counts
        total = int(counts.sum())
        body_q = float(sums.sum() / total) if total else math.nan
        per_slice = maps.mean(axis=(1, 2), dtype=np.float64)
        mean_q = float(per_slice.mean())
        has_body = counts > 0
        probs = pred.dose_probs[has_body] if has_body.any() else pred.dose_probs
        dose = int(pred.dose_levels[int(np.argmax(probs.mean(axis=0)))])

        full = np.full((n, *maps.shape[-2:]), np.nan, dtype=np.float32)
        full[idx] = maps
        return ScoreOutput(
            series={
                "mean_quality": round(mean_q, 4) if math.isfinite(mean_q) else math.nan,
                "body_quality": round(body_q, 4) if math.isfinite(body_q) else math.nan,
                "dose_class": dose,
                "slices_scored": len(idx),
            },
            slices={
                "mean_quality": _with_nan(n, idx, per_slice),
                "body_quality": _with_nan(n, idx, per_slice_body),
            },
            units={
                "mean_quality": "1",
                "body_quality": "1",
                "dose_class": "%",
                "slices_scored": "1",
            },
            maps=[
                SliceMap(
                    name="quality",
                    values=full,
                    unit="1",
                    display_range=_QUALITY_DISPLAY,
                    higher_is_better=True,
                )
            ],
        )


@register_scorer("chestiqa")
class ChestIQAScorer(_LearnedScorer):
    """Chest CT-IQA: window and dose class, SNR, BRISQUE and the quality-module score."""

    name = "chestiqa"
    family: Family = "chestiqa"
    version = _VERSION
    config_type = ChestScorerConfig
    config: ChestScorerConfig

    def _setup(self) -> None:
        self.chest: ChestIQANet = self.model  # type: ignore[assignment]

    def score(self, volume: SeriesVolume) -> ScoreOutput:
        import torch

        from qgate.models import predict_chestiqa
        from qgate.models.preprocess import depth_indices

        data = self.chest.data_config
        # Pick the model's slices here, so only they are converted and moved to the device;
        # prepare_chest_input then takes them all in order (depth_indices(d, d) is 0..d-1).
        idx = depth_indices(volume.n_slices, data.depth, data.depth_mode)
        with self._cpu_autocast():
            pred = predict_chestiqa(
                self.chest,
                _model_input(volume, idx, self.device),
                pixel_mm=float(sum(volume.pixel_spacing)) / 2.0,
                amp=self.cuda_amp,
            )
        # The quality module in fp32, whatever precision the network ran in.
        with torch.inference_mode():
            feats = torch.tensor([pred.features], dtype=torch.float32, device=self.device)
            score = float(self.chest.quality(feats)[0])
        return ScoreOutput(
            series={
                "window_class": pred.window_class,
                # the site's edge (config), not the argmax: the same network, its own routine
                "dose_class": self.chest.cfg.dose_labels[
                    int(pred.dose_prob >= self.config.high_dose_probability)
                ],
                "snr": round(pred.snr, 4),
                "brisque": round(pred.brisque, 4),
                "score": round(score, 4),
                "lung_window_probability": round(pred.window_prob, 4),
                "high_dose_probability": round(pred.dose_prob, 4),
            },
            units={
                "snr": "1",
                "brisque": "1",
                "score": "1",
                "lung_window_probability": "1",
                "high_dose_probability": "1",
            },
        )


@functools.cache
def _native_cpu_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16, AMX)."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # private helpers; absent means "do not know"
        return False


def _channels_last() -> torch.memory_format:
    import torch

    return torch.channels_last
