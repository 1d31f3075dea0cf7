"""Run directories, run names, W&B + CSV loggers and the run's ``summary.json``.

Every fit writes ``runs/<experiment>/<run_name>/``: ``config.yaml``, ``split.json``,
``checkpoints/{best,last}.ckpt``, ``metrics.csv``, ``summary.json`` and the W&B files.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pipeline.csv_log import ResumedCSVLogger

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """Where a run is written and how it is tracked.

    Args:
        experiment: experiment name: the folder under ``root`` and the W&B group.
        name: run name; default derived from the variant and seed (``unet-noskip-sigmoid-xavier-s0``).
        root: folder holding all experiments.
        wandb: log to Weights & Biases (online with a key, offline otherwise).
        project: W&B project.
        tags: extra W&B tags (the variant's knobs are always added).
        log_model: upload checkpoints as W&B artifacts (``true``: at the end, ``all``: every save).
    """

    experiment: str = "default"
    name: str | None = None
    root: str = "runs"
    wandb: bool = True
    project: str = "medseg"
    tags: list[str] = field(default_factory=list)
    log_model: bool | str = False


def variant_name(knobs: dict) -> str:
    """Short name of a network variant, e.g. ``unet-noskip-residual-sigmoid-xavier-nonorm-d6``."""
    parts = [str(knobs.get("arch", "net"))]
    if knobs.get("encoder"):
        parts.append(str(knobs["encoder"]))
    if knobs.get("weights") not in (None, "none"):  # pretrained encoder: imagenet or file
        parts.append(str(knobs["weights"]))
    if knobs.get("freeze"):
        parts.append(f"freeze{knobs['freeze']}")
    if knobs.get("skips") is False:
        parts.append("noskip")
    if knobs.get("block") == "residual":
        parts.append("residual")
    parts += [str(knobs[k]) for k in ("act", "init") if k in knobs]
    if knobs.get("norm") not in (None, "batch"):
        parts.append(f"{'no' if knobs['norm'] == 'none' else knobs['norm']}norm")
    if knobs.get("depth") not in (None, 5):
        parts.append(f"d{knobs['depth']}")
    return "-".join(parts)


def knob_tags(knobs: dict) -> list[str]:
    """W&B tags for a variant: ``skips:false``, ``act:sigmoid``, ..."""
    return [f"{k}:{str(v).lower()}" for k, v in knobs.items()]


def has_wandb_key() -> bool:
    """True when an API key is configured (environment or ~/.netrc); the key is never read out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """``WANDB_MODE`` if set; ``online`` with a key; ``offline`` otherwise."""
    return os.environ.get("WANDB_MODE") or ("online" if has_wandb_key() else "offline")


def build_loggers(
    run_dir: Path, run: RunConfig, name: str, tags: list[str], resume: bool = False
) -> list[Logger]:
    """A CSV logger writing ``run_dir/metrics.csv`` and, if enabled, a W&B logger in ``run_dir/wandb``.

    ``resume`` (``fit --ckpt_path``): continue the run's W&B run and keep its earlier metrics.csv rows.
    """
    loggers: list[Logger] = []
    if run.wandb and wandb_mode() != "disabled":
        offline = wandb_mode() in ("offline", "dryrun")
        loggers.append(
            WandbLogger(
                name=name,
                project=run.project,
                group=run.experiment,
                tags=[*tags, *run.tags],
                save_dir=str(run_dir),
                # wandb's own mode, not Lightning's `offline` flag: that one refuses log_model (wandb
                # keeps offline artifacts for `wandb sync`) and sets WANDB_MODE for the whole process.
                mode="offline" if offline else wandb_mode(),
                # quiet: offline, the one line on `wandb sync` comes from finish_wandb
                settings={"quiet": True} if offline else None,
                log_model=run.log_model,
                id=read_wandb_id(run_dir) if resume else None,
                resume="allow",
            )
        )
    csv_logger = ResumedCSVLogger if resume else CSVLogger
    loggers.append(csv_logger(save_dir=str(run_dir), name="", version=""))
    return loggers


SUMMARIES = {"val/dice": "max,last", "val/loss": "min,last"}  # W&B run summary: best and final


def define_summaries(experiment: object) -> None:
    """W&B summaries of the key metrics: ``val/dice`` max and ``val/loss`` min (and the last of each)."""
    for key, summary in SUMMARIES.items():
        experiment.define_metric(key, step_metric="trainer/global_step", summary=summary)


def finish_wandb(failed: bool) -> None:
    """Close this process's W&B run, so that the next fit in the same process starts its own.

    For an offline run this logs the one line on how to upload it later.
    """
    wandb = sys.modules.get("wandb")  # never imported: no run to close
    run = getattr(wandb, "run", None)
    if run is None:
        return
    offline, folder = run.settings.mode in ("offline", "dryrun"), Path(run.dir).parent
    run.finish(exit_code=1 if failed else 0)
    if offline:
        rank_zero_info(f"W&B run saved offline: upload it with `wandb sync {folder}`")


def read_wandb_id(run_dir: Path) -> str | None:
    """The W&B run id of an earlier run in ``run_dir`` (to resume the same W&B run), if any."""
    path = run_dir / "wandb_id.txt"
    return path.read_text().strip() if path.exists() else None


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

    def __init__(self, run_dir: str | Path, run_name: str, experiment: str, seed: int | None) -> None:
        self.run_dir = Path(run_dir)
        self.meta = {"run_name": run_name, "experiment": experiment, "seed": seed}
        self.best: dict[str, float] = {}
        self.epoch_seconds: list[float] = []
        self._epoch_start = 0.0
        self.status = "running"

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        datamodule = trainer.datamodule
        if datamodule is not None and getattr(datamodule, "split", None):
            datamodule.save_split(self.run_dir / "split.json")
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
        dice = metrics.get("val/dice")
        if dice is not None and (not self.best or dice > self.best.get("val/dice", -1.0)):
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
            "variant": getattr(net, "knobs", {}),
            "params": sum(p.numel() for p in pl_module.parameters()),
            "epochs": len(self.epoch_seconds),
            "steps": trainer.global_step,
            "seconds_per_epoch": sum(self.epoch_seconds) / max(1, len(self.epoch_seconds)),
            "best": self.best,
            "final": {k: _plain(v) for k, v in sorted(trainer.callback_metrics.items())},
        }
        for callback in trainer.callbacks:
            if callback is not self and hasattr(callback, "summary"):
                summary[type(callback).__name__] = callback.summary()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        tmp.replace(path)
        log.info("wrote %s", path)
