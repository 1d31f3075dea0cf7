"""The learning-rate schedule: linear warm-up, then cosine decay to a floor, by optimiser step.

The decay ends where the run ends: at the trainer's planned number of steps, or, when
``trainer.max_time`` stops the run first, at the step the time budget will be spent, so a
time-limited run still anneals and ends at its floor instead of being cut at a high learning rate.
That step is re-estimated at every epoch's start from the time used so far (rank zero's clock,
broadcast, so every DDP process follows one schedule).
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Timer


class WarmupCosine:
    """``lr`` factor of optimiser step ``step``: (step + 1) / (warmup + 1) during the warm-up, then
    cosine from 1 to ``floor`` at step ``total`` (and ``floor`` beyond it).

    Args:
        warmup: warm-up steps.
        total: the run's steps (updated as the time budget is measured; inf: no decay yet).
        floor: the final factor.
    """

    def __init__(self, warmup: int, total: float, floor: float) -> None:
        self.warmup, self.total, self.floor = warmup, total, floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = (
            (step - self.warmup) / max(1.0, self.total - self.warmup) if math.isfinite(self.total) else 0.0
        )
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def planned_steps(trainer: pl.Trainer) -> float:
    """The optimiser steps the run will take: the trainer's estimate (epochs or max_steps), or
    fewer when ``max_time`` will stop it first (steps so far x budget / time used)."""
    steps = float(trainer.estimated_stepping_batches)
    # Lightning's callback connector sets trainer.callbacks; the Trainer class does not declare it
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    timer = next((c for c in callbacks if isinstance(c, Timer)), None)
    remaining = timer.time_remaining("train") if timer is not None else None
    if timer is not None and remaining is not None and trainer.global_step > 0:
        elapsed = timer.time_elapsed("train")
        if elapsed > 0:
            budget = elapsed + max(0.0, remaining)
            steps = min(steps, trainer.global_step * budget / elapsed)
    return float(trainer.strategy.broadcast(steps))
