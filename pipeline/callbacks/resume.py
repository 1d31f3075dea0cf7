"""What a resumed run needs beyond Lightning's own checkpoint: per-batch seeds and a save on SIGTERM.

Lightning restores weights, optimiser, scheduler and loop counters from ``--ckpt_path``, but not the
global random number generators (dropout draws from them), and on SIGTERM it only stops. With these
two callbacks (``medseg fit`` adds both) a run killed at any point and resumed with
``--ckpt_path last`` continues exactly as the uninterrupted run from that checkpoint on;
``pipeline.data.order`` does the same for the data order and augmentation.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pipeline.data.order import global_seed

log = logging.getLogger(__name__)


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
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int
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
    """Writes ``last.ckpt`` when training stops on SIGTERM (as a cluster sends before pre-emption).

    Lightning's own SIGTERM handler only sets a flag; training then stops at the next batch
    boundary with ``SIGTERMException``. There the state is complete (the batch's optimiser step and
    loop counters are done), and this callback saves it where ``--ckpt_path last`` finds it.
    Other exceptions save nothing: after a crash mid-step the state may be half-updated.
    """

    def __init__(self) -> None:
        self.saved: dict | None = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # the full state: optimiser, loops, callbacks
        self.saved = {"signal": "SIGTERM", "step": trainer.global_step, "checkpoint": str(path)}
        log.info("SIGTERM: saved step %d to %s; resume with --ckpt_path last", trainer.global_step, path)

    def summary(self) -> dict:
        """The checkpoint written on SIGTERM, if any."""
        return self.saved or {}
