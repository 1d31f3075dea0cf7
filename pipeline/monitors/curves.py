"""TrainingCurves: ``<run>/plots/progress.png``, the run's curves per epoch without W&B.

Three panels, redrawn at every epoch's end: training and validation loss; validation Dice, the
foreground mean and each class; the learning rate. The history is kept in checkpoints, so a
resumed run's plot covers the whole run.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from pipeline.monitors.outputs import plot_dir
from pipeline.monitors.plots import figure, save_png


def _value(metrics: dict, key: str) -> float:
    value = metrics.get(key)
    return float(value) if isinstance(value, (torch.Tensor, float, int)) else math.nan


class TrainingCurves(pl.Callback):
    """Records the epoch's losses, validation Dice and learning rate; draws ``plots/progress.png``."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        row = {"epoch": float(trainer.current_epoch)}
        row["train/loss"] = _value(metrics, "train/loss_epoch")
        row.update({k: _value(metrics, k) for k in metrics if k == "val/loss" or k.startswith("val/dice")})
        row.pop("val/dice_best", None)
        optimizers = trainer.optimizers
        row["lr"] = float(optimizers[0].param_groups[0]["lr"]) if optimizers else math.nan
        self.history.append(row)
        self.draw(trainer)

    def draw(self, trainer: pl.Trainer) -> None:
        fig = figure(13.0, 3.6)
        loss, dice, rate = fig.subplots(1, 3)
        epochs = [row["epoch"] for row in self.history]

        def series(key: str) -> list[float]:
            return [row.get(key, math.nan) for row in self.history]

        for key, label in (("train/loss", "train"), ("val/loss", "validation")):
            loss.plot(epochs, series(key), marker=".", label=label)
        dice_keys = sorted({k for row in self.history for k in row if k.startswith("val/dice_")})
        dice.plot(epochs, series("val/dice"), marker=".", color="black", linewidth=2, label="mean")
        for key in dice_keys:
            dice.plot(epochs, series(key), marker=".", label=key.removeprefix("val/dice_"))
        rate.plot(epochs, series("lr"), marker=".")
        for ax, title in ((loss, "loss"), (dice, "validation Dice"), (rate, "learning rate")):
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
        loss.legend(fontsize=7)
        dice.set_ylim(0, 1)
        dice.legend(fontsize=7)
        rate.set_yscale("log")
        save_png(fig, plot_dir(trainer) / "progress.png")

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]
