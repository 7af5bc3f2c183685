"""Model registry and factory, after timm's ``register_model`` / ``create_model``.

Each architecture module registers entry points (e.g. ``mdiqa_tiny``) that build a model
from its config dataclass. ``create_model(name, weights=PATH)`` loads a safetensors file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model entry point under its function name."""
    name = fn.__name__
    if name in _MODELS:
        warnings.warn(f"model {name!r} registered twice; the later one wins", stacklevel=2)
    _MODELS[name] = fn
    return fn


def list_models(prefix: str = "") -> list[str]:
    return sorted(n for n in _MODELS if n.startswith(prefix))


def create_model(
    name: str,
    *,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` (no hub, no download); load ``weights`` (safetensors) if given."""
    try:
        entry = _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}") from None
    model = entry(**kwargs)
    if weights is not None:
        from safetensors.torch import load_file

        state = load_file(str(weights), device="cpu")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"weights {weights} do not fit {name}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return model.to(device)
