"""``StepTimer``: where the wall time of a ``medseg fit`` goes, written to a JSON file at the end.

Added on the command line by ``benchmarks/real_size.py`` (the repository root on ``PYTHONPATH``)::

    medseg fit ... --trainer.callbacks+='{"class_path": "benchmarks.step_timer.StepTimer",
                                          "init_args": {"output": "/tmp/steps.json"}}'

A training step is the time from this callback's ``on_train_batch_start`` to its
``on_train_batch_end``: forward, loss, backward, clipping, optimiser step and the other callbacks'
per-step hooks. Everything else is outside the steps: start-up (imports, planning, caching, model
and Trainer set-up, loader workers starting), waiting for the next batch, validation,
checkpointing and the end of the run. Clock readings are ``time.time()`` (seconds since the
epoch), so the benchmark can place them against the moment it launched the process.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


class StepTimer(Callback):
    """Sums the seconds of training steps, validations and checkpoint writes of one fit.

    Args:
        output: JSON file written when the fit ends (``teardown``), atomically.
    """

    def __init__(self, output: str = "step_timer.json") -> None:
        self.output = output
        self.stamps: dict[str, float] = {}
        self.step_seconds = self.wait_seconds = self.validation_seconds = self.checkpoint_seconds = 0.0
        self.steps = self.validations = self.checkpoints = 0
        self.epochs: list[dict[str, float]] = []
        self._step_start = self._step_end = self._validation_start = self._epoch_start = 0.0
        self._epoch_validation = 0.0

    def _stamp(self, name: str) -> None:
        self.stamps.setdefault(name, time.time())

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stamp("setup")
        save = trainer.save_checkpoint

        def timed_save(*args: Any, **kwargs: Any) -> None:  # every ModelCheckpoint write goes here
            start = time.perf_counter()
            save(*args, **kwargs)
            self.checkpoint_seconds += time.perf_counter() - start
            self.checkpoints += 1

        trainer.save_checkpoint = timed_save  # type: ignore[method-assign]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stamp("fit_start")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stamp("train_start")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start, self._epoch_validation, self._step_end = time.perf_counter(), 0.0, 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._stamp("first_batch")
        self._step_start = time.perf_counter()
        if self._step_end:  # the loader's next batch and the loop between two steps
            self.wait_seconds += self._step_start - self._step_end

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._step_end = time.perf_counter()
        self.step_seconds += self._step_end - self._step_start
        self.steps += 1

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._validation_start
        self.validation_seconds += seconds
        self._epoch_validation += seconds
        self.validations += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = time.perf_counter() - self._epoch_start
        self.epochs.append({"seconds": total, "validation_seconds": self._epoch_validation})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stamp("fit_end")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":  # `medseg test` of the run's config.yaml brings this callback along
            return
        self._stamp("teardown")
        result = {
            "stamps": self.stamps,
            "steps": self.steps,
            "step_seconds": self.step_seconds,
            "wait_seconds": self.wait_seconds,
            "validations": self.validations,
            "validation_seconds": self.validation_seconds,
            "checkpoints": self.checkpoints,
            "checkpoint_seconds": self.checkpoint_seconds,
            "epochs": self.epochs,
            "global_step": trainer.global_step,
        }
        tmp = Path(f"{self.output}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(self.output)
