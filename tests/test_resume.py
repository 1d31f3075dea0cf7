"""Resume after SIGKILL / SIGTERM: identical weights and val/dice to an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.errors import CheckpointError
from pipeline.training.checkpoint import SafeCheckpointIO, load_checkpoint
from tests.conftest import run_path
from tests.helpers.resume import (
    BEST,
    MONITORS,
    final_state,
    finish,
    kill_at,
    last_every,
    max_difference,
    run_args,
    start_fit,
)

RUN = "unet-relu-kaiming-d3-s0"  # of experiment "resume"


@pytest.fixture(scope="module")
def uninterrupted(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    runs = tmp_path_factory.mktemp("uninterrupted")
    main(run_args(phantom_dir, runs, [BEST, last_every(2), *MONITORS], "--run.wandb", "false"))
    return final_state(run_path(runs, "resume", phantom_dir, RUN))


def test_resume_after_sigkill_mid_epoch_is_exact(phantom_dir, tmp_path, uninterrupted):
    runs = tmp_path / "runs"
    # Killed in the middle of step 5 (epoch 1, third batch); last.ckpt is from step 4, mid-epoch.
    child = start_fit(run_args(phantom_dir, runs, [BEST, last_every(2), *MONITORS, kill_at(5, "SIGKILL")]))
    code, err = finish(child)
    assert code == -9, err[-2000:]
    run = run_path(runs, "resume", phantom_dir, RUN)
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4 and checkpoint["epoch"] == 1
    assert checkpoint["SegmentationDataModule"]["train_position"] == (1, 1)
    wandb_id = (run / "wandb_id.txt").read_text()

    main(run_args(phantom_dir, runs, [BEST, last_every(2), *MONITORS], "--ckpt_path", "last"))

    weights, dice, losses, monitors = final_state(run)
    reference_weights, reference_dice, reference_losses, reference_monitors = uninterrupted
    assert max_difference(weights, reference_weights) <= 1e-6
    assert dice == pytest.approx(reference_dice, abs=1e-6)
    # metrics.csv keeps the steps logged before the kill, each step once, with the same losses
    assert [step for step, _ in losses] == [step for step, _ in reference_losses] == list(range(6))
    assert [loss for _, loss in losses] == pytest.approx([loss for _, loss in reference_losses], abs=1e-6)
    # the monitors continue from the checkpoint: all 6 gradient logs, the first one from before the kill
    grads, reference_grads = monitors["GradientFlowMonitor"], reference_monitors["GradientFlowMonitor"]
    assert grads["logs"] == reference_grads["logs"] == 6
    assert grads["first_last_ratio"] == pytest.approx(reference_grads["first_last_ratio"], rel=1e-5)
    # epoch 1 resumed mid-way has no start-of-epoch weights: the record is epoch 0's, from the checkpoint
    assert set(monitors["WeightUpdateMonitor"]["last"]) == set(
        reference_monitors["WeightUpdateMonitor"]["last"]
    )
    # the same W&B run continues: both offline run folders carry the first run's id
    assert (run / "wandb_id.txt").read_text() == wandb_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{wandb_id}"))) == 2


def stopped_by_sigterm(data: Path, runs: Path, step: int = 1) -> Path:
    """A run sent SIGTERM during ``step``; returns its run directory after checking the exit."""
    callbacks = [BEST, last_every(0), kill_at(step, "SIGTERM")]  # in epoch 0 only SIGTERM writes last.ckpt
    child = start_fit(run_args(data, runs, callbacks, "--run.wandb", "false"))
    code, err = finish(child)
    assert code == 143, err[-2000:]
    assert "stopped by SIGTERM" in err
    return run_path(runs, "resume", data, RUN)


def test_resume_sigterm_saves_a_complete_checkpoint(phantom_dir, tmp_path):
    run = stopped_by_sigterm(phantom_dir, tmp_path / "runs")
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    # the step in flight when the signal came finished, then the run stopped at the batch boundary
    assert checkpoint["global_step"] == 2 and checkpoint["epoch"] == 0
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "medseg"):
        assert checkpoint[key], key
    assert checkpoint["optimizer_states"][0]["state"], "optimiser moments missing"
    assert checkpoint["SegmentationDataModule"]["train_position"] == (0, 2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"].startswith("preempted")
    assert summary["SigtermCheckpoint"]["step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("step", [1, 2], ids=["mid-epoch", "last-batch-of-epoch"])
def test_resume_after_sigterm_is_exact(phantom_dir, tmp_path, uninterrupted, step):
    # step 2 is epoch 0's last batch: the checkpoint is written at the epoch's end, after validation
    runs = tmp_path / "runs"
    run = stopped_by_sigterm(phantom_dir, runs, step)
    main(run_args(phantom_dir, runs, [BEST, last_every(0)], "--run.wandb", "false", "--ckpt_path", "last"))
    weights, dice, losses, _ = final_state(run)
    reference_weights, reference_dice, reference_losses, _ = uninterrupted
    assert max_difference(weights, reference_weights) <= 1e-6
    assert dice == pytest.approx(reference_dice, abs=1e-6)
    # the step in flight at the signal is in the checkpoint and in metrics.csv, each step once
    assert [step for step, _ in losses] == list(range(6))
    assert [loss for _, loss in losses] == pytest.approx([loss for _, loss in reference_losses], abs=1e-6)


def test_resume_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = SafeCheckpointIO()
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def crash(obj, f):  # a kill in the middle of writing: half a file, then gone
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    assert load_checkpoint(path)["step"] == 1  # the previous checkpoint is intact
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_resume_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        SafeCheckpointIO().load_checkpoint(tmp_path / "nope.ckpt")
