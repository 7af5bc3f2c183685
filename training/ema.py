"""Exponential moving average of a model's weights: the mean teacher of MD-IQA step 3.

Theta_EMA <- alpha * Theta_EMA + (1 - alpha) * Theta, alpha = 0.997 (MD-IQA, sec. 3.1).
After timm's ``ModelEmaV3``: a frozen deep copy, updated in place with foreach ops.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA(nn.Module):
    """A frozen, eval-mode copy of ``model`` whose weights track an EMA of the model's.

    ``update(model)`` after each optimiser step. Floating-point parameters and buffers are
    averaged; integer buffers (counters) are copied. With ``warmup=True`` the effective
    decay is ``min(decay, (1 + step) / (10 + step))`` so an early teacher is not stuck near
    random init (our option; the paper uses a constant 0.997, the default here).
    Call the EMA like the model (``ema(x)``) to get the teacher's outputs.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.997,
        *,
        warmup: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        if device is not None:
            self.module.to(device)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    def decay_at(self, step: int) -> float:
        """The decay used for update number ``step`` (0-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights."""
        d = self.decay_at(self.updates)
        self.updates += 1
        ema_sd = self.module.state_dict()
        model_sd = model.state_dict()
        ema_f: list[torch.Tensor] = []
        src_f: list[torch.Tensor] = []
        for k, e in ema_sd.items():
            m = model_sd[k].detach().to(e.device)
            if e.is_floating_point():
                ema_f.append(e)
                src_f.append(m.to(e.dtype))
            else:
                e.copy_(m)
        if ema_f:
            # e <- e + (1 - d) * (m - e) == d * e + (1 - d) * m
            torch._foreach_lerp_(ema_f, src_f, 1.0 - d)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy ``model``'s weights into the EMA (e.g. to restart the teacher)."""
        self.module.load_state_dict(model.state_dict())

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.module(*args)
