"""What a resumed run needs beyond Lightning's own checkpoint: per-batch seeds and a save on SIGTERM.

Lightning restores weights, optimiser, scheduler and loop counters from ``--ckpt_path``, but not the
global random number generators (dropout draws from them), and on SIGTERM it only stops. With these
two callbacks (``medseg fit`` adds both) a run killed at any point and resumed with
``--ckpt_path last`` continues exactly as the uninterrupted run from that checkpoint on;
``pipeline.data.loading.order`` does the same for the data order and augmentation.
"""

from __future__ import annotations

import random
import signal
import threading
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pipeline.data.loading.order import global_seed
from pipeline.training.checks import StepChecks


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """A 63-bit seed that depends only on (run seed, epoch, batch index, rank), well mixed."""
    state = np.random.SeedSequence([abs(seed), epoch, batch, rank]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class BatchSeed(pl.Callback):
    """Seeds the torch, NumPy and Python RNGs before every training batch from where the run is.

    Dropout and any other randomness inside a step then depend only on (seed, epoch, batch, rank),
    not on what ran before: a run resumed at any batch draws exactly what the uninterrupted run
    drew, however many random numbers callbacks, data loader start-up or the sanity check used in
    between. (Saving and restoring RNG states in the checkpoint instead is exact only if nothing
    draws between the save and the next batch, which epoch-end callbacks and a new epoch's data
    loader do.) Ranks get different streams, so DDP processes draw different dropout masks.
    """

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int
    ) -> None:
        seed = batch_seed(global_seed(), trainer.current_epoch, batch_idx, trainer.global_rank)
        torch.manual_seed(seed)  # seeds every CUDA device too
        np.random.seed(seed % 2**32)
        random.seed(seed)


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """Where ``--ckpt_path last`` looks: ``last.ckpt`` in the first ``ModelCheckpoint``'s folder."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class SigtermCheckpoint(pl.Callback):
    """On SIGTERM (as a cluster sends before pre-emption), writes ``last.ckpt`` and stops training.

    The signal handler only sets a flag. One process stops at the next training batch boundary
    (at the epoch's end, after its validation, for an epoch's last batch). DDP ranks must stop
    together, so they agree on the flag where they read the shared ``StepChecks`` (one all-reduce
    with the divergence flag: every step on CPUs, every 50 on GPUs, and at every epoch's end), and
    stop at the batch boundary after that read. ``last.ckpt`` is written where ``--ckpt_path last``
    finds it, and ``SIGTERMException`` ends the fit (``medseg`` exits 143). Lightning's own
    handler is replaced while training: it broadcasts from inside the handler, which deadlocks
    DDP when ranks receive the signal in different collectives (observed with 2 CPU ranks).

    Args:
        checks: the ``StepChecks`` shared with ``DivergenceGuard``; default: its own, read every step.
    """

    def __init__(self, checks: StepChecks | None = None) -> None:
        self.checks = checks or StepChecks(every_n_steps=1)
        self.saved: dict | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores the handlers from before the fit in its teardown.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.checks.stop_requested = True

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: object,
        batch_idx: int,
    ) -> None:
        # An epoch's last batch waits for the epoch's end (its validation included), as an
        # uninterrupted run does.
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        due = self.checks.unread(trainer) >= self.checks.interval(pl_module.device)
        self._stop_if_requested(trainer, "batch_end" if due else None, log_step=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not at on_validation_end: Lightning resumes a checkpoint saved there (epoch not yet
        # marked processed) by skipping the next epoch's last batch and its validation.
        self._stop_if_requested(trainer, "epoch_end")

    def _stop_if_requested(self, trainer: pl.Trainer, place: str | None, log_step: bool = False) -> None:
        """Stop if a SIGTERM arrived: this process's own flag, or under DDP the flag all ranks
        agreed on at the last read (a new read at ``place`` if given)."""
        if trainer.world_size == 1:
            requested = self.checks.stop_requested
        else:
            requested = (self.checks.read(trainer, place) if place else self.checks.reading).stop
        if not requested:
            return
        if log_step:
            # Lightning sends a step's metrics to the loggers after on_train_batch_end: do it now,
            # or the step this save includes would have no row in metrics.csv and W&B.
            trainer._logger_connector.update_train_step_metrics()
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # the full state: optimiser, loops, callbacks
        self.saved = {"signal": "SIGTERM", "step": trainer.global_step, "checkpoint": str(path)}
        rank_zero_info(f"SIGTERM: saved step {trainer.global_step} to {path}; resume with --ckpt_path last")
        raise SIGTERMException

    def summary(self) -> dict:
        """The checkpoint written on SIGTERM, if any."""
        return self.saved or {}
