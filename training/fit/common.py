"""What the three training loops share: device and seeds, autocast, checkpoints that
resume, the metrics log (CSV + JSON) and the loss-curve plot.

A run directory holds::

    checkpoint.pt     model, optimiser, EMA, epoch, step, RNG states, history (each epoch)
    metrics.csv       one row per epoch (train losses, validation metrics, seconds)
    history.json      the same rows, plus the run's config
    loss.png          train/validation loss curves
    done.json         written when the run finished (a finished run is skipped on resume)
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.plots import line_chart

log = logging.getLogger(__name__)

__all__ = [
    "RunDir",
    "RunState",
    "autocast",
    "resolve_device",
    "seed_everything",
    "set_threads",
]


def resolve_device(name: str | None) -> torch.device:
    """``cuda``, ``cpu`` or ``None``/``auto`` (CUDA when available)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    return dev


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """bf16 autocast on CUDA; nothing on CPU (bf16 convolutions are slow there)."""
    if enabled and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def _jsonable(o: Any) -> Any:
    if is_dataclass(o) and not isinstance(o, type):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


@dataclass
class RunState:
    """Where a run is: the next epoch to train, optimiser steps so far, history rows."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best: float = -math.inf
    extra: dict[str, Any] = field(default_factory=dict)


class RunDir:
    """One training run's folder: checkpoints, metrics and plots."""

    def __init__(self, root: str | Path, config: dict[str, Any]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = config

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def done(self) -> bool:
        return (self.root / "done.json").exists()

    def finished_epochs(self) -> int:
        """Epochs of the run recorded as finished (0 if it has not finished)."""
        if not self.done:
            return 0
        doc = json.loads((self.root / "done.json").read_text())
        return int(doc.get("epochs", 0))

    def finished_summary(self, epochs: int, resume: bool) -> dict[str, Any] | None:
        """With ``resume``, the summary of a run that already finished ``epochs``."""
        if resume and self.finished_epochs() >= epochs:
            return dict(json.loads((self.root / "done.json").read_text()))
        return None

    def prepare(self, resume: bool) -> None:
        """Refuse to overwrite an earlier run unless resuming."""
        if self.checkpoint.exists() and not resume:
            raise FileExistsError(
                f"{self.root} already holds a run; pass --resume or choose another --out"
            )

    def save(
        self,
        state: RunState,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        ema: nn.Module | None = None,
        scheduler: Any = None,
    ) -> None:
        """Write the checkpoint atomically (temp file + rename) and the metrics files."""
        blob = {
            "state": asdict(state),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "ema_updates": getattr(ema, "updates", None),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }
        tmp = self.checkpoint.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(self.checkpoint)
        self.write_metrics(state)

    def load(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        ema: nn.Module | None = None,
        scheduler: Any = None,
    ) -> RunState:
        """Restore everything :meth:`save` wrote; a fresh state if there is no checkpoint."""
        if not self.checkpoint.exists():
            return RunState()
        blob = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        if ema is not None and blob.get("ema") is not None:
            ema.load_state_dict(blob["ema"])
            if blob.get("ema_updates") is not None:
                ema.updates = int(blob["ema_updates"])  # type: ignore[assignment]
        if scheduler is not None and blob.get("scheduler") is not None:
            scheduler.load_state_dict(blob["scheduler"])
        rng = blob["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        s = blob["state"]
        log.info("resuming %s at epoch %d (step %d)", self.root, s["epoch"], s["step"])
        return RunState(**s)

    def write_metrics(self, state: RunState) -> None:
        rows = state.history
        if rows:
            keys: list[str] = []
            for r in rows:
                keys += [k for k in r if k not in keys]
            with (self.root / "metrics.csv").open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(rows)
        doc = {"config": self.config, "history": rows, "best": state.best, **state.extra}
        (self.root / "history.json").write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
        self.plot_losses(rows)

    def plot_losses(self, rows: list[dict[str, float]]) -> None:
        if not rows:
            return
        x = [r["epoch"] for r in rows]
        series = {
            k: (x, [r.get(k, math.nan) for r in rows])
            for k in rows[-1]
            if k.startswith(("train_loss", "val_loss"))
        }
        if series:
            positive = all(v > 0 for s in series.values() for v in s[1] if math.isfinite(v))
            line_chart(
                series,
                self.root / "loss.png",
                title=f"{self.root.name}: loss",
                xlabel="epoch",
                ylabel="loss",
                log_y=positive,
                markers=len(x) < 15,
            )

    def finish(self, summary: dict[str, Any], epochs: int) -> None:
        doc = {"epochs": epochs, **summary}
        (self.root / "done.json").write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def open_fit(
    data: str | Path, out: str | Path, cfg: Any, *, resume: bool
) -> tuple[torch.device, RunDir, dict[str, Any] | None]:
    """A fit's device and run folder (recording ``cfg`` and ``data``), and the summary of
    an earlier run that already finished ``cfg.epochs`` when resuming (else ``None``)."""
    run = RunDir(out, {"fit": asdict(cfg), "data": str(data)})
    return resolve_device(cfg.device), run, run.finished_summary(cfg.epochs, resume)


def optimiser_step(
    opt: torch.optim.Optimizer, loss: torch.Tensor, parts: dict[str, torch.Tensor]
) -> dict[str, float]:
    """One backward pass and update; returns the loss and its parts as floats."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}
