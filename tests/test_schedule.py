"""The learning-rate schedule: warm-up, cosine to the floor at the run's end, and a time budget."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from pytorch_lightning.callbacks import Timer

from pipeline.training.schedule import WarmupCosine, planned_steps


def test_schedule_warms_up_then_anneals_to_the_floor_at_the_last_step():
    schedule = WarmupCosine(warmup=10, total=110, floor=0.01)
    assert schedule(0) == pytest.approx(1 / 11) and schedule(9) == pytest.approx(10 / 11)
    assert schedule(10) == pytest.approx(1.0) and schedule(60) == pytest.approx(0.505)
    assert schedule(110) == pytest.approx(0.01) and schedule(500) == pytest.approx(0.01)
    assert WarmupCosine(0, math.inf, 0.01)(1000) == 1.0  # no end known yet: no decay


class FakeTimer(Timer):
    def __init__(self, elapsed: float, remaining: float) -> None:
        super().__init__(duration="00:01:00:00")
        self.elapsed, self.remaining = elapsed, remaining

    def time_elapsed(self, stage="train") -> float:
        return self.elapsed

    def time_remaining(self, stage="train") -> float:
        return self.remaining


def trainer(steps_planned: float, step: int, timer: Timer | None) -> SimpleNamespace:
    strategy = SimpleNamespace(broadcast=lambda value: value)
    return SimpleNamespace(
        estimated_stepping_batches=steps_planned,
        global_step=step,
        callbacks=[timer] if timer else [],
        strategy=strategy,
    )


def test_schedule_a_time_budget_ends_the_decay_where_the_time_ends():
    # 100 steps took a quarter of the budget: 400 steps in all, fewer than the 10,000 the epochs plan
    assert planned_steps(trainer(10_000, 100, FakeTimer(elapsed=900.0, remaining=2700.0))) == pytest.approx(
        400
    )
    assert planned_steps(trainer(10_000, 100, None)) == 10_000  # no time budget: the epochs decide
    assert planned_steps(trainer(300, 100, FakeTimer(900.0, 2700.0))) == 300  # the epochs end first
    assert planned_steps(trainer(math.inf, 0, FakeTimer(0.0, 3600.0))) == math.inf  # nothing measured yet
