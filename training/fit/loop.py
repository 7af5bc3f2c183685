"""The epoch loop the three models share: progress bar, scheduler, validation, best
weights, a checkpoint after every epoch, and resumption from it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from training.fit.common import RunDir, RunState, Timer

__all__ = ["LoopHooks", "cosine_schedule", "lower_is_better", "run_epochs", "train_to_best"]


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to 5 % of the base learning rate, per step."""
    total = max(1, total_steps)
    warm = max(0, min(warmup_steps, total - 1))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class LoopHooks:
    """What a model's loop supplies.

    ``batches(epoch)``: the epoch's training batches (seeded by epoch, so a resumed run
    draws the same ones). ``step(batch, step)``: forward, backward and optimiser step;
    returns the loss parts (``loss`` first). ``validate()``: validation metrics
    (``val_loss`` among them). ``score(row)``: higher is better, picks the best epoch.
    ``on_best()``: save the best weights. ``after_step()``: e.g. the EMA update.
    """

    batches: Callable[[int], Iterable[Any]]
    step: Callable[[Any, int], dict[str, float]]
    validate: Callable[[], dict[str, float]]
    score: Callable[[dict[str, float]], float]
    on_best: Callable[[], None]
    steps_per_epoch: int
    after_step: Callable[[], None] | None = None


def run_epochs(
    run: RunDir,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epochs: int,
    hooks: LoopHooks,
    resume: bool,
    ema: nn.Module | None = None,
    desc: str = "train",
) -> RunState:
    """Train to ``epochs``, from the run's checkpoint when ``resume``."""
    run.prepare(resume)
    state = run.load(model, optimizer, ema=ema, scheduler=scheduler) if resume else RunState()
    for epoch in range(state.epoch, epochs):
        timer = Timer()
        model.train()
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(
            hooks.batches(epoch),
            total=hooks.steps_per_epoch,
            desc=f"{desc} {epoch + 1}/{epochs}",
            unit="step",
            leave=False,
            mininterval=2.0,
        )
        for batch in bar:
            parts = hooks.step(batch, state.step)
            if scheduler is not None:
                scheduler.step()
            if hooks.after_step is not None:
                hooks.after_step()
            state.step += 1
            n += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.set_postfix(loss=f"{sums.get('loss', 0.0) / n:.4f}")
        bar.close()
        train_s = timer()
        val = hooks.validate()
        row: dict[str, float] = {"epoch": epoch + 1, "step": state.step}
        row |= {f"train_{k}": v / max(n, 1) for k, v in sums.items()}
        row |= val
        row["lr"] = float(optimizer.param_groups[0]["lr"])
        row["train_s"] = round(train_s, 1)
        row["epoch_s"] = round(timer(), 1)
        score = hooks.score(row)
        if not math.isfinite(score):  # no validation data: the lowest training loss
            score = -row.get("train_loss", math.inf)
        if score > state.best:
            state.best = score
            hooks.on_best()
            row["best"] = 1.0
        state.history.append(row)
        state.epoch = epoch + 1
        run.save(state, model, optimizer, ema=ema, scheduler=scheduler)
        tqdm.write(
            f"{desc} epoch {epoch + 1}/{epochs}: "
            + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("epoch", "step"))
        )
    return state


def lower_is_better(key: str) -> Callable[[dict[str, float]], float]:
    """A :attr:`LoopHooks.score` that picks the epoch with the lowest ``row[key]``."""

    def score(row: dict[str, float]) -> float:
        v = row.get(key, math.nan)
        return -v if math.isfinite(v) else -math.inf

    return score


def train_to_best(
    run: RunDir,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    hooks: tuple[
        Callable[[int], Iterable[Any]],
        Callable[[Any, int], dict[str, float]],
        Callable[[], dict[str, float]],
    ],
    *,
    epochs: int,
    resume: bool,
    monitor: str,
    steps_per_epoch: int,
    best_path: Path,
    export: dict[str, Any],
) -> tuple[nn.Module, dict[str, float]]:
    """The single-model loop of Noise2Quality and Chest CT-IQA.

    ``hooks`` = (batches, step, validate) as in :class:`LoopHooks`. Trains to ``epochs``,
    keeps the epoch with the lowest ``monitor`` (written to ``best_path`` by
    :func:`training.fit.export.save_weights` with ``export``: ``name``, ``training``,
    ``overrides``), then reloads it. Returns the best model (on the training device)
    and its history row.
    """
    from training.fit.export import load_weights, save_weights

    batches, step, validate = hooks
    score = lower_is_better(monitor)
    loop = LoopHooks(
        batches=batches,
        step=step,
        validate=validate,
        score=score,
        on_best=lambda: save_weights(model, best_path, **export),
        steps_per_epoch=steps_per_epoch,
    )
    state = run_epochs(
        run,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        epochs=epochs,
        hooks=loop,
        resume=resume,
        desc=str(export.get("name", "train")).split("_")[0],
    )
    best = load_weights(best_path, device=next(model.parameters()).device)
    best_row = max(state.history, key=score) if state.history else {}
    return best, best_row
