"""Weights files in the form the service loads: safetensors plus JSON metadata.

Every file carries ``qgate_model`` (the registry entry point, e.g. ``n2q_tiny``, read by
``qgate.score.scorers`` to rebuild the model with ``create_model(name, weights=path)``) and
``qgate_config`` (the model's config as JSON). MD-IQA files also carry ``mdiqa_config``,
so :func:`qgate.models.load_mdiqa` rebuilds them (same key as
:func:`qgate.models.save_mdiqa`). Optional ``qgate_training`` holds a short JSON record of
how the weights were made.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load_weights", "read_metadata", "save_weights", "sha256"]


def _config_json(model: nn.Module) -> str:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return "{}"
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else asdict(cfg) if is_dataclass(cfg) else {}
    return json.dumps(d, default=list)


def save_weights(
    model: nn.Module,
    path: str | Path,
    *,
    name: str,
    dtype: torch.dtype | None = None,
    training: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s state dict (optionally cast to ``dtype``) with the metadata above.

    ``overrides``: the config fields given to the entry point besides its defaults (as for
    an ablation); stored as ``qgate_overrides`` so :func:`load_weights` can rebuild it.
    """
    from safetensors.torch import save_file

    from qgate.models import MDIQA

    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
        .detach()
        .cpu()
        .contiguous()
        for k, v in model.state_dict().items()
    }
    meta = {"qgate_model": name, "qgate_config": _config_json(model)}
    if isinstance(model, MDIQA):
        meta["mdiqa_config"] = json.dumps(model.cfg.to_dict())
        if overrides is None:  # e.g. hu_window: create_model(name, **overrides) must get it
            overrides = _mdiqa_overrides(model, name)
    if overrides:
        meta["qgate_overrides"] = json.dumps(
            {k: asdict(v) if is_dataclass(v) else v for k, v in overrides.items()}
        )
    if training:
        meta["qgate_training"] = json.dumps(training, default=str)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.chmod(0o644)  # a repository file, not a private one
    tmp.replace(p)
    return p


def _mdiqa_overrides(model: Any, name: str) -> dict[str, Any]:
    """Config fields of an MD-IQA model that differ from its registered variant."""
    from qgate.models.mdiqa import MDIQA_CFGS

    base = MDIQA_CFGS.get(name)
    if base is None:
        return {}
    a, b = model.cfg.to_dict(), base.to_dict()
    return {k: v for k, v in a.items() if v != b.get(k)}


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def load_weights(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a :func:`save_weights` file holds (fp32, eval mode)."""
    from qgate.models import create_model, load_mdiqa

    meta = read_metadata(path)
    if "mdiqa_config" in meta:
        model: nn.Module = load_mdiqa(path, device=device)
    else:
        name = meta.get("qgate_model")
        if not name:
            raise ValueError(f"{path} has no qgate_model metadata")
        overrides = _decode_overrides(json.loads(meta.get("qgate_overrides", "{}")))
        model = create_model(name, weights=path, device=device, **overrides)
    return model.float().eval()


def _decode_overrides(d: dict[str, Any]) -> dict[str, Any]:
    """JSON overrides back to config values (nested input/quality configs, tuples)."""
    from qgate.models.chestiqa import QualityFitConfig
    from qgate.models.preprocess import ChestInputConfig, N2QInputConfig

    out: dict[str, Any] = {}
    for k, v in d.items():
        if k == "input" and isinstance(v, dict):
            cls = ChestInputConfig if "depth" in v else N2QInputConfig
            out[k] = cls(**{a: tuple(b) if isinstance(b, list) else b for a, b in v.items()})
        elif k == "quality" and isinstance(v, dict):
            out[k] = QualityFitConfig(
                **{a: tuple(b) if isinstance(b, list) else b for a, b in v.items()}
            )
        else:
            out[k] = tuple(v) if isinstance(v, list) else v
    return out


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
