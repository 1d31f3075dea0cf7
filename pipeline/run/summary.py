"""``RunSummary``: the run's ``split.json`` (and a volume data set's ``plan.json``) at fit start and
``summary.json`` (best and final metrics, size, timing, every callback's own summary) at the end, on
success, failure or SIGTERM."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pipeline.files import write_json
from pipeline.models import net_knobs
from pipeline.run.loggers import define_summaries

log = logging.getLogger(__name__)


def _plain(value: object) -> object:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


class RunSummary(pl.Callback):
    """Writes ``split.json`` at fit start and ``summary.json`` (best/final metrics, size, timing).

    Any callback with a ``summary() -> dict`` method adds its section under its class name.
    """

    def __init__(
        self, run_dir: str | Path, run_name: str, experiment: str, seed: int | None, dataset: str = ""
    ) -> None:
        self.run_dir = Path(run_dir)
        self.meta = {"run_name": run_name, "experiment": experiment, "dataset": dataset, "seed": seed}
        self.best: dict[str, object] = {}  # the validation metrics of the best epoch, its epoch and step
        self.epoch_seconds: list[float] = []
        self._epoch_start = 0.0
        self.status = "running"

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Lightning's data connector sets trainer.datamodule; the Trainer class does not declare it
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if datamodule is not None and getattr(datamodule, "split", None):
            write_json(self.run_dir / "split.json", datamodule.split)
        if getattr(datamodule, "plan", None) is not None:
            write_json(self.run_dir / "plan.json", datamodule.plan.to_json())
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                (self.run_dir / "wandb_id.txt").write_text(logger.version or "")
                define_summaries(logger.experiment)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: _plain(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        dice, best = metrics.get("val/dice"), self.best.get("val/dice")
        if isinstance(dice, (int, float)) and (not isinstance(best, (int, float)) or dice > best):
            self.best = {**metrics, "epoch": trainer.current_epoch, "step": trainer.global_step}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.status == "running":
            self.status = "completed"
        self.write(trainer, pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            self.status = "preempted: stopped by SIGTERM; resume with --ckpt_path last"
        else:
            self.status = f"failed: {type(exception).__name__}: {exception}"
        self.write(trainer, pl_module)

    def state_dict(self) -> dict:
        # Saved in checkpoints, so a resumed run's summary covers the epochs before the interruption.
        return {"best": self.best, "epoch_seconds": self.epoch_seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = dict(state_dict.get("best", {}))
        self.epoch_seconds = list(state_dict.get("epoch_seconds", []))

    @rank_zero_only
    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = getattr(pl_module, "net", pl_module)
        summary = {
            **self.meta,
            "status": self.status,
            "variant": net_knobs(net),
            "params": sum(p.numel() for p in pl_module.parameters()),
            "epochs": len(self.epoch_seconds),
            "steps": trainer.global_step,
            "seconds_per_epoch": sum(self.epoch_seconds) / max(1, len(self.epoch_seconds)),
            "best": self.best,
            "final": {k: _plain(v) for k, v in sorted(trainer.callback_metrics.items())},
        }
        # Lightning's callback connector sets trainer.callbacks; the Trainer class does not declare it
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if callback is not self and hasattr(callback, "summary"):
                summary[type(callback).__name__] = callback.summary()
        write_json(self.run_dir / "summary.json", summary)
        log.info("wrote %s", self.run_dir / "summary.json")
