"""Where the monitors write: every logger (W&B and the CSV mirror), the W&B run, the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Log plain floats to every logger at the current global step (rank zero only).

    Going to the loggers directly, not through ``LightningModule.log``, keeps per-step logging
    free of Lightning's result aggregation; W&B and ``metrics.csv`` get the same values.
    """
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def wandb_run(trainer: pl.Trainer) -> Any | None:
    """The W&B run of the trainer's ``WandbLogger`` on rank zero, else None."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment
    return None


def log_media(trainer: pl.Trainer, media: dict[str, Any]) -> None:
    """Log W&B media (images, plots) at the current global step, if there is a W&B run."""
    run = wandb_run(trainer)
    if run is not None:
        run.log({**media, "trainer/global_step": trainer.global_step})


def plot_dir(trainer: pl.Trainer) -> Path:
    """``<run>/plots``: the trainer's ``default_root_dir`` is the run directory under ``medseg``."""
    return Path(trainer.default_root_dir) / "plots"
