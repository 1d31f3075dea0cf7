"""ValidationBudget on a run with a known clock: which epochs are validated."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel

from pipeline.training import validation_budget
from pipeline.training.validation_budget import ValidationBudget


class Clock:
    """A fake monotonic clock: training steps and validation steps advance it by set amounts."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedModel(BoringModel):
    """Two training steps an epoch of 1 s each; validation of ``cost`` seconds (one step)."""

    def __init__(self, clock: Clock, cost: float) -> None:
        super().__init__()
        self.clock, self.cost, self.validated = clock, cost, []

    def training_step(self, batch, batch_idx):
        self.clock.now += 1.0
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.clock.now += self.cost
        if not self.trainer.sanity_checking:
            self.validated.append(self.current_epoch)
        return super().validation_step(batch, batch_idx)


def fit(tmp_path, monkeypatch, share: float, epochs: int, cost: float = 10.0, **trainer_args) -> list[int]:
    clock = Clock()
    monkeypatch.setattr(validation_budget.time, "monotonic", clock)
    model = TimedModel(clock, cost)
    trainer = pl.Trainer(
        max_epochs=epochs, limit_train_batches=2, limit_val_batches=1, callbacks=[ValidationBudget(share)],
        default_root_dir=tmp_path, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", **trainer_args,
    )  # fmt: skip
    trainer.fit(model)
    return model.validated


def test_validation_budget_spaces_costly_validations_and_keeps_the_first_and_last(tmp_path, monkeypatch):
    # validation 10 s, training 2 s an epoch, half the time at most: after 20 s of training, i.e.
    # every 10th epoch; the sanity check (2 validation steps) counts for nothing
    assert fit(tmp_path, monkeypatch, 0.5, 25) == [0, 10, 20, 24]


def test_validation_budget_validates_every_epoch_when_validation_is_cheap(tmp_path, monkeypatch):
    # 0.1 s of validation against 2 s of training an epoch: within 10% after every epoch
    assert fit(tmp_path, monkeypatch, 0.1, 4, cost=0.1) == [0, 1, 2, 3]


def test_validation_budget_leaves_a_configured_rhythm_alone(tmp_path, monkeypatch):
    assert fit(tmp_path, monkeypatch, 0.1, 6, check_val_every_n_epoch=3) == [2, 5]


def test_validation_budget_refuses_a_share_outside_0_1():
    with pytest.raises(ValueError, match="max_share must be in"):
        ValidationBudget(0.0)


def test_validation_budget_validates_the_epoch_a_time_budget_cuts_however_long_it_took(tmp_path, monkeypatch):
    # epochs of 2 s, validation 10 s, a 15 s budget: epoch 1 starts with 3 s left, more than an
    # epoch takes, so it is not due; its steps then slow to 3 s and the Timer stops the run in its
    # second step: those last weights must still be validated (a 30-minute real-size fit lost its
    # last 25 minutes this way), and only once
    from datetime import timedelta

    from pytorch_lightning.callbacks import timer as lightning_timer

    clock = Clock()
    monkeypatch.setattr(validation_budget.time, "monotonic", clock)
    monkeypatch.setattr(lightning_timer.time, "monotonic", clock)

    class SlowingModel(TimedModel):
        def training_step(self, batch, batch_idx):
            self.clock.now += 2.0 if self.current_epoch > 0 else 0.0  # 1 s, then 3 s a step
            return super().training_step(batch, batch_idx)

    model = SlowingModel(clock, 10.0)
    trainer = pl.Trainer(
        max_time=timedelta(seconds=15), max_epochs=10, limit_train_batches=2, limit_val_batches=1,
        callbacks=[ValidationBudget(0.1)], default_root_dir=tmp_path, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model)
    assert model.validated == [0, 1]


def test_validation_budget_does_not_validate_again_an_epoch_begun_after_the_budget(monkeypatch):
    # the budget ran out during the last validation: Lightning starts an epoch and stops after one
    # step; validating that step again would cost a whole validation for nothing
    from types import SimpleNamespace

    from pytorch_lightning.callbacks import Timer

    timer = Timer(duration="00:00:10:00")
    budget = ValidationBudget(0.1)
    budget.validation_seconds, budget.epoch_seconds, budget.since_validation = 10.0, 2.0, 0.0
    trainer = SimpleNamespace(max_epochs=None, current_epoch=3, callbacks=[timer])
    monkeypatch.setattr(timer, "time_remaining", lambda stage: 100.0)
    assert not budget.due(trainer)
    monkeypatch.setattr(timer, "time_remaining", lambda stage: -3.0)
    assert not budget.due(trainer)
