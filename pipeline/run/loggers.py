"""The run's loggers: W&B (online with a key, offline without) and the ``metrics.csv`` mirror."""

from __future__ import annotations

import logging
import netrc
import os
import sys
from pathlib import Path
from typing import Any, Protocol

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_info

from pipeline.run.csv_log import ResumedCSVLogger
from pipeline.run.directory import RunConfig

log = logging.getLogger(__name__)


def has_wandb_key() -> bool:
    """True when an API key is configured (environment or ~/.netrc); the key is never read out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """``WANDB_MODE`` if set; ``online`` with a key; ``offline`` otherwise.

    A ``WANDB_MODE`` set but empty counts as unset (and is removed: wandb itself rejects it).
    """
    if os.environ.get("WANDB_MODE") == "":
        del os.environ["WANDB_MODE"]
    return os.environ.get("WANDB_MODE") or ("online" if has_wandb_key() else "offline")


def build_loggers(
    run_dir: Path,
    run: RunConfig,
    name: str,
    tags: list[str],
    resume: bool = False,
    csv: bool = True,
    group: str | None = None,
) -> list[Logger]:
    """If enabled, a W&B logger in ``run_dir/wandb`` (run ``name``, in ``group``, default the
    experiment); with ``csv``, a CSV logger writing ``run_dir/metrics.csv``.

    ``resume`` (``fit --ckpt_path``, validate, test): continue the run's W&B run (its id from
    ``wandb_id.txt``) and keep its earlier metrics.csv rows.
    """
    loggers: list[Logger] = []
    if run.wandb and wandb_mode() != "disabled":
        offline = wandb_mode() in ("offline", "dryrun")
        loggers.append(
            WandbLogger(
                name=name,
                project=run.project,
                group=group or run.experiment,
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
    if csv:
        csv_logger = ResumedCSVLogger if resume else CSVLogger
        loggers.append(csv_logger(save_dir=str(run_dir), name="", version=""))
    return loggers


SUMMARIES = {"val/dice": "max,last", "val/loss": "min,last"}  # W&B run summary: best and final


class MetricDefiner(Protocol):
    """What ``define_summaries`` needs of a W&B run (``WandbLogger.experiment``)."""

    def define_metric(
        self, name: str, *, step_metric: str | None = None, summary: str | None = None
    ) -> Any: ...


def define_summaries(experiment: MetricDefiner) -> None:
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
