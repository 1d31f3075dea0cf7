"""``ValidationBudget``: whole-case validation spaced so it takes at most a set share of the time.

Volumes are validated case by case in 3D on their own grid; on a CPU a CT of 512 x 512 x 100
takes about two minutes to predict, as long as an epoch of training, so validating after every
epoch would spend half of a time budget there. After each validation the callback knows what one
costs (``v`` seconds) and what an epoch of training costs (``t``); an epoch ends with a validation
when the training time since the last one, this epoch included, is at least ``v / max_share``.
Small data sets, whose validation is cheap, are still validated after every epoch. The first
epoch is always validated (nothing is measured yet), and so is the last one, whether the run
ends by ``max_epochs`` or by ``max_time``: after every training step of an epoch not yet due, the
callback asks whether the ``Timer`` is about to stop the run (``trainer.should_stop``, or under
``STOP_MARGIN`` seconds left) and, if so, lets Lightning validate as it stops, so the best and
the last checkpoints are scored however long the cut epoch took (a slow epoch must not leave the
last half hour of a run unscored); an epoch started after the budget ran out (Lightning starts
one and stops after its first step) is not validated again. Rank zero decides, for every DDP
process.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, Timer

SKIP = 2**31 - 1  # check_val_every_n_epoch that no epoch of a run reaches
STOP_MARGIN = 1.0  # seconds: a Timer with less left stops the run at this step or the next


class ValidationBudget(Callback):
    """Validate after an epoch only when validation stays within ``max_share`` of the time.

    Args:
        max_share: validation time as a share of the training time, in (0, 1].
    """

    def __init__(self, max_share: float = 0.05) -> None:
        if not 0 < max_share <= 1:
            raise ValueError(f"max_share must be in (0, 1], got {max_share}")
        self.max_share = max_share
        self.validation_seconds: float | None = None  # the last validation's wall time
        self.epoch_seconds: float | None = None  # the last epoch's training time
        self.since_validation = 0.0  # training seconds since the last validation
        self._epoch_start = self._validation_start = 0.0
        self._validated = 0.0  # validation seconds within the current epoch
        self._watch_stop = False  # whether this epoch's steps ask if the Timer is about to stop
        self.active = True

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("validation_seconds", "epoch_seconds", "since_validation")}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # a run configured to validate every n epochs (n > 1) or every n steps keeps its own rhythm
        self.active = trainer.check_val_every_n_epoch == 1

    def due(self, trainer: pl.Trainer) -> bool:
        """Whether the epoch starting now should end with a validation."""
        if self.validation_seconds is None or self.epoch_seconds is None:
            return True
        if trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs - 1:
            return True
        remaining = self._time_remaining(trainer)
        if remaining is not None and remaining <= 0:
            return False  # the budget ran out during the last validation: Lightning stops after a step
        training = self.since_validation + self.epoch_seconds
        return training * self.max_share >= self.validation_seconds

    @staticmethod
    def _time_remaining(trainer: pl.Trainer) -> float | None:
        """Seconds the ``Timer`` leaves the run (None without one, or without a time limit)."""
        # Lightning's callback connector sets trainer.callbacks; the Trainer class does not declare it
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        timer = next((c for c in callbacks if isinstance(c, Timer)), None)
        return timer.time_remaining("train") if timer is not None else None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._watch_stop = False
        if self.active:
            remaining = self._time_remaining(trainer)
            # an epoch begun with the budget spent ends after one step, its weights already scored
            time_left = remaining is not None and remaining > 0
            validate, time_left = trainer.strategy.broadcast((self.due(trainer), time_left))
            trainer.check_val_every_n_epoch = 1 if validate else SKIP
            self._watch_stop = not validate and time_left
        self._epoch_start, self._validated = time.monotonic(), 0.0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: object,
        batch_idx: int,
    ) -> None:
        # runs before the Timer's own hook (Lightning appends the Timer after the configured
        # callbacks): validate if the Timer stops the run at this step or soon after
        if not self._watch_stop:
            return
        remaining = self._time_remaining(trainer)
        stopping = trainer.should_stop or (remaining is not None and remaining <= STOP_MARGIN)
        if trainer.strategy.broadcast(stopping):
            trainer.check_val_every_n_epoch, self._watch_stop = 1, False

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validated = time.monotonic() - self._validation_start
        self.validation_seconds, self.since_validation = self._validated, 0.0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook: its time is not training time
        self.epoch_seconds = time.monotonic() - self._epoch_start - self._validated
        if not self._validated:
            self.since_validation += self.epoch_seconds
