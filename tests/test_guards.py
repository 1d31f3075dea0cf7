"""Divergence guard: a NaN/inf loss or gradient stops training at that step, the last good checkpoint kept."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from pipeline.cli import main
from pipeline.errors import TrainingDiverged
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.guards import DivergenceGuard
from tests.conftest import run_path
from tests.helpers.resume import BEST, last_every, run_args


def test_guards_diverging_learning_rate_stops_at_that_step(phantom_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    # lr 1e30: step 0 moves every weight by ~1e29, so step 1's forward pass overflows to NaN.
    args = run_args(phantom_dir, runs, [BEST, last_every(1)], "--run.wandb", "false", "--model.lr", "1e30")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "training diverged at step 1 (epoch 0, batch 1)" in lines[0]
    assert "learning rate" in lines[0] and "last good checkpoint is kept" in lines[0]

    run = run_path(runs, "resume", phantom_dir, "unet-relu-kaiming-d3-s0")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"].startswith("failed: TrainingDiverged")
    event = summary["DivergenceGuard"]
    assert event["diverged"] and event["step"] == 1 and event["loss"] == "nan"
    # the checkpoint written after step 0 is untouched, loadable and finite
    checkpoint = load_checkpoint(event["checkpoint"])
    assert checkpoint["global_step"] == 1
    weights = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    assert weights and all(torch.isfinite(v).all() for v in weights.values())


def fake_trainer(tmp_path, scaler: object = None, clip: float | None = None) -> SimpleNamespace:
    """The trainer attributes DivergenceGuard reads, for a single process at step 7."""
    return SimpleNamespace(
        precision_plugin=SimpleNamespace(scaler=scaler),
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
        world_size=1,
        global_step=7,
        current_epoch=1,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=2)),
        gradient_clip_val=clip,
        checkpoint_callback=None,
        checkpoint_callbacks=[],
        default_root_dir=str(tmp_path),
    )


def optimizer_with_gradient(value: float) -> torch.optim.Optimizer:
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.tensor([1.0, value, 1.0])
    return torch.optim.SGD([weight], lr=0.1)


def test_guards_infinite_gradient_with_finite_loss_is_exploding_gradients(tmp_path):
    guard = DivergenceGuard()
    trainer = fake_trainer(tmp_path)
    guard.on_before_backward(trainer, None, torch.tensor(0.7))
    with pytest.raises(
        TrainingDiverged, match=r"step 7 \(epoch 1, batch 2\).*exploding gradients.*not clipped"
    ):
        guard.on_before_optimizer_step(trainer, None, optimizer_with_gradient(float("inf")))
    assert guard.summary()["step"] == 7 and guard.summary()["grad_norm"] == "inf"


def test_guards_finite_step_passes_and_fp16_overflow_is_left_to_the_scaler(tmp_path):
    guard = DivergenceGuard()
    trainer = fake_trainer(tmp_path)
    guard.on_before_backward(trainer, None, torch.tensor(0.7))
    guard.on_before_optimizer_step(trainer, None, optimizer_with_gradient(2.0))
    # fp16 mixed precision: the GradScaler skips steps with inf gradients by design
    scaled = fake_trainer(tmp_path, scaler=object())
    guard.on_before_optimizer_step(scaled, None, optimizer_with_gradient(float("inf")))
    assert guard.summary() == {"diverged": False}
