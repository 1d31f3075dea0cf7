"""DDP on CPU (gloo): validation Dice over 2 processes equals one process, each image scored once."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl

from pipeline.cli import main
from pipeline.data.datamodule import SegmentationDataModule
from pipeline.models import build_net
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.module import SegmentationModule
from tests.conftest import run_path, volume_fit_args
from tests.helpers.resume import (
    BEST,
    final_state,
    finish,
    kill_at,
    last_every,
    max_difference,
    run_args,
    start_fit,
)

# 3 validation images, one a batch: DistributedSampler pads 3 batches to 4, so one image is seen twice
VAL = ("--data.val_fraction", "0.25", "--data.val_batch_size", "1", "--trainer.limit_val_batches", "1.0")


def validate_in_one_process(checkpoint_path: Path, data: Path) -> dict[str, float]:
    """The checkpoint's validation metrics from a plain single-process ``Trainer.validate``."""
    checkpoint = load_checkpoint(checkpoint_path)
    stored = checkpoint["medseg"]
    module = SegmentationModule(build_net(stored["net"]), class_names=stored["class_names"], hd95=False)
    module.load_state_dict(checkpoint["state_dict"])
    data_module = SegmentationDataModule(root=str(data), val_fraction=0.25, val_batch_size=1, num_workers=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    (metrics,) = trainer.validate(module, data_module, verbose=False)
    return metrics


def test_ddp_two_processes_score_each_validation_image_once(phantom_dir, tmp_path):
    runs = tmp_path / "runs"
    ddp = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    one_epoch = ("--trainer.max_epochs", "1", "--run.wandb", "false")
    child = start_fit(run_args(phantom_dir, runs, [BEST, last_every(0)], *one_epoch, *VAL, *ddp))
    code, err = finish(child)
    assert code == 0, err[-3000:]

    run = run_path(runs, "resume", phantom_dir, "unet-relu-kaiming-d3-s0")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 1
    single = validate_in_one_process(run / "checkpoints" / "last.ckpt", phantom_dir)

    assert summary["final"]["val/images"] == single["val/images"] == 3  # 4 scored, one a padding repeat
    assert summary["final"]["val/dice"] == pytest.approx(single["val/dice"], abs=1e-6)
    assert summary["final"]["val/loss"] == pytest.approx(single["val/loss"], abs=1e-6)  # the repeat once
    for name in ("organ", "lesion", "vessel"):
        assert summary["final"][f"val/dice_{name}"] == pytest.approx(single[f"val/dice_{name}"], abs=1e-6)
    # rank 0 alone writes the run directory's files
    assert json.loads((run / "split.json").read_text())["val"] and len(list(run.glob("split*.json"))) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.mark.slow
# 10 training images over 2 ranks: SIGTERM in step 1 is the epoch's last step / a middle one
@pytest.mark.parametrize(
    ("batch_size", "steps_per_epoch"), [(2, 2), (1, 3)], ids=["last-batch-of-epoch", "mid-epoch"]
)
def test_ddp_sigterm_on_every_rank_saves_one_checkpoint_and_resumes_exactly(
    phantom_dir, tmp_path, batch_size, steps_per_epoch
):
    # As SLURM signals every task: both ranks get SIGTERM in the middle of step 1.
    runs = tmp_path / "runs"
    ddp = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    ddp += ("--run.wandb", "false", "--data.batch_size", str(batch_size))
    callbacks = [BEST, last_every(0), kill_at(1, "SIGTERM")]
    code, err = finish(start_fit(run_args(phantom_dir, runs, callbacks, *ddp)), 240)
    assert code == 143, err[-3000:]
    run = run_path(runs, "resume", phantom_dir, "unet-relu-kaiming-d3-s0")
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2 and checkpoint["optimizer_states"][0]["state"]
    assert json.loads((run / "summary.json").read_text())["status"].startswith("preempted")

    # resumed on 2 ranks, it ends where an uninterrupted 2-rank run ends
    resumed = start_fit(run_args(phantom_dir, runs, [BEST, last_every(0)], *ddp, "--ckpt_path", "last"))
    code, err = finish(resumed, 240)
    assert code == 0, err[-3000:]
    reference_runs = tmp_path / "reference"
    code, err = finish(start_fit(run_args(phantom_dir, reference_runs, [BEST, last_every(0)], *ddp)), 240)
    assert code == 0, err[-3000:]
    steps = 2 * steps_per_epoch
    weights, dice, losses, _ = final_state(run, steps=steps)
    reference = final_state(run_path(reference_runs, "resume", phantom_dir, run.name), steps=steps)
    assert max_difference(weights, reference[0]) <= 1e-6
    assert dice == pytest.approx(reference[1], abs=1e-6)
    assert [step for step, _ in losses] == [step for step, _ in reference[2]] == list(range(steps))


@pytest.mark.slow
def test_ddp_two_processes_score_each_volume_once(volume_dir, tmp_path):
    # 3 validation cases over 2 ranks: one rank gets a padding repeat, scored once
    runs = tmp_path / "runs"
    args = volume_fit_args(volume_dir, runs, "unet", "--data.cache_dir", str(tmp_path / "cache"))
    args += ["--data.val_fraction", "0.5", "--data.iterations_per_epoch", "2", "--trainer.max_epochs", "1"]
    args += ["--model.net.init_args.features", "[4, 8, 16, 32]", "--model.hd95", "false", "--run.name", "vol"]
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    code, err = finish(start_fit([*args, *ddp]), 300)
    assert code == 0, err[-3000:]
    run = run_path(runs, "default", volume_dir, "vol")
    final = json.loads((run / "summary.json").read_text())["final"]
    main(["validate", "-c", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
          "--trainer.devices", "1", "--trainer.strategy", "auto"])  # fmt: skip
    with open(run / "validate" / "metrics.csv") as f:
        single = {k: float(v) for row in csv.DictReader(f) for k, v in row.items() if v}
    assert final["val/images"] == single["val/images"] == 3  # per case, the repeat once
    for key in ("val/dice", "val/dice_organ", "val/dice_lesion", "val/loss", "val/dice_slice"):
        assert final[key] == pytest.approx(single[key], abs=1e-5), key
