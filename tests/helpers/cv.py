"""A ``medseg cv`` on the phantoms with 3 folds, killed once during fold 1 and started again."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import yaml
from torch import Tensor

from tests.conftest import fit_args
from tests.helpers.resume import BEST, last_every


class KillFoldOnce(pl.Callback):
    """SIGKILLs its own process in optimiser step ``step`` of fold ``fold``, the first time only
    (``marker`` records that it did), as a machine that dies would.

    Args:
        fold: the ``data.fold`` of the run to kill.
        step: the ``trainer.global_step`` at which to kill it.
        marker: a file written just before the kill; while it exists, nothing is killed.
    """

    def __init__(self, fold: int, step: int, marker: str) -> None:
        self.fold, self.step, self.marker = fold, step, Path(marker)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if (
            trainer.datamodule.fold == self.fold
            and trainer.global_step == self.step
            and not self.marker.exists()
        ):
            self.marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)


class RecordTrainStart(pl.Callback):
    """Appends ``{"fold", "global_step", "after_kill"}`` to ``path`` (JSON lines) as each fold's
    training starts: where a fold began (0, or a resumed checkpoint's step), and in which attempt
    (``after_kill``: the ``KillFoldOnce`` marker existed)."""

    def __init__(self, path: str, marker: str) -> None:
        self.path, self.marker = Path(path), Path(marker)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = {"fold": trainer.datamodule.fold, "global_step": trainer.global_step}
        with self.path.open("a") as f:
            f.write(json.dumps({**start, "after_kill": self.marker.exists()}) + "\n")


def cv_args(data: Path, folder: Path) -> list[str]:
    """``medseg cv`` arguments: 3 folds of 2 epochs of 2 steps; fold 1 is killed in step 3 (its
    second epoch, after epoch 0's last.ckpt) the first time it runs. Each fold's start is recorded
    in ``folder/train_starts.jsonl``."""
    config = folder / "callbacks.yaml"
    kill = {
        "class_path": "tests.helpers.cv.KillFoldOnce",
        "init_args": {"fold": 1, "step": 3, "marker": str(folder / "killed")},
    }
    starts = {
        "class_path": "tests.helpers.cv.RecordTrainStart",
        "init_args": {"path": str(folder / "train_starts.jsonl"), "marker": str(folder / "killed")},
    }
    callbacks = [BEST, last_every(0), kill, starts]
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    fit = fit_args(
        data, folder / "runs", "-c", str(config), "--trainer.max_epochs", "2", "--run.wandb", "false"
    )
    return ["cv", *fit[1:], "--data.num_folds", "3", "--model.hd95", "false"]
