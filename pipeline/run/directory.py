"""Where a run lives: ``RunConfig`` (the ``run:`` section of a config), the state of a run
directory, and the rule that a fresh fit never writes into a directory holding another run.

Every fit writes ``runs/<experiment>/<dataset>/<run_name>/``: ``config.yaml``, ``split.json``,
``checkpoints/{best,last}.ckpt``, ``metrics.csv``, ``summary.json`` and the W&B files
(``pipeline.run.naming.run_identity`` names it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.errors import DataError
from pipeline.files import read_json


@dataclass
class RunConfig:
    """Where a run is written and how it is tracked.

    Args:
        experiment: experiment name: the folder under ``root`` and the default W&B group.
        name: run name; default derived from the variant, the fold (k-fold only) and the seed
            (``unet-noskip-sigmoid-xavier-f0-s0``).
        dataset: the folder between the experiment and the run; default the data root's folder
            name (``Task09_Spleen``, ``synthetic``). Set it when two data folders share a name.
        root: folder holding all experiments.
        overwrite: replace a run already in the run directory (deleted first). Without it a
            fresh fit into a directory holding a run stops before writing anything.
        group: W&B group; default the experiment (``medseg cv`` groups the folds of one CV).
        wandb: log to Weights & Biases (online with a key, offline otherwise).
        project: W&B project.
        tags: extra W&B tags (the variant's knobs are always added).
        log_model: upload checkpoints as W&B artifacts (``true``: at the end, ``all``: every save).
        sync_every_n_steps: optimiser steps between the host's reads of per-step device values:
            the divergence and SIGTERM flags (``pipeline.training.checks``) and the progress bar's
            loss; null: every step on a CPU, every 50 on a GPU, where each read waits for the GPU.
    """

    experiment: str = "default"
    name: str | None = None
    dataset: str | None = None
    root: str = "runs"
    overwrite: bool = False
    group: str | None = None
    wandb: bool = True
    project: str = "medseg"
    tags: list[str] = field(default_factory=list)
    log_model: bool | Literal["all"] = False
    sync_every_n_steps: int | None = None

    def __post_init__(self) -> None:
        if self.sync_every_n_steps is not None and self.sync_every_n_steps < 1:
            raise ValueError(
                f"run.sync_every_n_steps must be null (every step on a CPU, 50 on a GPU) or >= 1, "
                f"got {self.sync_every_n_steps}"
            )
        for key in ("experiment", "name", "dataset"):
            value = getattr(self, key)
            if value is not None and (not value or "/" in value or value in (".", "..")):
                raise ValueError(
                    f"run.{key} must be one folder name (no '/', not '.' or '..'), got {value!r}"
                )


def run_state(directory: Path) -> str:
    """``completed`` or ``diverged`` (done), ``resume`` (a ``last.ckpt`` to go on from) or ``new``."""
    summary = read_json(directory / "summary.json")
    if summary.get("status") == "completed":
        return "completed"
    if (summary.get("DivergenceGuard") or {}).get("diverged"):
        return "diverged"
    return "resume" if (directory / "checkpoints" / "last.ckpt").is_file() else "new"


def existing_run(directory: Path) -> str | None:
    """What a fresh fit into ``directory`` would destroy (a finished run, or any checkpoint), or None.

    Logs and configs of a fit that stopped before its first checkpoint are not counted: nothing
    of it can be resumed or used.
    """
    state = run_state(directory)
    if state in ("completed", "diverged"):
        return f"a {state} run"
    if state == "resume":
        return "an interrupted run (checkpoints/last.ckpt)"
    checkpoints = sorted((directory / "checkpoints").glob("*.ckpt"))
    return f"a run's checkpoint (checkpoints/{checkpoints[0].name})" if checkpoints else None


def check_fresh_fit(directory: Path, overwrite: bool) -> bool:
    """For a fit that does not resume this directory's own run: True when a run there is to be
    replaced (``overwrite``), False when there is none.

    Raises:
        DataError: the directory holds a run and ``overwrite`` is off; the line says how to
            resume it, name the new run otherwise, or replace it.
    """
    held = existing_run(directory)
    if held is None:
        return False
    if overwrite:
        return True
    raise DataError(
        directory,
        f"holds {held}, which a fresh fit would overwrite: resume it with --ckpt_path last, name "
        "this run with --run.name NAME (or --run.experiment), or replace it with --run.overwrite true",
    )
