"""The progress bar ``medseg fit`` adds: Lightning's rich bar, with the training loss read every N steps."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar

from pipeline.training.checks import ACCELERATOR_EVERY_N_STEPS


class ThrottledProgressBar(RichProgressBar):
    """``RichProgressBar`` showing the training loss, copied to the host every ``every_n_steps``.

    A value logged with ``prog_bar=True`` on every step is copied to the host by Lightning after
    every batch, and on a GPU each copy waits for the GPU: a host synchronisation per step. So the
    module logs ``train/loss`` without ``prog_bar``, and this bar reads it (from the trainer's
    callback metrics) every ``every_n_steps`` optimiser steps. The bar itself advances every batch.

    Args:
        every_n_steps: optimiser steps between reads of the loss; None: every batch on a CPU (a
            read is free there), every 50 steps on an accelerator.
        metric: the logged value to show.
        **kwargs: ``RichProgressBar``'s arguments.
    """

    def __init__(self, every_n_steps: int | None = None, metric: str = "train/loss", **kwargs: Any) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(
                f"every_n_steps must be None (1 on a CPU, 50 on a GPU) or >= 1, got {every_n_steps}"
            )
        super().__init__(**kwargs)
        self.every_n_steps = every_n_steps
        self.metric = metric
        self._shown: float | None = None
        self._read_at: int | None = None

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        if not trainer.training:
            return items
        every = self.every_n_steps or (1 if pl_module.device.type == "cpu" else ACCELERATOR_EVERY_N_STEPS)
        value = trainer.callback_metrics.get(self.metric)
        due = self._read_at is None or trainer.global_step - self._read_at >= every
        if value is not None and due:
            self._shown, self._read_at = float(value), trainer.global_step  # the one host read
        if self._shown is not None:
            items[self.metric] = round(self._shown, 4)
        return items
